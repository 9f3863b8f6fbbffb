"""The application that the PyPI push worker serves in tests/test_push_compat.py (run in the
client venv, as `--app-module push_app:app`, with this folder on PYTHONPATH).

Its one task, `compat:record`, sleeps `sleep_s` and appends its activation id to the file
named by COMPAT_LEDGER: the test reads what ran, and how often, from there. The worker's
parent process and each child import this module, so the settings come from the
environment: COMPAT_APPLICATION (the app's name) and COMPAT_RPC_SECRET (a JSON list, the
client's `rpc_secret`; unset for no signing).
"""

import os
import time

from taskbroker_client.app import TaskbrokerApp
from taskbroker_client.state import current_task


def no_producer(topic: str) -> None:
    raise RuntimeError(f"the compatibility app spawns no tasks (asked for {topic})")


app = TaskbrokerApp(name=os.environ["COMPAT_APPLICATION"], producer_factory=no_producer)
app.set_config({"rpc_secret": os.environ.get("COMPAT_RPC_SECRET")})
namespace = app.create_namespace("compat")


@namespace.register(name="record")
def record(sleep_s: float = 0.0) -> None:
    time.sleep(sleep_s)
    task = current_task()
    if task is None:
        raise RuntimeError("the worker ran the task outside an activation")
    # One short write with O_APPEND: lines from concurrent children do not interleave.
    with open(os.environ["COMPAT_LEDGER"], "a") as ledger:
        ledger.write(f"{task.id}\n")
