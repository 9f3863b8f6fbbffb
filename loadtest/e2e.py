"""End-to-end load test: Kafka → broker → simulated workers, until every task is complete.

Run with `python -m loadtest e2e --store-mode memory --workers 256 --tasks 20000
[--protocol batch --batch 32] [--backlog]`. It starts the embedded Kafka and a `taskbroker
run` process (or uses `--target` and `--kafka` that already run), produces the tasks, runs
the workers, and reports tasks/s, task and per-RPC latency percentiles, errors by status
code, lost and duplicated activations, the broker's CPU (in all, and in µs per completed
task) and memory, and the CPU of Kafka and of the worker processes (the three share the
machine). Everything it started is stopped in `finally` blocks; the broker runs in its own
process group so that nothing of it outlives the run.

The workers start once every task is produced (acknowledged by Kafka), while the broker is
still ingesting them; with `--backlog` they start only once the broker holds every task as
pending and has flushed it: a drain of a backlog, with no ingest during the measurement.

With the broker's metrics on (a free port on 127.0.0.1 for a broker started here), each
phase also reports every actor's mailbox: its high-water mark, which the broker keeps
since it started (so it is read at the phase end and covers the earlier phases of the same
broker), and the time its messages spent in the mailbox during the phase, p50/p99
estimated from the histogram's buckets scraped before and after the phase.

With `--delivery push` the broker pushes instead (`delivery_mode = "push"`): the simulated
push workers of `loadtest.push_workers` start first, on free ports of 127.0.0.1 that the
broker's `worker_map` names, and live for the whole session; `--workers` counts the tasks
they execute at once, over `--processes` processes. Their task latency is the time from a
push's arrival to the answer of the report that carried its result (received → result
recorded); with no simulated work that is what the pull workers' task latency measures too,
the call that carried the result. A push phase also reports the pushes the workers refused.
The first pushes of a phase, which fill the workers' queues while its tasks are produced,
fall before the broker's CPU is read, as the ingest during produce does in a pull phase.

With `--brokers N` (or `--brokers 1,2,4`, one measurement per count) it starts N brokers in
one consumer group on a topic of max(N, 4) partitions (`loadtest.cluster`), and every
worker goes round them as `loadtest.rotation` describes. Each broker's CPU is set beside
the tasks its answers acknowledged. `--kill-one-at S` SIGKILLs the last broker S seconds
into the phase and starts it again on its own file and ports once the survivors hold its
partitions; the tasks are then produced over the phase, and it runs until nothing is left
anywhere, so that lost tasks (none, or the run fails) and duplicates are all counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from actors.embedded_kafka import EmbeddedKafka, free_port
from loadtest.batch_workers import DEFAULT_BATCH, DEFAULT_WAIT_MS, BatchWorkers
from loadtest.broker import (
    HOST,
    BrokerSetup,
    broker_process,
    cpu_seconds,
    cpu_share,
    cpu_us_per_task,
    create_topics,
    memory_mb,
)

# Re-exported: they lived here before loadtest.broker, and tests import them from here.
from loadtest.cluster import Background, Cluster, KillOne, running_cluster
from loadtest.exposition import (
    buckets_by_label,
    observed_between,
    samples_by_label,
    scrape,
)
from loadtest.producer import TaskSpec, produce_tasks, task_ids
from loadtest.push_workers import (
    DEFAULT_FLUSH_INTERVAL_MS,
    PushDelivery,
    PushPlan,
    PushWorkerPool,
)
from loadtest.report import machine
from loadtest.workers import (
    Progress,
    UnaryWorkers,
    WorkerKind,
    WorkerReport,
    complete_tasks,
    coroutines_per_process,
    run_workers,
)


@dataclass(frozen=True, slots=True)
class Phase:
    """One measured run of workers against a broker, until `tasks` tasks are complete."""

    workers: int = 256
    processes: int = 4
    tasks: int = 20_000
    work_ms: float = 0.0
    param_bytes: int = 512
    max_seconds: float = 120.0
    kind: WorkerKind | PushDelivery = field(default_factory=UnaryWorkers)
    """The worker protocol, or push delivery; `workers` counts the tasks held at once."""
    backlog: bool = False
    """Start the workers once the broker has ingested and flushed every task."""

    @property
    def worker_processes(self) -> int:
        """No more processes than coroutines, so that every process has a full share."""
        return min(self.processes, math.ceil(self.workers / self.kind.batch))

    @property
    def threads_per_process(self) -> int:
        """Coroutines per worker process (push: those that execute tasks)."""
        if isinstance(self.kind, PushDelivery):
            return self.kind.plan(self.workers, self.worker_processes, 0.0).coroutines
        return coroutines_per_process(self.kind, self.workers, self.worker_processes)


_DEFAULT = Phase()
_WARM_UP_TASKS = 5
"""Completed before the first measured phase, so that the consumer has joined its group."""
_WARM_UP_TIMEOUT_S = 60.0


# --- the broker's /metrics ---------------------------------------------------------------------

STATE_ACTOR = "state"
"""The actor every claim and result goes through: the first to look at for the limit."""
MAILBOX_WAIT = "taskbroker_mailbox_wait_seconds"
MAILBOX_HIGH_WATER = "taskbroker_mailbox_high_water_messages"
_ACTIVATIONS = "taskbroker_state_activations"
_DIRTY = "taskbroker_state_dirty_records"
_FLUSH_OUTSTANDING = "taskbroker_state_flush_outstanding"
_INGEST_POLL_S = 0.25


def mailboxes(before: str, after: str) -> dict[str, dict[str, Any]]:
    """Every actor's mailbox over a phase, from scrapes before and after it: the high-water
    mark at the end (kept since the broker started), and the messages taken during the
    phase with their time in the mailbox, p50/p99 in ms."""
    waits_before = buckets_by_label(before, MAILBOX_WAIT, "actor")
    waits_after = buckets_by_label(after, MAILBOX_WAIT, "actor")
    high_water = samples_by_label(after, MAILBOX_HIGH_WATER, "actor")
    result: dict[str, dict[str, Any]] = {}
    for actor in sorted(high_water.keys() | waits_after.keys()):
        waited = observed_between(waits_before.get(actor), waits_after.get(actor))
        result[actor] = {
            "high_water": int(high_water[actor]) if actor in high_water else None,
            "messages": waited.get("count", 0),
            "wait_p50_ms": waited.get("p50_ms"),
            "wait_p99_ms": waited.get("p99_ms"),
        }
    return result


def backlog_ingested(exposition: str, tasks: int) -> bool:
    """Whether the broker holds at least `tasks` pending activations with nothing left to
    flush (a sqlite-direct broker has no flush: those gauges are absent)."""
    pending = samples_by_label(exposition, _ACTIVATIONS, "status").get("pending", 0.0)
    unflushed = sum(samples_by_label(exposition, _DIRTY, "").values()) + sum(
        samples_by_label(exposition, _FLUSH_OUTSTANDING, "").values()
    )
    return pending >= tasks and unflushed == 0


def wait_backlog_ingested(url: str, tasks: int, timeout_s: float) -> None:
    """Raises TimeoutError when the broker has not ingested `tasks` in `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not backlog_ingested(scrape(url), tasks):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the broker had not ingested {tasks} tasks in {timeout_s} s")
        time.sleep(_INGEST_POLL_S)


# --- one run --------------------------------------------------------------------------------


def _shown(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(result: dict[str, Any]) -> str:
    """One phase in one line: what it ran, tasks/s, task latency, the broker's CPU per task
    and the state actor's mailbox."""
    latency = result["task_latency_ms"]
    cpu = result.get("broker", {}).get("cpu_us_per_task")
    state = result.get("mailboxes", {}).get(STATE_ACTOR, {})
    protocol = result["protocol"] + (f" x{result['batch']}" if result["batch"] > 1 else "")
    return (
        f"{result['store_mode']}, {result['commit_delay_ms']} ms commits, {protocol}, "
        f"{result['workers']} workers{', backlog' if result['backlog'] else ''}: "
        f"{result['tasks_per_s']:,.0f} tasks/s, "
        f"task p50 {latency['p50']:,.1f} ms, p99 {latency['p99']:,.1f} ms, "
        f"broker CPU {_shown(cpu)} µs/task, state mailbox high water "
        f"{_shown(state.get('high_water'))}, wait p99 {_shown(state.get('wait_p99_ms'), ',.2f')} "
        f"ms, {result['lost']} lost, {result['duplicates']} duplicates, {result['errors']} errors"
        + (f", {result['refused_pushes']} pushes refused" if "refused_pushes" in result else "")
    )


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 2)}


def _progress_line(total: int) -> Any:
    def show(progress: Progress) -> None:
        rate = progress.completed / progress.elapsed_s if progress.elapsed_s else 0.0
        width = 30
        filled = int(width * min(progress.completed / total, 1.0)) if total else width
        bar = "#" * filled + "." * (width - filled)
        print(
            f"\r  [{bar}] {progress.completed:>8,}/{total:,} {rate:8,.0f}/s "
            f"{progress.elapsed_s:6.1f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    return show


def summarize(
    phase: Phase,
    produced: list[str],
    report: WorkerReport,
    started_wall: float,
    stopped_wall: float,
) -> dict[str, Any]:
    """The phase's numbers: every produced id must be completed once and handed out once."""
    produced_set, completed_set = set(produced), set(report.completed)
    completed = len(completed_set & produced_set)
    finished_at = report.last_completion if report.completed else stopped_wall
    seconds = max(finished_at - started_wall, 1e-9)
    all_latencies = [v for values in report.latencies_ms.values() for v in values]
    lost = len(produced_set - completed_set)
    return {
        "protocol": phase.kind.name,
        "batch": phase.kind.batch,
        "backlog": phase.backlog,
        "workers": phase.workers,
        "processes": phase.worker_processes,
        "coroutines": phase.worker_processes * phase.threads_per_process,
        "tasks": phase.tasks,
        "work_ms": phase.work_ms,
        "param_bytes": phase.param_bytes,
        "completed": completed,
        "timed_out": lost > 0,
        "seconds": round(seconds, 3),
        "tasks_per_s": round(completed / seconds, 1),
        "task_latency_ms": percentiles(report.task_latencies_ms),
        "latency_ms": percentiles(all_latencies),
        "latency_ms_by_method": {m: percentiles(v) for m, v in report.latencies_ms.items()},
        "rpcs": len(all_latencies),
        "errors": sum(report.errors.values()),
        "errors_by_code": dict(report.errors),
        "empty_polls": report.empty_polls,
        "lost": lost,
        "duplicates": len(report.received) - len(set(report.received)),
        "unexpected": len(completed_set - produced_set),
        "workers_cpu": cpu_share(report.cpu_s, stopped_wall - started_wall),
    }


class Session:
    """A broker under test and the Kafka topic it consumes; each `run` is one phase."""

    def __init__(
        self,
        setup: BrokerSetup,
        bootstrap: str,
        topic: str,
        target: str,
        broker_pid: int | None,
        *,
        kafka_pid: int | None,
        push_pool: PushWorkerPool | None = None,
    ) -> None:
        self.setup = setup
        self.bootstrap = bootstrap
        self.topic = topic
        self.target = target
        self.broker_pid = broker_pid
        self.kafka_pid = kafka_pid
        self.push_pool = push_pool
        """The push workers the broker's worker_map names; None for pull delivery."""
        self._runs = 0

    def __repr__(self) -> str:
        return f"<Session {self.setup.store_mode} at {self.target}, topic {self.topic}>"

    def warm_up(self) -> None:
        """Produce and complete a few tasks, unmeasured: from this process, or through the
        push workers.

        Raises TimeoutError when they are not all complete in time.
        """
        self._runs += 1
        ids = task_ids(f"{self.topic}-{self._runs}", _WARM_UP_TASKS)
        if self.push_pool is not None:
            self.push_pool.prepare(self.target, PushPlan(1, _WARM_UP_TASKS))
        produce_tasks(self.bootstrap, self.topic, ids, TaskSpec(param_bytes=16))
        if self.push_pool is None:
            complete_tasks((self.target,), _WARM_UP_TASKS, _WARM_UP_TIMEOUT_S)
            return
        warm = self.push_pool.run(until_completed=_WARM_UP_TASKS, max_seconds=_WARM_UP_TIMEOUT_S)
        if len(warm.report.completed) < _WARM_UP_TASKS:
            raise TimeoutError(f"{len(warm.report.completed)} of {_WARM_UP_TASKS} warm-up tasks")

    def run(self, phase: Phase, *, progress: bool = True) -> dict[str, Any]:
        """Produce the phase's tasks, then run its workers until all are complete (or time
        is up); the result also carries the broker's CPU, memory and mailboxes, and Kafka's
        CPU, over the phase.

        Raises ValueError for a backlog phase without the broker's metrics, or a phase whose
        delivery is not the broker's, and TimeoutError when its backlog is not ingested within
        the phase's `max_seconds`.
        """
        url = self.setup.metrics_url
        if phase.backlog and url is None:
            raise ValueError("a backlog phase needs the broker's metrics to see ingest end")
        self._prepare_push(phase)
        self._runs += 1
        ids = task_ids(f"{self.topic}-{self._runs}", phase.tasks)
        producing = time.monotonic()
        produce_tasks(self.bootstrap, self.topic, ids, TaskSpec(param_bytes=phase.param_bytes))
        timings = {"produce_s": round(time.monotonic() - producing, 2)}
        if phase.backlog and url is not None:
            wait_backlog_ingested(url, phase.tasks, phase.max_seconds)
            timings["backlog_ingested_s"] = round(time.monotonic() - producing, 2)
        before = scrape(url) if url is not None else None
        broker_cpu = _cpu_of(self.broker_pid)
        kafka_cpu = _cpu_of(self.kafka_pid)
        report, started_wall, stopped_wall, pushes = self._work(
            phase, _progress_line(phase.tasks) if progress else None
        )
        if progress:
            print(file=sys.stderr)
        wall_s = stopped_wall - started_wall
        result = {
            "store_mode": self.setup.store_mode,
            "commit_delay_ms": self.setup.commit_delay_ms,
            **summarize(phase, ids, report, started_wall, stopped_wall),
            **pushes,
            **timings,
        }
        if self.broker_pid is not None:
            cpu_s = cpu_seconds(self.broker_pid) - broker_cpu
            result["broker"] = {
                **cpu_share(cpu_s, wall_s),
                "cpu_us_per_task": cpu_us_per_task(cpu_s, result["completed"]),
                **memory_mb(self.broker_pid),
            }
        if self.kafka_pid is not None:
            result["kafka_cpu"] = cpu_share(cpu_seconds(self.kafka_pid) - kafka_cpu, wall_s)
        # After the CPU is read: a scrape costs the broker CPU of its own.
        if before is not None and url is not None:
            result["mailboxes"] = mailboxes(before, scrape(url))
        return result

    def _prepare_push(self, phase: Phase) -> None:
        """Push delivery: give the push workers the phase's plan before its tasks exist,
        since the broker pushes them as soon as it has them.

        Raises ValueError for a phase whose delivery is not the broker's, and for a push
        phase with a backlog (a push broker pushes while it ingests).
        """
        pool = self.push_pool
        if isinstance(phase.kind, PushDelivery) != (pool is not None):
            raise ValueError(f"a {phase.kind.name} phase against a {self.setup.delivery} broker")
        if pool is None or not isinstance(phase.kind, PushDelivery):
            return
        if phase.backlog:
            raise ValueError("a push broker pushes while it ingests: no backlog phase")
        pool.prepare(
            self.target, phase.kind.plan(phase.workers, pool.processes, phase.work_ms / 1000)
        )

    def _work(
        self, phase: Phase, on_progress: Callable[[Progress], None] | None
    ) -> tuple[WorkerReport, float, float, dict[str, int]]:
        """Run the phase's workers: the report, when they started and stopped (wall clock),
        and the pushes refused (push delivery only)."""
        if not isinstance(phase.kind, PushDelivery):
            report, started_wall, stopped_wall = run_workers(
                (self.target,),
                processes=phase.worker_processes,
                threads=phase.threads_per_process,
                work_ms=phase.work_ms,
                until_completed=phase.tasks,
                max_seconds=phase.max_seconds,
                kind=phase.kind,
                on_progress=on_progress,
            )
            return report, started_wall, stopped_wall, {}
        if self.push_pool is None:
            raise ValueError("a push phase against a pull broker")
        pushed = self.push_pool.run(
            until_completed=phase.tasks, max_seconds=phase.max_seconds, on_progress=on_progress
        )
        return (
            pushed.report,
            pushed.started_wall,
            pushed.stopped_wall,
            {"refused_pushes": pushed.refused},
        )


def _cpu_of(pid: int | None) -> float:
    return cpu_seconds(pid) if pid is not None else 0.0


@contextmanager
def session(
    setup: BrokerSetup,
    *,
    bootstrap: str | None = None,
    target: str | None = None,
    topic: str | None = None,
    broker_pid: int | None = None,
    kafka_pid: int | None = None,
    push_processes: int = _DEFAULT.processes,
) -> Iterator[Session]:
    """A warmed-up broker to run phases against. Without `bootstrap` it starts the embedded
    Kafka; without `target` it starts a broker on a new topic. With `target`, `topic` names
    the topic that broker consumes. `broker_pid` and `kafka_pid`, when known, are measured.
    A push broker (`setup.delivery`) gets `push_processes` push workers, started first.

    Raises ValueError for a push broker with `target`: its worker_map must name workers
    started here."""
    with ExitStack() as stack:
        if bootstrap is None:
            kafka = stack.enter_context(EmbeddedKafka(port=free_port(HOST)))
            bootstrap, kafka_pid = kafka.bootstrap, kafka.pid
        push_pool = None
        if setup.delivery == "push":
            if target is not None:
                raise ValueError("push delivery needs a broker started here, not --target")
            push_pool = stack.enter_context(PushWorkerPool(push_processes))
            setup = replace(setup, worker_endpoints=push_pool.endpoints)
        if target is None:
            topic = f"loadtest-{uuid.uuid4().hex[:8]}"
            create_topics(bootstrap, topic)
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadtest-")))
            broker = stack.enter_context(broker_process(setup, bootstrap, topic, workdir))
            target, broker_pid = broker.target, broker.pid
        if topic is None:
            raise ValueError("a --target broker needs the topic it consumes")
        under_test = Session(
            setup, bootstrap, topic, target, broker_pid, kafka_pid=kafka_pid, push_pool=push_pool
        )
        under_test.warm_up()
        yield under_test


# --- several brokers in one consumer group -------------------------------------------------

MIN_PARTITIONS = 4
"""A multi-broker topic has max(brokers, this) partitions: a broker killed in a run leaves
partitions to hand over, and the count is one for 1, 2 and 4 brokers alike."""
KILL_DEADLINE_S = 30
"""A kill-one phase's processing deadline: longer than the broker is down, so that results
held for it are still wanted when it is back, and short enough that a task claimed durably
whose answer died with the broker is handed out again within the run. The restarted broker
resets no deadline for its first 60 s, so such a task waits that long: in a 2-broker run
with 16 workers, 6 rows stayed processing until 57 s after the restart."""
_RESTART_RESET_SKIP_S = 60.0
"""A restarted broker resets no deadline this long (upkeep's default), so that workers
holding its tasks can report: part of the kill-one phase's time bound."""
_KILL_PRODUCE_CHUNKS = 10
_JOIN_TIMEOUT_S = 120.0


def partitions_for(brokers: int) -> int:
    return max(brokers, MIN_PARTITIONS)


def chunked(ids: list[str], chunks: int) -> list[list[str]]:
    """`ids` in at most `chunks` consecutive runs of nearly equal length, none empty."""
    size = max(math.ceil(len(ids) / chunks), 1)
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def produce_paced(
    stop: threading.Event,
    *,
    bootstrap: str,
    topic: str,
    chunks: list[list[str]],
    spec: TaskSpec,
    window_s: float,
) -> None:
    """Produce `chunks` one at a time, evenly over `window_s` from now, until `stop`."""
    started = time.monotonic()
    for number, chunk in enumerate(chunks, start=1):
        due = started + number * window_s / len(chunks)
        if stop.wait(max(due - time.monotonic(), 0.0)):
            return
        produce_tasks(bootstrap, topic, chunk, spec)


def run_brokers(
    setup: BrokerSetup,
    phase: Phase,
    count: int,
    *,
    bootstrap: str,
    kafka_pid: int | None,
    kill_one_at_s: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One phase against `count` brokers in one consumer group on a new topic, the workers
    spread over them. Its result adds to a one-broker phase's numbers each broker's
    completed tasks (those its answers acknowledged), CPU and memory, and, with
    `kill_one_at_s`, the kill and restart's timeline.

    Without a kill the tasks are produced before the workers start, as in one-broker
    phases. With one, half is, and the rest over the kill and the session timeouts after
    it, so that new messages reach the dead broker's partitions; the phase then runs
    until every broker has nothing left and the group has committed every partition to its
    end, or its time bound.
    """
    if isinstance(phase.kind, PushDelivery) or phase.backlog:
        raise ValueError("several brokers: pull workers, tasks produced as the run goes")
    topic = f"loadtest-{uuid.uuid4().hex[:8]}"
    with running_cluster(setup, bootstrap, topic, count, partitions_for(count)) as cluster:
        assigned = cluster.wait_settled()
        warm_up = task_ids(f"{topic}-warm", _WARM_UP_TASKS * count)
        produce_tasks(bootstrap, topic, warm_up, TaskSpec(param_bytes=16))
        complete_tasks(cluster.targets, len(warm_up), _WARM_UP_TIMEOUT_S)
        ids = task_ids(f"{topic}-phase", phase.tasks)
        spec = TaskSpec(param_bytes=phase.param_bytes)
        background: list[Background] = []
        kill = None
        max_seconds = phase.max_seconds
        if kill_one_at_s is None:
            produce_tasks(bootstrap, topic, ids, spec)
        else:
            kill = KillOne(cluster, count - 1, kill_one_at_s)
            produce = _produce_around_a_kill(cluster, ids, spec, kill_one_at_s)
            background = [produce, Background("loadtest-kill", kill)]
            session_s = setup.session_timeout_ms / 1000
            max_seconds += kill_one_at_s + 3 * session_s + _RESTART_RESET_SKIP_S + KILL_DEADLINE_S

        def start_background() -> None:
            for task in background:
                task.start()

        def settled() -> bool:
            # Threads first: the cluster is only read once the restarted broker is back.
            return all(task.done for task in background) and cluster.idle() and cluster.caught_up()

        broker_cpu = [cluster.cpu_s(index) for index in range(count)]
        kafka_cpu = _cpu_of(kafka_pid)
        try:
            report, started_wall, stopped_wall = run_workers(
                cluster.targets,
                processes=phase.worker_processes,
                threads=phase.threads_per_process,
                work_ms=phase.work_ms,
                until_completed=phase.tasks,
                max_seconds=max_seconds,
                kind=phase.kind,
                on_started=start_background,
                on_progress=_progress_line(phase.tasks) if progress else None,
                settled=settled if background else None,
            )
        finally:
            for task in background:
                task.stop.set()
        for task in background:
            task.join(_JOIN_TIMEOUT_S)
        if progress:
            print(file=sys.stderr)
        wall_s = stopped_wall - started_wall
        result: dict[str, Any] = {
            "brokers": count,
            "partitions": cluster.partitions,
            "store_mode": setup.store_mode,
            "commit_delay_ms": setup.commit_delay_ms,
            **summarize(phase, ids, report, started_wall, stopped_wall),
            "duplicates_by_source": duplicates_by_source(report),
        }
        spent = [cluster.cpu_s(index) - broker_cpu[index] for index in range(count)]
        result["per_broker"] = [
            {
                "index": slot.index,
                "target": slot.target,
                "partitions_at_start": assigned[slot.index],
                **_broker_share(spent[slot.index], report.completed_by_target[slot.target], wall_s),
                **cluster.memory(slot.index),
            }
            for slot in cluster.slots
        ]
        result["brokers_cpu"] = {
            **cpu_share(sum(spent), wall_s),
            "cpu_us_per_task": cpu_us_per_task(sum(spent), result["completed"]),
        }
        if kafka_pid is not None:
            result["kafka_cpu"] = cpu_share(cpu_seconds(kafka_pid) - kafka_cpu, wall_s)
        if kill is not None:
            result["kill_one"] = asdict(kill.timeline)
        return result


def _produce_around_a_kill(
    cluster: Cluster, ids: list[str], spec: TaskSpec, kill_one_at_s: float
) -> Background:
    """Produce half the phase's tasks now, so that a broker killed early in the phase has
    work pending and in flight, and the rest, once started, in chunks over the kill and two
    session timeouts after it: past the survivors' takeover and the restart.

    With a twentieth up front instead, 2 brokers and 256 workers drained each chunk in a
    fifth of the time between two, and the broker killed at 5 s held nothing when it came
    back: the run showed no restart on a file with work in it."""
    spec = replace(spec, processing_deadline_s=KILL_DEADLINE_S)
    half = len(ids) // 2
    rest = chunked(ids[half:], _KILL_PRODUCE_CHUNKS)
    produce_tasks(cluster.bootstrap, cluster.topic, ids[:half], spec)
    window_s = kill_one_at_s + 2 * cluster.setup.session_timeout_ms / 1000
    produce = partial(
        produce_paced,
        bootstrap=cluster.bootstrap,
        topic=cluster.topic,
        chunks=rest,
        spec=spec,
        window_s=window_s,
    )
    return Background("loadtest-produce", produce)


def duplicates_by_source(report: WorkerReport) -> dict[str, int]:
    """Duplicates by where the second copy came from: the broker that had handed the task
    out already (a claim it lost at a crash, handed out again), or another broker (the
    message consumed by two brokers, one of them past an offset the other had not yet
    committed)."""
    sources: dict[str, set[str]] = {}
    for task_id, target in zip(report.received, report.received_from, strict=True):
        sources.setdefault(task_id, set()).add(target)
    across = sum(len(targets) - 1 for targets in sources.values())
    return {
        "same_broker": len(report.received) - len(sources) - across,
        "across_brokers": across,
    }


def _broker_share(cpu_s: float, completed: int, wall_s: float) -> dict[str, Any]:
    """One broker's tasks (those its answers acknowledged) and its CPU over a phase."""
    return {
        "completed": completed,
        **cpu_share(cpu_s, wall_s),
        "cpu_us_per_task": cpu_us_per_task(cpu_s, completed),
    }


def brokers_line(result: dict[str, Any]) -> str:
    """A multi-broker phase in one line: tasks/s, each broker's share and CPU, the
    restart's timeline, and the accounting."""
    protocol = result["protocol"] + (f" x{result['batch']}" if result["batch"] > 1 else "")
    shares = "; ".join(
        f"broker {b['index']}: {b['completed']:,} tasks, {b['cpu_percent']:.0f}% CPU, "
        f"{_shown(b['cpu_us_per_task'])} µs/task"
        for b in result["per_broker"]
    )
    line = (
        f"{result['brokers']} brokers ({result['partitions']} partitions), "
        f"{result['store_mode']}, {protocol}, {result['workers']} workers: "
        f"{result['tasks_per_s']:,.0f} tasks/s; {shares}; "
        f"Kafka {_shown(result.get('kafka_cpu', {}).get('cpu_percent'))}% CPU, "
        f"workers {result['workers_cpu']['cpu_percent']:.0f}% CPU; "
        f"{result['lost']} lost, {result['duplicates']} duplicates"
    )
    sources = result.get("duplicates_by_source")
    if result["duplicates"] and sources is not None:
        line += (
            f" ({sources['same_broker']} from the same broker, "
            f"{sources['across_brokers']} from another)"
        )
    line += f", {result['errors']} errors"
    timeline = result.get("kill_one")
    if timeline is not None:
        line += (
            f"; broker {timeline['broker']} killed at {_shown(timeline['killed_at_s'], '.1f')} s"
            f", taken over {_shown(timeline['taken_over_at_s'], '.1f')} s"
            f", back {_shown(timeline['back_at_s'], '.1f')} s"
            f", drained {_shown(timeline['drained_at_s'], '.1f')} s"
        )
    return line


def accounted(result: dict[str, Any]) -> bool:
    """Every task complete and none unexpected; duplicates only where a broker was killed."""
    duplicates_allowed = "kill_one" in result
    return (
        result["lost"] == 0
        and result["unexpected"] == 0
        and (duplicates_allowed or result["duplicates"] == 0)
    )


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest e2e", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the result to this file")
    parser.add_argument("--store-mode", choices=("memory", "sqlite-direct"), default="memory")
    parser.add_argument("--workers", type=int, default=_DEFAULT.workers, help="concurrent workers")
    parser.add_argument(
        "--processes", type=int, default=_DEFAULT.processes, help="worker processes"
    )
    parser.add_argument("--tasks", type=int, default=_DEFAULT.tasks)
    parser.add_argument("--protocol", choices=("unary", "batch"), default="unary")
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="batch: tasks per worker coroutine"
    )
    parser.add_argument(
        "--wait-ms", type=int, default=DEFAULT_WAIT_MS, help="batch: a fetch's wait when idle"
    )
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="start the workers once the broker has ingested every task",
    )
    parser.add_argument(
        "--delivery",
        choices=("pull", "push"),
        default="pull",
        help="push: the broker pushes to simulated push workers (loadtest.push_workers)",
    )
    parser.add_argument(
        "--push-queue",
        type=int,
        help="push: tasks a worker process queues (default: as many as it executes)",
    )
    parser.add_argument(
        "--push-flush-ms",
        type=float,
        default=DEFAULT_FLUSH_INTERVAL_MS,
        help="push: a worker reports what it has this long after a batch's first result",
    )
    parser.add_argument("--work-ms", type=float, default=0.0, help="simulated work per task")
    parser.add_argument("--commit-delay-ms", type=int, default=0, help="SQLite commit delay")
    parser.add_argument("--param-bytes", type=int, default=_DEFAULT.param_bytes)
    parser.add_argument("--max-seconds", type=float, default=_DEFAULT.max_seconds)
    parser.add_argument("--grpc-max-workers", type=int, help="broker handler threads")
    parser.add_argument("--target", help="HOST:PORT of a running broker (with --kafka, --topic)")
    parser.add_argument("--kafka", help="bootstrap servers of a running Kafka")
    parser.add_argument("--topic", help="the topic the --target broker consumes")
    parser.add_argument("--broker-pid", type=int, help="pid of the --target broker, for CPU/RSS")
    parser.add_argument(
        "--brokers",
        type=broker_counts,
        help="N or N,M,...: N brokers in one consumer group, the workers spread over them; "
        "one measurement per count",
    )
    parser.add_argument(
        "--kill-one-at",
        type=float,
        metavar="S",
        help="with --brokers (2 or more): SIGKILL the last broker S seconds into the phase "
        "and restart it on its own file and ports",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.brokers and (args.target or args.backlog or args.delivery == "push"):
        parser.error("--brokers: not with --target, --backlog or --delivery push")
    if args.kill_one_at is not None and not (args.brokers and min(args.brokers) >= 2):
        parser.error("--kill-one-at needs --brokers of 2 or more")
    if args.target and not (args.kafka and args.topic):
        parser.error("--target needs --kafka and --topic")
    if args.target and args.backlog:
        parser.error("--backlog reads the metrics of a broker started here: not with --target")
    if args.delivery == "push" and (args.target or args.backlog or args.protocol != "unary"):
        parser.error("--delivery push: not with --target, --backlog or --protocol batch")
    kind: WorkerKind | PushDelivery
    try:
        if args.delivery == "push":
            kind = PushDelivery(args.push_queue, args.push_flush_ms)
        elif args.protocol == "batch":
            kind = BatchWorkers(args.batch, args.wait_ms)
        else:
            kind = UnaryWorkers()
    except ValueError as error:
        parser.error(str(error))
    phase = Phase(
        workers=args.workers,
        processes=args.processes,
        tasks=args.tasks,
        work_ms=args.work_ms,
        param_bytes=args.param_bytes,
        max_seconds=args.max_seconds,
        kind=kind,
        backlog=args.backlog,
    )
    if args.brokers:
        return _main_brokers(args, phase)
    setup = BrokerSetup(
        store_mode=args.store_mode,
        commit_delay_ms=args.commit_delay_ms,
        grpc_max_workers=args.grpc_max_workers,
        max_tasks=args.tasks,
        max_workers=args.workers,
        metrics_port=0 if args.target else free_port(HOST),
        delivery=args.delivery,
    )
    with session(
        setup,
        bootstrap=args.kafka,
        target=args.target,
        topic=args.topic,
        broker_pid=args.broker_pid,
        push_processes=args.processes,
    ) as under_test:
        result = under_test.run(phase)
    print(json.dumps(result, indent=2))
    print(summary_line(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["duplicates"] == 0 else 1


def broker_counts(text: str) -> list[int]:
    """`--brokers`: "2" or "1,2,4"."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"broker counts are N or N,M,..., not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"broker counts must be at least 1, not {text!r}")
    return counts


def _main_brokers(args: argparse.Namespace, phase: Phase) -> int:
    setup = BrokerSetup(
        store_mode=args.store_mode,
        commit_delay_ms=args.commit_delay_ms,
        grpc_max_workers=args.grpc_max_workers,
        max_tasks=args.tasks,
        max_workers=args.workers,
    )
    results = []
    with ExitStack() as stack:
        bootstrap, kafka_pid = args.kafka, None
        if bootstrap is None:
            kafka = stack.enter_context(EmbeddedKafka(port=free_port(HOST)))
            bootstrap, kafka_pid = kafka.bootstrap, kafka.pid
        for count in args.brokers:
            result = run_brokers(
                setup,
                phase,
                count,
                bootstrap=bootstrap,
                kafka_pid=kafka_pid,
                kill_one_at_s=args.kill_one_at,
            )
            print(brokers_line(result), flush=True)
            results.append(result)
    print(json.dumps(results, indent=2))
    for result in results:
        print(brokers_line(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"command": " ".join(sys.argv), "runs": results, "machine": machine()}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(accounted(result) for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
