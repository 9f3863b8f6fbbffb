"""Batch workers: the `WorkerKind` of our TaskBatchService, for `loadtest e2e --protocol batch`.

The mapping from worker slots: a slot is a task a worker holds at once, as for unary
workers, so `--workers 256 --batch 32` runs 256 / 32 = 8 coroutines (at least one per
worker process), each holding up to 32 tasks. A coroutine loops: FetchTasks(up to N,
waiting up to `wait_ms` in the broker) while it holds nothing, otherwise the simulated work
of all its tasks at once (the tasks of a batch run side by side, as in a worker with N
slots), then ReportAndFetch(their results, up to N more, without waiting). Every result is
COMPLETE. With several brokers, a fetch that comes back empty moves the coroutine on to
the next, as NOT_FOUND moves a unary worker, and results parked for a broker that was
unavailable go back to it in a ReportResults.

ReportAndFetch does not wait for tasks: a broker with nothing pending would hold the
answer, and with it the acknowledgement of the results, for the whole wait, which a worker
reporting results does not want, and which would make the call's latency, every result's
latency here, the wait rather than the broker's work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import grpc

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.taskbroker_actors.v1 import batch_pb2, batch_pb2_grpc
from loadtest.producer import APPLICATION
from loadtest.rotation import Held, Rotation
from loadtest.workers import RPC_TIMEOUT_S, Tally, Worker, WorkerPlan, report_refused

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

    def worker(
        self, channels: Mapping[str, grpc.aio.Channel], rotation: Rotation, plan: WorkerPlan
    ) -> Worker:
        return _BatchWorker(channels, rotation, plan, self)


class _BatchWorker:
    def __init__(
        self,
        channels: Mapping[str, grpc.aio.Channel],
        rotation: Rotation,
        plan: WorkerPlan,
        kind: BatchWorkers,
    ) -> None:
        self._stubs = {
            target: batch_pb2_grpc.TaskBatchServiceStub(channel)
            for target, channel in channels.items()
        }
        self._rotation = rotation
        self._work_s = plan.work_s
        self._fetch_waiting = batch_pb2.FetchTasksRequest(
            application=APPLICATION, max_tasks=kind.batch, wait_ms=kind.wait_ms
        )
        self._fetch_now = batch_pb2.FetchTasksRequest(application=APPLICATION, max_tasks=kind.batch)
        self.tally = Tally(("FetchTasks", "ReportAndFetch", "ReportResults"))

    async def run(self) -> None:
        held: Held | None = None
        while True:
            held = await self.step(held)

    async def step(self, held: Held | None) -> Held | None:
        """One RPC: report the tasks held and fetch more, send parked results again, or
        fetch tasks; the tasks held next."""
        if held is not None:
            if self._work_s:
                await asyncio.sleep(self._work_s)
            return await self._report(held, fetch=True)
        target, parked = self._rotation.next_call(time.monotonic())
        if parked is not None:
            return await self._report(parked, fetch=False)
        return await self._fetch(target)

    async def _fetch(self, target: str) -> Held | None:
        started = time.perf_counter()
        try:
            response = await self._stubs[target].FetchTasks(  # type: ignore[misc]
                self._fetch_waiting, timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            await self.tally.failed("FetchTasks", code, started)
            if code is grpc.StatusCode.UNAVAILABLE:
                self._rotation.unavailable(target, time.monotonic())
            return None
        tasks = tuple(response.tasks)
        if tasks:
            self.tally.answered("FetchTasks", started)
        else:
            self.tally.empty_poll()  # the broker has waited wait_ms already
        return self._hold(target, tasks)

    async def _report(self, held: Held, *, fetch: bool) -> Held | None:
        results = [
            batch_pb2.TaskResult(id=task.id, status=pb.TASK_ACTIVATION_STATUS_COMPLETE)
            for task in held.tasks
        ]
        stub = self._stubs[held.target]
        method = "ReportAndFetch" if fetch else "ReportResults"
        started = time.perf_counter()
        try:
            if fetch:
                response = await stub.ReportAndFetch(  # type: ignore[misc]
                    batch_pb2.ReportAndFetchRequest(results=results, fetch=self._fetch_now),
                    timeout=RPC_TIMEOUT_S,
                )
            else:
                response = await stub.ReportResults(  # type: ignore[misc]
                    batch_pb2.ReportResultsRequest(results=results), timeout=RPC_TIMEOUT_S
                )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            await self.tally.failed(method, code, started)
            report_refused(self._rotation, held, code)
            return None
        ids = (task.id for task in held.tasks)
        self.tally.completed(ids, self.tally.answered(method, started), held.target)
        return self._hold(held.target, tuple(response.tasks)) if fetch else None

    def _hold(self, target: str, tasks: tuple[pb.TaskActivation, ...]) -> Held | None:
        """The tasks `target` handed out; none moves the coroutine on to the next broker."""
        if not tasks:
            self._rotation.empty(target)
            return None
        for task in tasks:
            self.tally.received(task, target)
        return Held(target, tasks)
