"""Simulated push workers, for `loadtest e2e --delivery push`: K processes, each a
`WorkerService/PushTask` server (grpc.aio, a free port on 127.0.0.1) in front of a bounded
queue, C coroutines that take tasks from the queue and "execute" them (`work_ms`), and a
reporter that sends their results in batches through `ConsumerService/
SetBatchActivationStatus`, as taskbroker-client's push worker does:

- a push is accepted (OK) once its task is in the queue; while the queue is full the call
  waits up to `push_timeout_s` (the real worker's default, 5 s) and is then refused with
  RESOURCE_EXHAUSTED "worker busy";
- results go in batches of up to C (the real worker's concurrency), or with what there is
  `flush_interval_ms` after a batch's first result (the real worker: 1 s without a new
  result, which under load fills its batches first as well);
- a report answered with an error other than NOT_FOUND is sent again after a growing pause
  (1 s steps, 10 s at most); on NOT_FOUND its results are dropped.

Worker slots are K x C: tasks executed at once, the pull workers' meaning. A process also
holds up to `queue_size` tasks in its queue (C unless told), and results not yet reported.

The processes live for a whole session, because the broker's `worker_map` names their ports
before it starts; each phase is `prepare` (the plan, the broker to report to) before its
tasks are produced, then `run`. Before `run` the queues fill and further pushes wait in the
handlers, as they would in front of a worker that is still busy.

A task's latency here is the time from its push's arrival at the worker to the answer of
the report that carried its result: received → result recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event as EventType
from typing import Any, ClassVar

import grpc

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from loadtest.workers import RPC_TIMEOUT_S, Progress, Tally, WorkerReport

HOST = "127.0.0.1"
WORKER_SERVICE = "sentry_protos.taskbroker.v1.WorkerService"
REPORT_METHOD = "SetBatchActivationStatus"
DEFAULT_FLUSH_INTERVAL_MS = 100.0
DEFAULT_PUSH_TIMEOUT_S = 5.0
_RETRY_STEP_S = 1.0
_MAX_RETRY_PAUSE_S = 10.0
_START_TIMEOUT_S = 60.0
_PUBLISH_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class PushPlan:
    """One phase of every push worker process."""

    coroutines: int
    """Tasks a process executes at once (the real worker's `--concurrency`)."""
    queue_size: int
    """Tasks a process holds waiting (`--child-tasks-queue-maxsize`)."""
    work_s: float = 0.0
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_MS / 1000
    push_timeout_s: float = DEFAULT_PUSH_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.coroutines < 1 or self.queue_size < 1:
            raise ValueError("a push worker needs at least one coroutine and one queue place")


@dataclass(frozen=True, slots=True)
class PushDelivery:
    """Push delivery as a phase's kind of workers (`loadtest.e2e.Phase.kind`): the phase's
    worker slots are spread over the pool's processes."""

    queue_size: int | None = None
    """Per process; None: as many as the process executes at once."""
    flush_interval_ms: float = DEFAULT_FLUSH_INTERVAL_MS
    push_timeout_s: float = DEFAULT_PUSH_TIMEOUT_S
    name: ClassVar[str] = "push"
    batch: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.queue_size is not None and self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {self.queue_size}")
        if self.flush_interval_ms < 0:
            raise ValueError(f"flush_interval_ms must not be negative: {self.flush_interval_ms}")

    def plan(self, slots: int, processes: int, work_s: float) -> PushPlan:
        """`slots` tasks executed at once over `processes` processes (rounded up)."""
        coroutines = max(1, math.ceil(slots / processes))
        return PushPlan(
            coroutines,
            self.queue_size or coroutines,
            work_s,
            self.flush_interval_ms / 1000,
            self.push_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class PushRun:
    """One phase, merged over the processes."""

    report: WorkerReport
    started_wall: float
    stopped_wall: float
    refused: int
    """Pushes answered RESOURCE_EXHAUSTED."""


@dataclass(frozen=True, slots=True)
class _Order:
    target: str
    plan: PushPlan


@dataclass(frozen=True, slots=True)
class _ProcessReport:
    report: WorkerReport
    refused: int


@dataclass(frozen=True, slots=True)
class _Signals:
    """What the parent and the worker processes share. `orders` are the processes' own
    queues (None ends a process); the others are read by the parent."""

    orders: tuple[Any, ...]  # multiprocessing Queues of _Order | None, one per process
    ports: Any  # a multiprocessing Queue: (index, port) once each server listens
    prepared: Any  # a multiprocessing Queue: an index per process per phase
    go: EventType
    stop: EventType
    completed: SynchronizedArray[int]  # results acknowledged so far, one slot per process
    reports: Any  # a multiprocessing Queue of _ProcessReport


class _Batcher:
    """Results waiting to be reported: a batch is full at `size`, or due `interval_s`
    after its first result."""

    def __init__(self, size: int, interval_s: float) -> None:
        self._size = size
        self._interval_s = interval_s
        self._items: list[tuple[str, float]] = []
        self._any = asyncio.Event()
        self._full = asyncio.Event()

    def add(self, task_id: str, arrived: float) -> None:
        self._items.append((task_id, arrived))
        self._any.set()
        if len(self._items) >= self._size:
            self._full.set()

    async def take(self) -> list[tuple[str, float]]:
        await self._any.wait()
        if len(self._items) < self._size:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._interval_s)
        batch, self._items = self._items[: self._size], self._items[self._size :]
        if not self._items:
            self._any.clear()
        if len(self._items) < self._size:
            self._full.clear()
        return batch


@dataclass(frozen=True, slots=True)
class _Phase:
    plan: PushPlan
    queue: asyncio.Queue[tuple[str, float]]
    """(task id, its arrival on perf_counter's clock)."""
    stub: pb_grpc.ConsumerServiceStub
    target: str
    """The broker `stub` reports to."""


class _PushWorker:
    """One process's worker: the PushTask handler (`push_task`), the executing coroutines
    and the reporter."""

    def __init__(self) -> None:
        self.tally = Tally((REPORT_METHOD,))
        self.refused = 0
        self._phase: _Phase | None = None

    def prepare(self, plan: PushPlan, stub: pb_grpc.ConsumerServiceStub, target: str) -> None:
        """A fresh queue and tally for a phase; pushes are taken from now on."""
        self._phase = _Phase(plan, asyncio.Queue(plan.queue_size), stub, target)
        self.tally = Tally((REPORT_METHOD,))
        self.refused = 0

    async def push_task(
        self, request: pb.PushTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PushTaskResponse:
        phase = self._phase
        if phase is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no phase prepared")
        elif await self._queued(phase, (request.task.id, time.perf_counter())):
            self.tally.received(request.task, phase.target)
        else:
            self.refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "worker busy")
        return pb.PushTaskResponse()

    @staticmethod
    async def _queued(phase: _Phase, item: tuple[str, float]) -> bool:
        """Whether the task found a place in the queue within the push timeout."""
        if not phase.queue.full():
            phase.queue.put_nowait(item)  # no timer for the common case
            return True
        try:
            await asyncio.wait_for(phase.queue.put(item), phase.plan.push_timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """The phase's executing coroutines and reporter, until cancelled."""
        phase = self._phase
        if phase is None:
            raise RuntimeError("run before prepare")
        batcher = _Batcher(phase.plan.coroutines, phase.plan.flush_interval_s)
        sending: set[asyncio.Task[None]] = set()
        executing = [
            asyncio.create_task(self._execute(phase.queue, phase.plan.work_s, batcher))
            for _ in range(phase.plan.coroutines)
        ]
        try:
            while True:
                batch = await batcher.take()
                # Reports go out side by side, as the real worker's sender threads do.
                report = asyncio.create_task(self._report(phase, batch))
                sending.add(report)
                report.add_done_callback(sending.discard)
        finally:
            for task in (*executing, *sending):
                task.cancel()
            await asyncio.gather(*executing, *sending, return_exceptions=True)

    async def _execute(
        self, queue: asyncio.Queue[tuple[str, float]], work_s: float, batcher: _Batcher
    ) -> None:
        while True:
            task_id, arrived = await queue.get()
            if work_s:
                await asyncio.sleep(work_s)
            batcher.add(task_id, arrived)

    async def _report(self, phase: _Phase, batch: list[tuple[str, float]]) -> None:
        request = pb.SetBatchActivationStatusRequest(
            updates=[
                pb.SetTaskStatusRequest(id=task_id, status=pb.TASK_ACTIVATION_STATUS_COMPLETE)
                for task_id, _ in batch
            ]
        )
        pause_s = 0.0
        while True:
            await asyncio.sleep(pause_s)
            started = time.perf_counter()
            try:
                await phase.stub.SetBatchActivationStatus(  # type: ignore[misc]
                    request, timeout=RPC_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as error:
                self.tally.answered(REPORT_METHOD, started)
                self.tally.report.errors[error.code().name] += 1
                if error.code() is grpc.StatusCode.NOT_FOUND:
                    return
                pause_s = min(pause_s + _RETRY_STEP_S, _MAX_RETRY_PAUSE_S)
                continue
            self.tally.answered(REPORT_METHOD, started)
            recorded = time.perf_counter()
            for task_id, arrived in batch:
                self.tally.completed((task_id,), (recorded - arrived) * 1000, phase.target)
            return


def _worker_process(index: int, signals: _Signals) -> None:
    asyncio.run(_serve(index, signals))


async def _serve(index: int, signals: _Signals) -> None:
    worker = _PushWorker()
    server = grpc.aio.server()
    push_task = grpc.unary_unary_rpc_method_handler(
        worker.push_task,
        request_deserializer=pb.PushTaskRequest.FromString,
        response_serializer=pb.PushTaskResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(WORKER_SERVICE, {"PushTask": push_task}),)
    )
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        signals.ports.put((index, port))
        while (order := await asyncio.to_thread(signals.orders[index].get)) is not None:
            if order.target not in channels:
                channels[order.target] = grpc.aio.insecure_channel(order.target)
                await asyncio.wait_for(channels[order.target].channel_ready(), _START_TIMEOUT_S)
            stub = pb_grpc.ConsumerServiceStub(channels[order.target])
            worker.prepare(order.plan, stub, order.target)
            signals.prepared.put(index)
            signals.reports.put(await _run_phase(index, worker, signals))
    finally:
        await server.stop(grace=None)
        for channel in channels.values():
            await channel.close()


async def _run_phase(index: int, worker: _PushWorker, signals: _Signals) -> _ProcessReport:
    await asyncio.to_thread(signals.go.wait, _START_TIMEOUT_S)
    cpu_started = time.process_time()
    running = asyncio.create_task(worker.run())
    while not await asyncio.to_thread(signals.stop.wait, _PUBLISH_INTERVAL_S):
        if running.done():
            running.result()  # a crash ends the phase with its exception
        signals.completed[index] = worker.tally.completed_count
    cpu_s = time.process_time() - cpu_started
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    report = worker.tally.report
    report.cpu_s = cpu_s
    return _ProcessReport(report, worker.refused)


class PushWorkerPool:
    """The push worker processes of a session; `endpoints` is the broker's worker_map.

    A context manager: every process is stopped on exit, or killed if it does not end.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        # spawn, not fork: grpc in a forked child is not safe.
        context = multiprocessing.get_context("spawn")
        self._signals = _Signals(
            orders=tuple(context.Queue() for _ in range(processes)),
            ports=context.Queue(),
            prepared=context.Queue(),
            go=context.Event(),
            stop=context.Event(),
            completed=context.Array("q", processes),
            reports=context.Queue(),
        )
        self._children = [
            context.Process(
                target=_worker_process,
                args=(index, self._signals),
                name=f"loadtest-push-workers-{index}",
                daemon=True,
            )
            for index in range(processes)
        ]
        self._ports: list[int] = []

    def __repr__(self) -> str:
        return f"<PushWorkerPool {len(self._children)} processes on {self.endpoints}>"

    @property
    def processes(self) -> int:
        return len(self._children)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(f"{HOST}:{port}" for port in self._ports)

    def __enter__(self) -> PushWorkerPool:
        for child in self._children:
            child.start()
        try:
            ports = dict(self._signals.ports.get(timeout=_START_TIMEOUT_S) for _ in self._children)
        except BaseException:
            self.__exit__()
            raise
        self._ports = [ports[index] for index in range(len(self._children))]
        return self

    def __exit__(self, *_: object) -> None:
        self._signals.stop.set()
        self._signals.go.set()
        for orders in self._signals.orders:
            orders.put(None)
        for child in self._children:
            child.join(timeout=RPC_TIMEOUT_S)
            if child.is_alive():
                child.kill()
                child.join(timeout=RPC_TIMEOUT_S)

    def prepare(self, target: str, plan: PushPlan) -> None:
        """Every process takes pushes for the next phase, reporting to `target`; call it
        before the phase's tasks are produced."""
        self._signals.go.clear()
        self._signals.stop.clear()
        for index in range(self.processes):
            self._signals.completed[index] = 0
            self._signals.orders[index].put(_Order(target, plan))
        for _ in self._children:
            self._signals.prepared.get(timeout=_START_TIMEOUT_S)

    def run(
        self,
        *,
        until_completed: int,
        max_seconds: float,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> PushRun:
        """Execute and report until `until_completed` results are acknowledged or
        `max_seconds` pass."""
        started_wall, started = time.time(), time.monotonic()
        self._signals.go.set()
        while (elapsed := time.monotonic() - started) < max_seconds:
            done = sum(self._signals.completed[:])
            if on_progress is not None:
                on_progress(Progress(done, elapsed))
            if done >= until_completed:
                break
            time.sleep(0.2)
        self._signals.stop.set()
        stopped_wall = time.time()
        merged, refused = WorkerReport(), 0
        for _ in self._children:
            found: _ProcessReport = self._signals.reports.get(timeout=RPC_TIMEOUT_S + 30)
            merged.merge(found.report)
            refused += found.refused
        return PushRun(merged, started_wall, stopped_wall, refused)
