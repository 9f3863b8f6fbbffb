"""Batch workers: the `WorkerKind` of our TaskBatchService, for `loadtest e2e --protocol batch`.

The mapping from worker slots: a slot is a task a worker holds at once, as for unary
workers, so `--workers 256 --batch 32` runs 256 / 32 = 8 coroutines (at least one per
worker process), each holding up to 32 tasks. A coroutine loops: FetchTasks(up to N,
waiting up to `wait_ms` in the broker) while it holds nothing, otherwise the simulated work
of all its tasks at once (the tasks of a batch run side by side, as in a worker with N
slots), then ReportAndFetch(their results, up to N more, without waiting). Every result is
COMPLETE.

ReportAndFetch does not wait for tasks: a broker with nothing pending would hold the
answer, and with it the acknowledgement of the results, for the whole wait, which a worker
reporting results does not want, and which would make the call's latency, every result's
latency here, the wait rather than the broker's work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import ClassVar

import grpc

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.taskbroker_actors.v1 import batch_pb2, batch_pb2_grpc
from loadtest.producer import APPLICATION
from loadtest.workers import RETRIED_CODES, RPC_TIMEOUT_S, Tally, Worker, WorkerPlan

DEFAULT_BATCH = 32
DEFAULT_WAIT_MS = 200
"""Long enough that an idle coroutine costs the broker a few calls a second, short enough
that the end of a run is not held up by it."""


@dataclass(frozen=True, slots=True)
class BatchWorkers:
    """TaskBatchService: each coroutine holds up to `batch` tasks (see the module docstring)."""

    batch: int = DEFAULT_BATCH
    wait_ms: int = DEFAULT_WAIT_MS
    name: ClassVar[str] = "batch"

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.wait_ms < 0:
            raise ValueError(f"wait_ms must not be negative, got {self.wait_ms}")

    def worker(self, channel: grpc.aio.Channel, plan: WorkerPlan) -> Worker:
        return _BatchWorker(batch_pb2_grpc.TaskBatchServiceStub(channel), plan, self)


class _BatchWorker:
    def __init__(
        self, stub: batch_pb2_grpc.TaskBatchServiceStub, plan: WorkerPlan, kind: BatchWorkers
    ) -> None:
        self._stub = stub
        self._work_s = plan.work_s
        self._fetch_waiting = batch_pb2.FetchTasksRequest(
            application=APPLICATION, max_tasks=kind.batch, wait_ms=kind.wait_ms
        )
        self._fetch_now = batch_pb2.FetchTasksRequest(application=APPLICATION, max_tasks=kind.batch)
        self.tally = Tally(("FetchTasks", "ReportAndFetch"))

    async def run(self) -> None:
        held: list[pb.TaskActivation] = []
        while True:
            held = await self.step(held)

    async def step(self, held: list[pb.TaskActivation]) -> list[pb.TaskActivation]:
        """One RPC: fetch tasks, or report those held and fetch more; the tasks held next."""
        if held and self._work_s:
            await asyncio.sleep(self._work_s)
        method = "ReportAndFetch" if held else "FetchTasks"
        started = time.perf_counter()
        try:
            if held:
                results = [
                    batch_pb2.TaskResult(id=task.id, status=pb.TASK_ACTIVATION_STATUS_COMPLETE)
                    for task in held
                ]
                response = await self._stub.ReportAndFetch(  # type: ignore[misc]
                    batch_pb2.ReportAndFetchRequest(results=results, fetch=self._fetch_now),
                    timeout=RPC_TIMEOUT_S,
                )
            else:
                response = await self._stub.FetchTasks(  # type: ignore[misc]
                    self._fetch_waiting, timeout=RPC_TIMEOUT_S
                )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            await self.tally.failed(method, code, started)
            return held if code in RETRIED_CODES else []
        tasks: list[pb.TaskActivation] = list(response.tasks)
        if not held and not tasks:
            self.tally.empty_poll()  # the broker has waited wait_ms already: ask again
            return tasks
        self.tally.completed((task.id for task in held), self.tally.answered(method, started))
        for task in tasks:
            self.tally.received(task)
        return tasks
