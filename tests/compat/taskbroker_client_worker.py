"""A worker built on the PyPI `taskbroker-client` package, run in its own venv by
tests/test_client_compat.py: it fetches and completes every task, then prints the ids.

    python taskbroker_client_worker.py PORT APPLICATION [SECRET ...]
"""

import json
import sys

from sentry_protos.taskbroker.v1.taskbroker_pb2 import (
    TASK_ACTIVATION_STATUS_COMPLETE,
    FetchNextTask,
)
from taskbroker_client.metrics import NoOpMetricsBackend
from taskbroker_client.types import ProcessingResult
from taskbroker_client.worker.client import TaskbrokerClient

port, application, *secrets = sys.argv[1:]
client = TaskbrokerClient(
    [f"127.0.0.1:{port}"],
    application,
    NoOpMetricsBackend(),
    rpc_secret=json.dumps(secrets) if secrets else None,
)
completed = []
task = client.get_task()
while task is not None:
    completed.append(task.activation.id)
    result = ProcessingResult(
        task_id=task.activation.id,
        status=TASK_ACTIVATION_STATUS_COMPLETE,
        host=task.host,
        receive_timestamp=0.0,
    )
    task = client.update_task(result, fetch_next_task=FetchNextTask(namespace=None))
print(json.dumps({"completed": completed, "then": repr(client.get_task())}))
