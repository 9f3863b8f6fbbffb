"""Simulated workers: K processes x C coroutines that take tasks from the broker, complete
them, and record everything, until told to stop. The protocol is a `WorkerKind`: unary
workers here (GetTask → simulated work → SetTaskStatus(COMPLETE, fetch_next_task), one task
per call), batch workers in `loadtest.batch_workers`; the processes, the accounting and the
stop and progress machinery are the same for both.

With several brokers, every coroutine has its own `Rotation` over them (the rule, and how
it follows taskbroker-client's pull worker, is in `loadtest.rotation`): it asks one broker
for tasks, reports their results to that broker, and moves on when it answers NOT_FOUND or
UNAVAILABLE; results a broker did not take are parked and sent again once it is back.

Every RPC's latency and status is recorded, and every task id received and completed, so
the run can account for each activation, and each completion is attributed to the broker
whose answer acknowledged it. Two latencies per task:

- its call latency: the latency of the call that carried its result and was answered (one
  value per task, so a batch call of 32 results counts 32 times); with no simulated work,
  what the broker costs a task in a worker's hands, comparable across protocols;
- its first-claim latency: the time from its `received_at` (the producer's clock) to its
  arrival at a worker, meaningful when tasks are produced while the workers wait (`loadtest
  latency`), not when a phase's tasks are all produced before it starts.

Latencies cover every answered RPC except an empty answer to a call that reported nothing
(GetTask's NOT_FOUND, an empty FetchTasks): those are counted as empty polls instead,
because at the end of a run idle workers would otherwise fill the percentiles with cheap
answers.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event as EventType
from typing import Any, ClassVar, Protocol

import grpc

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from loadtest.producer import APPLICATION
from loadtest.rotation import Held, Rotation

RPC_TIMEOUT_S = 10.0
_START_TIMEOUT_S = 60.0
EMPTY_POLL_SLEEP_MS = 20.0
"""After NOT_FOUND a unary worker waits before asking again, as a real worker does."""
_ERROR_SLEEP_S = 0.01
_PUBLISH_INTERVAL_S = 0.1
# Statuses after which a worker sends the same results again (WIRE.md: workers retry).
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# gRPC's default reconnect backoff grows to minutes: after a broker was down for seconds,
# its workers would come back long after it did, and a restart would look slower than it is.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Worker(Protocol):
    """One simulated worker coroutine."""

    @property
    def tally(self) -> Tally: ...

    async def run(self) -> None:
        """Until cancelled (the end of the run)."""


class WorkerKind(Protocol):
    """A worker protocol: how its coroutines are built. It travels to the spawned worker
    processes, so an implementation must pickle (a frozen dataclass does)."""

    @property
    def name(self) -> str: ...

    @property
    def batch(self) -> int:
        """Tasks one coroutine holds at once: `workers` slots take workers / batch of them."""

    def worker(
        self, channels: Mapping[str, grpc.aio.Channel], rotation: Rotation, plan: WorkerPlan
    ) -> Worker:
        """A coroutine with a channel to each broker, starting where `rotation` is."""


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    targets: tuple[str, ...]
    """The brokers, HOST:PORT."""
    threads: int
    """Coroutines per process."""
    work_s: float
    empty_poll_sleep_s: float
    """A unary worker's wait after NOT_FOUND; a batch fetch waits in the broker instead."""
    kind: WorkerKind


def coroutines_per_process(kind: WorkerKind, slots: int, processes: int) -> int:
    """Coroutines in each of `processes` processes so that together they hold `slots`
    tasks at once (rounded up, and at least one per process)."""
    return max(1, math.ceil(math.ceil(slots / kind.batch) / processes))


@dataclass
class WorkerReport:
    """One process's record of a run (or several merged); latencies in milliseconds."""

    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    """By method."""
    errors: Counter[str] = field(default_factory=Counter)
    empty_polls: int = 0
    received: list[str] = field(default_factory=list)
    received_from: list[str] = field(default_factory=list)
    """The broker each of `received` came from, in the same order."""
    received_wall: list[float] = field(default_factory=list)
    """When each of `received` arrived (wall clock), in the same order."""
    completed: list[str] = field(default_factory=list)
    completed_wall: list[float] = field(default_factory=list)
    """When the answer acknowledging each of `completed` came (wall clock), in the same order."""
    retried: list[str] = field(default_factory=list)
    """Tasks among `completed` whose result was RETRY."""
    completed_by_target: Counter[str] = field(default_factory=Counter)
    """Completions by the broker whose answer acknowledged them."""
    task_latencies_ms: list[float] = field(default_factory=list)
    """One per completed task: the latency of the call that carried its result."""
    last_completion: float = 0.0
    """Wall-clock time of this process's last completed task."""
    claim_latencies_ms: dict[str, float] = field(default_factory=dict)
    """By task id: its first arrival at a worker minus its `received_at`, both wall clocks."""
    cpu_s: float = 0.0
    """The worker processes' own CPU (all their threads) from go to stop: whether the load
    generator, sharing the machine with the broker, limited the run."""

    def merge(self, other: WorkerReport) -> None:
        for method, values in other.latencies_ms.items():
            self.latencies_ms.setdefault(method, []).extend(values)
        self.errors.update(other.errors)
        self.empty_polls += other.empty_polls
        self.received += other.received
        self.received_from += other.received_from
        self.received_wall += other.received_wall
        self.completed += other.completed
        self.completed_wall += other.completed_wall
        self.retried += other.retried
        self.completed_by_target.update(other.completed_by_target)
        self.task_latencies_ms += other.task_latencies_ms
        self.last_completion = max(self.last_completion, other.last_completion)
        for task_id, latency_ms in other.claim_latencies_ms.items():
            self.claim_latencies_ms.setdefault(task_id, latency_ms)
        self.cpu_s += other.cpu_s


class Tally:
    """What one worker coroutine records, the same way for every protocol; its report is
    its own, merged once the coroutine has stopped."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.report = WorkerReport(latencies_ms={method: [] for method in methods})
        self.completed_count = 0

    def received(self, task: pb.TaskActivation, target: str) -> None:
        arrived = time.time()
        self.report.received.append(task.id)
        self.report.received_from.append(target)
        self.report.received_wall.append(arrived)
        if task.HasField("received_at"):
            produced = task.received_at.seconds + task.received_at.nanos / 1e9
            self.report.claim_latencies_ms.setdefault(task.id, (arrived - produced) * 1000)

    def answered(self, method: str, started: float) -> float:
        """Record a call answered (or failed) now that began at `started` (perf_counter);
        its latency in ms."""
        latency_ms = (time.perf_counter() - started) * 1000
        self.report.latencies_ms[method].append(latency_ms)
        return latency_ms

    def completed(self, ids: Iterable[str], call_ms: float, target: str) -> None:
        """Tasks whose results one answered call of `call_ms` to `target` carried."""
        before = len(self.report.completed)
        self.report.completed.extend(ids)
        done = len(self.report.completed) - before
        if done:
            now = time.time()
            self.report.completed_by_target[target] += done
            self.report.task_latencies_ms.extend([call_ms] * done)
            self.report.completed_wall.extend([now] * done)
            self.report.last_completion = now
            self.completed_count += done

    def empty_poll(self) -> None:
        self.report.empty_polls += 1

    async def failed(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.answered(method, started)
        self.report.errors[code.name] += 1
        await asyncio.sleep(_ERROR_SLEEP_S)


def report_refused(rotation: Rotation, held: Held, code: grpc.StatusCode) -> None:
    """The broker did not take the results of `held`: pause it if it did not answer, and
    park them unless it never will take them."""
    if code is grpc.StatusCode.UNAVAILABLE:
        rotation.unavailable(held.target, time.monotonic())
    if code in RETRIED_CODES:
        rotation.park(held)


def answers_retry(task: pb.TaskActivation, retry_per_mille: int) -> bool:
    """Whether a worker answers RETRY for `task`: on its first attempt only, for
    `retry_per_mille` tasks in a thousand, chosen by its id, so that a result sent again
    is the same result."""
    if retry_per_mille <= 0 or task.retry_state.attempts > 0:
        return False
    return zlib.crc32(task.id.encode()) % 1000 < retry_per_mille


@dataclass(frozen=True, slots=True)
class UnaryWorkers:
    """ConsumerService: one coroutine per worker slot, one task per call."""

    retry_per_mille: int = 0
    """First attempts answered RETRY, per thousand tasks (`answers_retry`); the rest and
    every retry are answered COMPLETE."""
    name: ClassVar[str] = "unary"
    batch: ClassVar[int] = 1

    def worker(
        self, channels: Mapping[str, grpc.aio.Channel], rotation: Rotation, plan: WorkerPlan
    ) -> Worker:
        return _UnaryWorker(channels, rotation, plan)


class _UnaryWorker:
    """One simulated unary worker.

    Workers are coroutines on one grpc.aio channel per broker and process rather than
    threads: a thread per worker spent more of this machine's two cores on the load
    generator than the broker got."""

    def __init__(
        self, channels: Mapping[str, grpc.aio.Channel], rotation: Rotation, plan: WorkerPlan
    ) -> None:
        self._stubs = {
            target: pb_grpc.ConsumerServiceStub(channel) for target, channel in channels.items()
        }
        self._rotation = rotation
        self._work_s = plan.work_s
        self._empty_poll_sleep_s = plan.empty_poll_sleep_s
        kind = plan.kind
        self._retry_per_mille = kind.retry_per_mille if isinstance(kind, UnaryWorkers) else 0
        self.tally = Tally(("GetTask", "SetTaskStatus"))

    async def run(self) -> None:
        held: Held | None = None
        while True:
            held = await self.step(held)

    async def step(self, held: Held | None) -> Held | None:
        """One RPC: complete the task held, send a parked result again, or ask for a task;
        the task held next."""
        if held is not None:
            if self._work_s:
                await asyncio.sleep(self._work_s)
            return await self._complete(held, fetch_next=True)
        target, parked = self._rotation.next_call(time.monotonic())
        if parked is not None:
            return await self._complete(parked, fetch_next=False)
        return await self._get_task(target)

    async def _get_task(self, target: str) -> Held | None:
        started = time.perf_counter()
        try:
            response = await self._stubs[target].GetTask(  # type: ignore[misc]
                pb.GetTaskRequest(application=APPLICATION), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code is grpc.StatusCode.NOT_FOUND:
                self.tally.empty_poll()
                self._rotation.empty(target)
                await asyncio.sleep(self._empty_poll_sleep_s)
            else:
                await self.tally.failed("GetTask", code, started)
                if code is grpc.StatusCode.UNAVAILABLE:
                    self._rotation.unavailable(target, time.monotonic())
            return None
        self.tally.answered("GetTask", started)
        task: pb.TaskActivation = response.task
        self.tally.received(task, target)
        return Held(target, (task,))

    async def _complete(self, held: Held, *, fetch_next: bool) -> Held | None:
        (task,) = held.tasks
        retry = answers_retry(task, self._retry_per_mille)
        request = pb.SetTaskStatusRequest(
            id=task.id,
            status=pb.TASK_ACTIVATION_STATUS_RETRY if retry else pb.TASK_ACTIVATION_STATUS_COMPLETE,
            fetch_next_task=pb.FetchNextTask(application=APPLICATION) if fetch_next else None,
        )
        started = time.perf_counter()
        try:
            response = await self._stubs[held.target].SetTaskStatus(  # type: ignore[misc]
                request, timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            await self.tally.failed("SetTaskStatus", code, started)
            report_refused(self._rotation, held, code)
            return None
        latency_ms = self.tally.answered("SetTaskStatus", started)
        self.tally.completed((task.id,), latency_ms, held.target)
        if retry:
            self.tally.report.retried.append(task.id)
        if not fetch_next:
            return None
        if not response.HasField("task"):
            self._rotation.empty(held.target)
            return None
        following: pb.TaskActivation = response.task
        self.tally.received(following, held.target)
        return Held(held.target, (following,))


@dataclass(frozen=True, slots=True)
class _Signals:
    """What the parent and the worker processes share."""

    ready: Any  # a multiprocessing Queue: each process puts its index once connected
    go: EventType
    stop: EventType
    completed: SynchronizedArray[int]  # completions so far, one slot per process
    reports: Any  # a multiprocessing Queue of WorkerReport


def _worker_process(index: int, plan: WorkerPlan, signals: _Signals) -> None:
    asyncio.run(_serve_workers(index, plan, signals))


async def _open_channels(
    stack: AsyncExitStack, targets: Iterable[str]
) -> dict[str, grpc.aio.Channel]:
    """A channel to each broker, once it is connected."""
    channels = {
        target: await stack.enter_async_context(
            grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        )
        for target in targets
    }
    for channel in channels.values():
        await asyncio.wait_for(channel.channel_ready(), _START_TIMEOUT_S)
    return channels


async def _serve_workers(index: int, plan: WorkerPlan, signals: _Signals) -> None:
    async with AsyncExitStack() as stack:
        channels = await _open_channels(stack, plan.targets)
        # Numbered across processes, so that the workers start spread over the brokers.
        workers = [
            plan.kind.worker(channels, Rotation(plan.targets, index * plan.threads + k), plan)
            for k in range(plan.threads)
        ]
        signals.ready.put(index)
        await asyncio.to_thread(signals.go.wait, _START_TIMEOUT_S)
        cpu_started = time.process_time()
        running = [asyncio.create_task(worker.run()) for worker in workers]
        # Publish this process's completions for the parent's progress and end condition.
        while not await asyncio.to_thread(signals.stop.wait, _PUBLISH_INTERVAL_S):
            signals.completed[index] = sum(w.tally.completed_count for w in workers)
        cpu_s = time.process_time() - cpu_started
        # Cancelling drops the calls still waiting on a broker that is behind, so a
        # bounded run ends now rather than after the RPC timeout.
        for task in running:
            task.cancel()
        outcomes = await asyncio.gather(*running, return_exceptions=True)
    failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    if failures:
        raise failures[0]  # a worker crashed; cancellation (the normal end) is no Exception
    report = WorkerReport(cpu_s=cpu_s)
    for worker in workers:
        report.merge(worker.tally.report)
    signals.reports.put(report)


def complete_tasks(targets: tuple[str, ...], count: int, timeout_s: float) -> list[str]:
    """One worker in this process completes `count` tasks from `targets` (a warm-up); their
    ids.

    Raises TimeoutError when they are not all complete within `timeout_s`.
    """
    return asyncio.run(_complete_tasks(targets, count, timeout_s))


async def _complete_tasks(targets: tuple[str, ...], count: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    async with AsyncExitStack() as stack:
        channels = await _open_channels(stack, targets)
        plan = WorkerPlan(targets, 1, 0.0, EMPTY_POLL_SLEEP_MS / 1000, UnaryWorkers())
        worker = _UnaryWorker(channels, Rotation(targets, 0), plan)
        held: Held | None = None
        while (done := worker.tally.completed_count) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {count} tasks completed in time")
            held = await worker.step(held)
    return worker.tally.report.completed


@dataclass(frozen=True, slots=True)
class Progress:
    completed: int
    elapsed_s: float


def run_workers(
    targets: tuple[str, ...],
    *,
    processes: int,
    threads: int,
    work_ms: float,
    until_completed: int,
    max_seconds: float,
    empty_poll_sleep_ms: float = EMPTY_POLL_SLEEP_MS,
    kind: WorkerKind | None = None,
    on_started: Callable[[], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    settled: Callable[[], bool] | None = None,
) -> tuple[WorkerReport, float, float]:
    """Run the workers until `until_completed` tasks are complete (and `settled()`, when
    given, says nothing is left to do) or `max_seconds` pass: `threads` coroutines of
    `kind` (default unary) in each of `processes` processes, spread over `targets`.

    `on_started` is called once every worker is connected and told to go. Returns the
    merged report, the wall-clock time the workers started, and when the run stopped.
    Every process is joined, or killed if it does not end in time.
    """
    # spawn, not fork: grpc in a forked child is not safe.
    context = multiprocessing.get_context("spawn")
    ready, reports = context.Queue(), context.Queue()
    go, stop = context.Event(), context.Event()
    completed = context.Array("q", processes)
    signals = _Signals(ready, go, stop, completed, reports)
    plan = WorkerPlan(
        targets, threads, work_ms / 1000, empty_poll_sleep_ms / 1000, kind or UnaryWorkers()
    )
    children = [
        context.Process(
            target=_worker_process,
            args=(index, plan, signals),
            name=f"loadtest-workers-{index}",
            daemon=True,
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()
    merged = WorkerReport()
    try:
        for _ in children:
            ready.get(timeout=_START_TIMEOUT_S)
        started_wall, started = time.time(), time.monotonic()
        go.set()
        if on_started is not None:
            on_started()
        while (elapsed := time.monotonic() - started) < max_seconds:
            done = sum(completed[:])
            if on_progress is not None:
                on_progress(Progress(done, elapsed))
            if done >= until_completed and (settled is None or settled()):
                break
            time.sleep(0.2)
        stop.set()
        stopped_wall = time.time()
        for _ in children:
            merged.merge(reports.get(timeout=RPC_TIMEOUT_S + 30))
    finally:
        stop.set()
        go.set()
        for child in children:
            child.join(timeout=RPC_TIMEOUT_S)
            if child.is_alive():
                child.kill()
                child.join(timeout=RPC_TIMEOUT_S)
    return merged, started_wall, stopped_wall
