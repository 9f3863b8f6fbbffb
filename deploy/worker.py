"""A tiny demo worker: claims tasks from brokers over gRPC, "runs" them, reports COMPLETE and
fetches the next one in the same call. For the compose stack, the Kubernetes example and
smoke tests; a real worker is Sentry's taskworker.

Several brokers: each holds the tasks of its own partitions, so a worker asks one broker at a
time and moves on to the next when that one has nothing (NOT_FOUND), is away (UNAVAILABLE)
or does not answer within `CALL_TIMEOUT_S`, and after `REBALANCE_AFTER` tasks so that
workers keep spreading over the brokers, as taskbroker-client's pull worker does with
several `--broker-host`s. A result always goes to
the broker that handed out the task: no other broker knows it.

Settings from the environment (not TASKBROKER_*, which is the broker's own):
WORKER_BROKERS (host:port, comma separated, default 127.0.0.1:50051), WORKER_NAMESPACE
(empty: any), WORKER_TASK_SECONDS (simulated work per task, default 0.01).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from types import FrameType

import grpc

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc

logger = logging.getLogger("worker")

CALL_TIMEOUT_S = 5.0
IDLE_SLEEP_S = 0.5
# The client's DEFAULT_REBALANCE_AFTER: tasks from one broker before moving to the next.
REBALANCE_AFTER = 32
# Ask the next broker: this one has nothing pending (NOT_FOUND), is away (UNAVAILABLE:
# starting, stopping, killed) or did not answer in time (its address is unreachable).
MOVE_ON = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The broker is overloaded: ask it again after a pause.
RETRY = {grpc.StatusCode.RESOURCE_EXHAUSTED}


def parse_brokers(text: str) -> list[str]:
    """`host:port,host:port` as WORKER_BROKERS gives it; blanks dropped."""
    brokers = [address.strip() for address in text.split(",") if address.strip()]
    if not brokers:
        raise ValueError("WORKER_BROKERS: no broker address")
    return brokers


class Rotation:
    """Which broker to ask: the current one until it has nothing, is away, or has handed out
    `rebalance_after` tasks; then the next in the list. `idle` says a whole round of brokers
    had nothing to give, so the worker should pause before asking again."""

    def __init__(self, brokers: Sequence[str], start: int, rebalance_after: int) -> None:
        self.brokers = list(brokers)
        self._index = start % len(self.brokers)
        self._rebalance_after = rebalance_after
        self._taken = 0
        self._misses = 0

    @property
    def current(self) -> str:
        return self.brokers[self._index]

    def took(self) -> None:
        """The current broker handed out a task."""
        self._taken += 1
        self._misses = 0

    @property
    def due(self) -> bool:
        """Time to move on after the task in hand: fetch no next one from this broker."""
        return len(self.brokers) > 1 and self._taken >= self._rebalance_after

    def move_on(self, missed: bool) -> None:
        """To the next broker; `missed`: the current one had nothing or was away."""
        self._misses = self._misses + 1 if missed else 0
        self._taken = 0
        self._index = (self._index + 1) % len(self.brokers)

    @property
    def idle(self) -> bool:
        return self._misses >= len(self.brokers)

    def __repr__(self) -> str:
        return f"Rotation(current={self.current!r}, taken={self._taken}, misses={self._misses})"


def run(
    brokers: Sequence[str],
    namespace: str,
    task_seconds: float,
    stopping: threading.Event,
    start: int = 0,
) -> int:
    """Work until `stopping` is set; the number of tasks completed."""
    completed = 0
    fetch = pb.FetchNextTask(namespace=namespace)
    rotation = Rotation(brokers, start, REBALANCE_AFTER)
    with ExitStack() as channels:
        stubs = {
            broker: pb_grpc.ConsumerServiceStub(
                channels.enter_context(grpc.insecure_channel(broker))
            )
            for broker in rotation.brokers
        }
        # A task in hand, claimed from the current broker, is run and reported before stopping.
        task: pb.TaskActivation | None = None
        while task is not None or not stopping.is_set():
            stub = stubs[rotation.current]
            try:
                if task is None:
                    task = stub.GetTask(
                        pb.GetTaskRequest(namespace=namespace), timeout=CALL_TIMEOUT_S
                    ).task
                    rotation.took()
                    time.sleep(task_seconds)
                # A stopping (or moving) worker still reports what it ran, and asks for nothing.
                moving = stopping.is_set() or rotation.due
                response = stub.SetTaskStatus(
                    pb.SetTaskStatusRequest(
                        id=task.id,
                        status=pb.TASK_ACTIVATION_STATUS_COMPLETE,
                        fetch_next_task=None if moving else fetch,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                completed += 1
                task = response.task if response.HasField("task") else None
                if task is not None:
                    rotation.took()
                    time.sleep(task_seconds)
                elif moving:
                    rotation.move_on(missed=False)
            except grpc.RpcError as error:
                code = error.code()
                if code in MOVE_ON:
                    # Nothing pending, or the broker is away: a task in hand stays on that
                    # broker, whose processing deadline hands it to another worker.
                    if code is not grpc.StatusCode.NOT_FOUND:
                        logger.info("%s is away (%s); moving on", rotation.current, code.name)
                    task = None
                    rotation.move_on(missed=True)
                    if rotation.idle:
                        stopping.wait(IDLE_SLEEP_S)
                elif code in RETRY:
                    logger.info("%s is busy (%s); retrying", rotation.current, code.name)
                    stopping.wait(IDLE_SLEEP_S)
                    if stopping.is_set():
                        task = None
                else:
                    raise
    return completed


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: finishing the current task", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    brokers = parse_brokers(os.environ.get("WORKER_BROKERS", "127.0.0.1:50051"))
    # Replicas share one environment: a random first broker spreads them from the start.
    start = random.randrange(len(brokers))
    logger.info("working for %s, starting with %s", ", ".join(brokers), brokers[start])
    completed = run(
        brokers,
        os.environ.get("WORKER_NAMESPACE", ""),
        float(os.environ.get("WORKER_TASK_SECONDS", "0.01")),
        stopping,
        start,
    )
    logger.info("stopped after %d tasks", completed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
