"""The demo application that the push-delivery examples run in the PyPI `taskbroker-client`
push worker (`Dockerfile.push-worker`, `--app-module push_app:app`). It runs in the client's
own environment, not the broker's: it imports only taskbroker_client.

Its one task, namespace `demo`, name `demo.noop`, sleeps a little and succeeds: the
compose override's `demo-tasks` produces 10 000 of them for application `demo`, the key the
broker's `worker_map` names. The worker's parent process and each of its children import
this module, so the settings come from the environment:

- DEMO_APPLICATION: the application's name (default `demo`); lower case, since an
  environment variable (TASKBROKER_WORKER_MAP__DEMO) can only name a lower-case key;
- DEMO_TASK_SECONDS: simulated work per task (default 0.005);
- DEMO_RPC_SECRET: comma-separated shared secrets, written as the broker's
  TASKBROKER_GRPC_SHARED_SECRET is (the first signs, any verifies); unset or empty for no
  signing. It must list the broker's first secret, and the broker must list the worker's.
"""

import json
import os
import time

from taskbroker_client.app import TaskbrokerApp


def no_producer(topic: str) -> None:
    raise RuntimeError(f"the demo app spawns no tasks (asked for {topic})")


def rpc_secret(comma_separated: str) -> str | None:
    """The client's `rpc_secret` (a JSON list) from the broker's way of writing secrets."""
    secrets = [secret.strip() for secret in comma_separated.split(",") if secret.strip()]
    return json.dumps(secrets) if secrets else None


app = TaskbrokerApp(name=os.environ.get("DEMO_APPLICATION", "demo"), producer_factory=no_producer)
app.set_config({"rpc_secret": rpc_secret(os.environ.get("DEMO_RPC_SECRET", ""))})
namespace = app.create_namespace("demo")
TASK_SECONDS = float(os.environ.get("DEMO_TASK_SECONDS", "0.005"))


@namespace.register(name="demo.noop")
def noop(**_parameters: object) -> None:
    """`taskbroker produce --param-bytes N` sends a `padding` keyword: accepted, unused."""
    time.sleep(TASK_SECONDS)
