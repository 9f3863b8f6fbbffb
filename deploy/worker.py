"""A tiny demo worker: claims tasks from a broker over gRPC, "runs" them, reports COMPLETE and
fetches the next one in the same call. For the compose stack and for smoke tests; a real
worker is Sentry's taskworker.

Settings from the environment (not TASKBROKER_*, which is the broker's own):
WORKER_BROKER (host:port, default 127.0.0.1:50051), WORKER_NAMESPACE (empty: any),
WORKER_TASK_SECONDS (simulated work per task, default 0.01).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import grpc

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc

logger = logging.getLogger("worker")

CALL_TIMEOUT_S = 5.0
IDLE_SLEEP_S = 0.5
# The broker answers these when it is starting, stopping or overloaded: worth a retry.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def run(broker: str, namespace: str, task_seconds: float, stopping: threading.Event) -> int:
    """Work until `stopping` is set; the number of tasks completed."""
    completed = 0
    fetch = pb.FetchNextTask(namespace=namespace)
    with grpc.insecure_channel(broker) as channel:
        stub = pb_grpc.ConsumerServiceStub(channel)
        task: pb.TaskActivation | None = None
        # A task in hand is run and reported before stopping; its deadline would free it too,
        # but only after a delay.
        while task is not None or not stopping.is_set():
            try:
                if task is None:
                    task = stub.GetTask(
                        pb.GetTaskRequest(namespace=namespace), timeout=CALL_TIMEOUT_S
                    ).task
                time.sleep(task_seconds)
                # A stopping worker still reports what it ran, and asks for nothing more.
                response = stub.SetTaskStatus(
                    pb.SetTaskStatusRequest(
                        id=task.id,
                        status=pb.TASK_ACTIVATION_STATUS_COMPLETE,
                        fetch_next_task=None if stopping.is_set() else fetch,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                completed += 1
                task = response.task if response.HasField("task") else None
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    task = None  # nothing pending
                elif error.code() not in RETRYABLE:
                    raise
                elif stopping.is_set():
                    break  # the broker is away: the task's deadline hands it to another worker
                else:
                    logger.info("broker busy or away (%s); retrying", error.code().name)
                stopping.wait(IDLE_SLEEP_S)
    return completed


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: finishing the current task", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    broker = os.environ.get("WORKER_BROKER", "127.0.0.1:50051")
    logger.info("working for %s", broker)
    completed = run(
        broker,
        os.environ.get("WORKER_NAMESPACE", ""),
        float(os.environ.get("WORKER_TASK_SECONDS", "0.01")),
        stopping,
    )
    logger.info("stopped after %d tasks", completed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
