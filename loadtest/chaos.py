"""`python -m loadtest chaos`: many crashes at bad moments, with Kafka and the disk failing
too, under load, and every activation accounted for.

It starts a Tansu (the embedded Kafka) of its own on a free loopback port, outside the
broker's process, a `taskbroker run` on one SQLite file (on a tmpfs it mounts, so that it
can fill the disk), and worker processes (`loadtest.workers`) that park a result the
broker did not take and send it again, as real workers do; a share of first attempts is
answered RETRY, so the broker has retries to produce. It produces the activations over the
run at `--rate`, and applies, in time order (`loadtest.chaos_faults.plan`):

- `--kills` SIGKILLs of the broker at random moments, `--aimed-kills` of them once the
  broker's metrics show a flush with the writer (the commit is slowed by
  `--commit-delay-ms` so that flushes are wide), each followed by a restart on the same
  file and ports;
- Kafka unreachable for `--kafka-stop-s` (SIGSTOP, then SIGCONT, of the Tansu process), a
  burst of tasks ingested just before, so that gRPC has something to keep serving; /readyz
  and the metrics are sampled every second;
- the retry producer failing: Kafka stopped for `--retry-stop-s` while retries are due;
- the disk full for `--disk-full-s`: a ballast file fills the database's tmpfs;
- the database locked for `--lock-s` by another process holding `BEGIN EXCLUSIVE`.

Then it waits until the broker holds nothing and its group has committed every offset,
and reports (`loadtest.chaos_report`): lost activations (must be 0), duplicate executions
against the bound the flush window implies, the time to drain after the last fault, every
fault applied with its times and its effect on tasks/s and p99, and what was seen during
each window. `--json PATH` writes it all; the HTML page (`--html PATH`, by default
`loadtest/results/<date>/chaos.html`) plots tasks/s over the run with the faults marked.

Bounded: every fault has its length, the run its time limit (`--max-seconds`, derived by
default); everything it started is stopped, and the tmpfs unmounted, on the way out,
Ctrl-C and SIGTERM included. The exit code is 0 only when nothing was lost, duplicates are
within the bound, and every planned fault was applied and did what it should.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from loadtest.broker import HOST, BrokerSetup, create_topics, tail
from loadtest.chaos_faults import (
    DB_LOCKED,
    DISK_FULL,
    KAFKA_UNREACHABLE,
    KILL,
    RETRY_PRODUCER_FAILING,
    Planned,
    SmallDisk,
    exclusive_lock,
    pause_group,
    plan,
    resume_group,
)
from loadtest.chaos_report import (
    Executions,
    KillExposure,
    account,
    duplicate_bound,
    exposure_window_s,
    longest_flush_s,
    outside_windows,
    rate_series,
    render_html,
    sorted_completions,
    window_stats,
)
from loadtest.cluster import Background, Cluster
from loadtest.e2e import chunked, produce_paced
from loadtest.exposition import histogram_buckets, samples_by_label, scrape
from loadtest.producer import TaskSpec, produce_tasks, task_ids
from loadtest.report import machine
from loadtest.workers import UnaryWorkers, WorkerReport, complete_tasks, run_workers

_ACTIVATIONS = "taskbroker_state_activations"
_FLUSH_DURATION = "taskbroker_writer_flush_duration_seconds"
_SAMPLE_INTERVAL_S = 1.0
_AIM_TIMEOUT_S = 5.0
_INGEST_TIMEOUT_S = 20.0
_WARM_UP_TASKS = 5
_WARM_UP_TIMEOUT_S = 90.0
_DRAIN_ALLOWANCE_S = 240.0
_RESTART_ALLOWANCE_S = 20.0
_EXPECTED_RESTART_S = 9.0
_EXPECTED_RECOVERY_S = 6.0
_JOIN_TIMEOUT_S = 120.0
_KAFKA_TIMEOUT_S = 10.0
_AUDIT_TIMEOUT_S = 120.0
_LOG_TAIL_LINES = 60
_CHUNK_S = 2.0
"""The producer sends a chunk of tasks every this many seconds (each chunk is a new
producer that waits for its acknowledgements: about a second)."""
_INGESTED = "taskbroker_kafka_activations_ingested_total"
BURST_DELAY_S = 12
"""Longer than producing a burst and its ingest take, so that it is still held back when
the fault starts."""
_BURST_LEAD_S = 1.0
DISK_BURST_BYTES = 16 << 20
_RECOVERY_LIMIT_S = 30.0
_RECOVERY_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    tasks: int = 100_000
    rate: float = 150.0
    """Activations produced per second: the run's length is tasks / rate."""
    kills: int = 20
    aimed_kills: int = 10
    kafka_stop_s: float = 30.0
    retry_stop_s: float = 15.0
    disk_full_s: float = 20.0
    lock_s: float = 10.0
    commit_delay_ms: int = 100
    flush_interval_ms: int = 50
    retry_per_mille: int = 50
    workers: int = 64
    processes: int = 2
    partitions: int = 2
    deadline_s: int = 15
    """Each activation's processing deadline: a claim lost in a crash comes back this long
    after it was made (the restarted broker resets deadlines after `reset_grace_s`)."""
    reset_grace_s: int = 3
    disk_mb: int = 256
    gap_s: float = 6.0
    """No two faults closer than this, so each one's effect is its own."""
    session_timeout_ms: int = 6_000
    produce_timeout_ms: int = 2_000
    """How long upkeep waits for Kafka to acknowledge a retry (the broker's default is
    10 s: a Kafka stop shorter than that would show no failed produce)."""
    seed: int = 1
    max_seconds: float | None = None

    @property
    def windows(self) -> dict[str, float]:
        durations = {
            KAFKA_UNREACHABLE: self.kafka_stop_s,
            RETRY_PRODUCER_FAILING: self.retry_stop_s,
            DISK_FULL: self.disk_full_s,
            DB_LOCKED: self.lock_s,
        }
        return {kind: seconds for kind, seconds in durations.items() if seconds > 0}

    @property
    def burst(self) -> int:
        """Tasks in each window fault's burst (`Bursts`): a tenth of the run at most."""
        return max(1, min(self.tasks // 10, int(self.rate * 5)))

    @property
    def production_s(self) -> float:
        return self.tasks / self.rate

    @property
    def expected_fault_s(self) -> float:
        """About how long the faults take, restarts, bursts and recoveries included."""
        overhead = {
            KAFKA_UNREACHABLE: BURST_DELAY_S + _EXPECTED_RECOVERY_S,
            RETRY_PRODUCER_FAILING: BURST_DELAY_S + _EXPECTED_RECOVERY_S,
        }
        windows = sum(
            seconds + overhead.get(kind, _EXPECTED_RECOVERY_S)
            for kind, seconds in self.windows.items()
        )
        return self.kills * _EXPECTED_RESTART_S + windows

    @property
    def plan_span_s(self) -> float:
        """The span the faults are planned over, on a clock without them: the production
        less the faults' expected time, so that they fall while tasks are produced, but
        at least half the production."""
        return max(self.production_s - self.expected_fault_s, self.production_s / 2)

    def schedule(self) -> list[Planned]:
        """The faults of this run, in time order; ValueError when they cannot fit."""
        return plan(
            production_s=self.plan_span_s,
            kills=self.kills,
            aimed_kills=self.aimed_kills,
            windows=self.windows,
            gap_s=self.gap_s,
            seed=self.seed,
        )

    @property
    def time_limit_s(self) -> float:
        if self.max_seconds is not None:
            return self.max_seconds
        faults_s = sum(self.windows.values()) + self.kills * _RESTART_ALLOWANCE_S
        return self.production_s + faults_s + _DRAIN_ALLOWANCE_S


@dataclass
class Applied:
    """One fault as it happened (wall clock), with what was seen during it."""

    kind: str
    planned_at_s: float
    start_wall: float = 0.0
    end_wall: float = 0.0
    applied: bool = False
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """The broker's metrics just before the fault, every second during it, just after."""
    after: list[dict[str, Any]] = field(default_factory=list)
    """The broker's metrics after the fault, until it had recovered."""


class Broker:
    """The one broker of the run (slot 0 of a `Cluster`), its metrics and readiness."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.life_start_wall = time.time()
        self._offsets: Consumer | None = None

    @property
    def metrics_url(self) -> str:
        return self.cluster.slots[0].metrics_url

    def scrape(self) -> str:
        return scrape(self.metrics_url)

    def readyz(self) -> int | str:
        url = self.metrics_url.removesuffix("/metrics") + "/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                status: int = response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError as error:
            return f"unreachable: {error}"
        return status

    def sample(self) -> dict[str, Any]:
        """What the broker says about itself now; an `error` when it does not answer."""
        row: dict[str, Any] = {"wall": round(time.time(), 3), "readyz": self.readyz()}
        try:
            text = self.scrape()
        except OSError as error:
            row["error"] = str(error)
            return row
        row["activations"] = {
            status: int(count)
            for status, count in samples_by_label(text, _ACTIVATIONS, "status").items()
        }

        def total(name: str, label: str = "") -> float:
            return sum(samples_by_label(text, name, label).values())

        transitions = samples_by_label(text, "taskbroker_upkeep_transitions_total", "kind")
        row["produced"] = int(transitions.get("produced", 0))
        row["produce_failed"] = int(transitions.get("produce_failed", 0))
        row["flush_failures"] = int(total("taskbroker_writer_flush_failures_total"))
        row["committed_offsets"] = int(total("taskbroker_kafka_committed_offset"))
        row["dirty_records"] = int(total("taskbroker_state_dirty_records"))
        row["kafka_errors"] = int(total("taskbroker_kafka_errors_total"))
        return row

    def group_committed(self) -> dict[int, int]:
        """The broker group's committed offset of each partition, asked of Kafka: where a
        restarted broker starts reading. A partition with nothing committed is left out."""
        cluster = self.cluster
        if self._offsets is None:
            self._offsets = Consumer(
                {"bootstrap.servers": cluster.bootstrap, "group.id": cluster.topic}
            )
        wanted = [TopicPartition(cluster.topic, p) for p in range(cluster.partitions)]
        found = self._offsets.committed(wanted, timeout=_KAFKA_TIMEOUT_S)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    def close(self) -> None:
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None

    def holds_nothing(self) -> bool:
        statuses = samples_by_label(self.scrape(), _ACTIVATIONS, "status")
        return sum(statuses.values()) == 0


class FaultRunner:
    """Applies the planned faults in order on a thread of its own (`__call__`), recording
    each; a fault that could not be applied is recorded with the reason, and an error
    (the broker not coming back) ends the schedule and is kept in `error`."""

    def __init__(
        self,
        *,
        options: ChaosOptions,
        planned: list[Planned],
        broker: Broker,
        kafka: EmbeddedKafka,
        disk: SmallDisk,
        db_path: Path,
        bursts: Bursts,
    ) -> None:
        self._options = options
        self._planned = planned
        self._broker = broker
        self._kafka = kafka
        self._disk = disk
        self._db_path = db_path
        self._bursts = bursts
        self.applied: list[Applied] = []
        self.kills: list[KillExposure] = []
        self.error: str | None = None
        self.finished = threading.Event()

    def __call__(self, stop: threading.Event) -> None:
        started = time.monotonic()
        # The plan is on a clock without the faults (`ChaosOptions.plan_span_s`): each one
        # moves what follows it back by the time it really took, restarts included, so
        # that the broker runs at least `gap_s` between two faults.
        shift_s = 0.0
        try:
            for planned in self._planned:
                if stop.wait(max(0.0, started + shift_s + planned.at_s - time.monotonic())):
                    return
                record = Applied(planned.kind, planned.at_s)
                self.applied.append(record)
                began = time.monotonic()
                self._apply(planned, record, stop)
                shift_s += time.monotonic() - began
                print(_fault_line(record), file=sys.stderr, flush=True)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            self.finished.set()

    def _apply(self, planned: Planned, record: Applied, stop: threading.Event) -> None:
        if planned.kind == KILL:
            self._kill(planned.aimed, record)
        elif planned.kind in (KAFKA_UNREACHABLE, RETRY_PRODUCER_FAILING):
            self._stop_kafka(planned, record, stop)
        elif planned.kind == DISK_FULL:
            self._fill_disk(planned, record, stop)
        elif planned.kind == DB_LOCKED:
            self._lock(planned, record, stop)

    def _kill(self, aimed: bool, record: Applied) -> None:
        # Asked before the aim: an offset committed meanwhile only makes the bound looser.
        committed = self._broker.group_committed()
        text = self._broker.scrape()
        in_flush = None
        if aimed:
            deadline = time.monotonic() + _AIM_TIMEOUT_S
            in_flush = False
            while time.monotonic() < deadline:
                text = self._broker.scrape()
                if sum(samples_by_label(text, "taskbroker_state_flush_outstanding", "").values()):
                    in_flush = True
                    break
        fallback_s = self._options.commit_delay_ms / 1000 + 1.0
        longest = longest_flush_s(histogram_buckets(text, _FLUSH_DURATION) or {}, fallback_s)
        window = exposure_window_s(self._options.flush_interval_ms / 1000, longest)
        record.start_wall = time.time()
        self._broker.cluster.kill(0)
        record.applied = True
        self.kills.append(
            KillExposure(record.start_wall, window, self._broker.life_start_wall, committed)
        )
        self._broker.cluster.restart(0)
        record.end_wall = self._broker.life_start_wall = time.time()
        record.details = {
            "aimed": aimed,
            "flush_outstanding_when_killed": in_flush,
            "longest_flush_s": longest,
            "exposure_window_s": round(window, 3),
            "restart_s": round(record.end_wall - record.start_wall, 2),
            "committed_offsets": committed,
        }

    def _sample_for(self, record: Applied, seconds: float, stop: threading.Event) -> None:
        """Sample every `_SAMPLE_INTERVAL_S` for `seconds`, and at least once."""
        until = time.monotonic() + seconds
        while True:
            record.samples.append(self._broker.sample())
            left = until - time.monotonic()
            if left <= 0 or stop.wait(min(_SAMPLE_INTERVAL_S, left)):
                return

    def _stop_kafka(self, planned: Planned, record: Applied, stop: threading.Event) -> None:
        pid = self._kafka.pid
        if pid is None:
            record.note = "Kafka is not running"
            return
        record.details["burst_ingested"] = self._bursts.before_kafka_stop(
            planned.kind, self._broker
        )
        record.samples.append(self._broker.sample())
        record.start_wall = time.time()
        pause_group(pid)
        record.applied = True
        try:
            self._sample_for(record, planned.duration_s, stop)
        finally:
            resume_group(pid)
            record.end_wall = time.time()
        record.samples.append(self._broker.sample())
        self._watch_recovery(record, stop)

    def _fill_disk(self, planned: Planned, record: Applied, stop: threading.Event) -> None:
        if not self._disk.mounted:
            record.note = f"not applied: no disk of its own to fill ({self._disk.reason})"
            return
        record.samples.append(self._broker.sample())
        record.start_wall = time.time()
        try:
            record.details["ballast_bytes"] = self._disk.fill()
            record.details["free_bytes_when_full"] = self._disk.free_bytes()
            record.applied = True
            record.details["burst_ingested"] = self._bursts.during(planned.kind, self._broker)
            self._sample_for(record, self._left(planned, record), stop)
        finally:
            self._disk.empty()
            record.end_wall = time.time()
        record.samples.append(self._broker.sample())
        self._watch_recovery(record, stop)

    def _lock(self, planned: Planned, record: Applied, stop: threading.Event) -> None:
        record.samples.append(self._broker.sample())
        asked = time.time()
        with exclusive_lock(self._db_path, planned.duration_s) as locker:
            record.start_wall = time.time()
            record.applied = True
            record.details["waited_for_lock_s"] = round(record.start_wall - asked, 3)
            record.details["burst_ingested"] = self._bursts.during(planned.kind, self._broker)
            self._sample_for(record, self._left(planned, record), stop)
            locker.wait(_SAMPLE_INTERVAL_S * 5)
            record.end_wall = time.time()
        record.samples.append(self._broker.sample())
        self._watch_recovery(record, stop)

    @staticmethod
    def _left(planned: Planned, record: Applied) -> float:
        return max(0.0, planned.duration_s - (time.time() - record.start_wall))

    def _watch_recovery(self, record: Applied, stop: threading.Event) -> None:
        """Sample after the fault until the broker shows it has recovered (`recovered`),
        `_RECOVERY_LIMIT_S` at most; when, in seconds after the fault's end, or None."""
        deadline = time.monotonic() + _RECOVERY_LIMIT_S
        while time.monotonic() < deadline:
            row = self._broker.sample()
            record.after.append(row)
            if recovered(record.kind, record.samples[0], record.samples[-1], row):
                record.details["recovered_after_s"] = round(row["wall"] - record.end_wall, 2)
                return
            if stop.wait(_RECOVERY_POLL_S):
                break
        record.details["recovered_after_s"] = None


def recovered(
    kind: str, before: dict[str, Any], at_end: dict[str, Any], now: dict[str, Any]
) -> bool:
    """Whether the broker is past the fault `kind`, from samples before the fault, at its
    end, and now: consuming and committing again (Kafka back), producing retries again
    (or none left), everything flushed and offsets where they were or further (disk
    space back, lock released)."""
    if "error" in now or any("error" in row for row in (before, at_end)):
        return False
    committing: bool = now["committed_offsets"] >= before["committed_offsets"]
    if kind == KAFKA_UNREACHABLE:
        return committing and now["readyz"] == 200
    if kind == RETRY_PRODUCER_FAILING:
        produced: bool = now["produced"] > at_end["produced"]
        return produced or now["activations"].get("retry", 0) == 0
    flushed: bool = now["dirty_records"] == 0
    return committing and flushed


def _fault_line(record: Applied) -> str:
    length = record.end_wall - record.start_wall if record.applied else 0.0
    state = "applied" if record.applied else f"NOT applied ({record.note})"
    return f"\n  fault {record.kind} {state}, {length:.1f} s {record.details or ''}"


# --- what each window fault promised ------------------------------------------------------------


def _delta(samples: list[dict[str, Any]], key: str) -> int | None:
    values = [row[key] for row in samples if key in row]
    return values[-1] - values[0] if len(values) >= 2 else None


def window_checks(
    record: Applied, acknowledged_in_window: int, retried_in_window: int
) -> dict[str, Any]:
    """What the window fault `record` promised, from its samples (the first taken just
    before it, the last just after) and the tasks the workers had acknowledged in it."""
    inside = record.samples[1:-1]
    readyz = Counter(str(row["readyz"]) for row in inside)
    checks: dict[str, Any] = {
        "readyz_during": dict(readyz),
        "acknowledged_during": acknowledged_in_window,
    }
    if record.kind == KAFKA_UNREACHABLE:
        checks["grpc_kept_serving"] = acknowledged_in_window > 0
    elif record.kind == RETRY_PRODUCER_FAILING:
        produced = _delta(inside, "produced")
        checks["retries_answered_during"] = retried_in_window
        failed = _delta(record.samples, "produce_failed")
        checks["produce_failed_during"] = failed
        checks["produced_during"] = produced
        # With Kafka stopped nothing may count as produced: upkeep counts a produce only
        # once Kafka acknowledged it.
        checks["nothing_marked_produced"] = produced == 0
        checks["retries_were_due"] = retried_in_window > 0
        checks["retry_produce_failed"] = bool(failed)
    elif record.kind in (DISK_FULL, DB_LOCKED):
        failures = _delta(record.samples, "flush_failures")
        committed = [row["committed_offsets"] for row in inside if "committed_offsets" in row]
        checks["flush_failures_during"] = failures
        if record.kind == DISK_FULL:
            checks["flushes_failed"] = bool(failures)
        # A lock shorter than the writer's busy timeout holds a flush rather than failing it.
        # The first sample inside may still see a commit of before the fault; 0 is a
        # partition whose committed offset the consumer has not learnt yet (just assigned).
        known = [offset for offset in committed[1:] if offset]
        if record.kind == DB_LOCKED:
            checks["offsets_held"] = len(set(known)) <= 1
        else:
            # Not a promise: a flush that fits in the pages SQLite already has (rows
            # deleted, the WAL reused) commits on a full disk, and its offsets with it.
            checks["offsets_moved_during"] = max(known) - min(known) if known else 0
        checks["results_answered"] = acknowledged_in_window > 0
    checks["recovered_after_s"] = record.details.get("recovered_after_s")
    checks["recovered"] = checks["recovered_after_s"] is not None
    checks["passed"] = all(value for key, value in checks.items() if isinstance(value, bool))
    return checks


# --- the run --------------------------------------------------------------------------------


def _progress(total: int) -> Callable[[Any], None]:
    def show(progress: Any) -> None:
        print(
            f"\r  {progress.completed:>8,} acknowledged of {total:,} produced, "
            f"{progress.elapsed_s:6.1f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    return show


def positions_in_kafka(
    bootstrap: str, topic: str, partitions: int
) -> dict[str, list[tuple[int, int]]]:
    """Where each activation id is in `topic`: (partition, offset) of every copy, read
    from the start to the end each partition has now."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"chaos-audit-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    found: dict[str, list[tuple[int, int]]] = {}
    try:
        ends: dict[int, int] = {}
        for number in range(partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, number), timeout=_KAFKA_TIMEOUT_S
            )
            if high > low:
                ends[number] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + _AUDIT_TIMEOUT_S
        while ends and time.monotonic() < deadline:
            for message in consumer.consume(1000, 1.0):
                partition, offset, value = message.partition(), message.offset(), message.value()
                if partition is None or offset is None or value is None or message.error():
                    continue
                task_id = pb.TaskActivation.FromString(value).id
                found.setdefault(task_id, []).append((partition, offset))
                if offset + 1 >= ends.get(partition, 0):
                    ends.pop(partition, None)
    finally:
        consumer.close()
    return found


def _resume_kafka(kafka: EmbeddedKafka) -> None:
    if kafka.pid is not None:
        resume_group(kafka.pid)


class Bursts:
    """A burst of tasks for each window fault, so that the workers have something to take
    and report while Kafka, the disk or the lock is gone.

    With Kafka stopped nothing can be produced: the burst goes in just before, held back
    by the broker for `BURST_DELAY_S` (`before_kafka_stop`), to become claimable during
    the stop. For the disk and the lock it goes in during the fault (`during`), so that
    its ingest has to be written: the disk burst's payloads come to `DISK_BURST_BYTES`,
    more than the write-ahead log holds already (SQLite reuses its WAL file, so small
    writes need no new space and would not notice the full disk)."""

    def __init__(
        self, ids: dict[str, list[str]], spec: TaskSpec, bootstrap: str, topic: str
    ) -> None:
        self._ids = ids
        self._spec = spec
        self._bootstrap = bootstrap
        self._topic = topic

    def before_kafka_stop(self, kind: str, broker: Broker) -> int:
        """Produce the burst of `kind` held back, and wait until the broker ingested it,
        then until its tasks are due in `_BURST_LEAD_S`: the fault starts then. The
        activations the broker ingested meanwhile (others included)."""
        due = time.monotonic() + BURST_DELAY_S
        ingested = self._produce(kind, broker, replace(self._spec, delay_s=BURST_DELAY_S))
        time.sleep(max(0.0, due - _BURST_LEAD_S - time.monotonic()))
        return ingested

    def during(self, kind: str, broker: Broker) -> int:
        """Produce the burst of `kind` now; the activations the broker ingested (into
        memory: not necessarily durable) meanwhile."""
        spec = self._spec
        if kind == DISK_FULL:
            size = DISK_BURST_BYTES // max(1, len(self._ids.get(kind, ())))
            spec = replace(spec, param_bytes=max(spec.param_bytes, size))
        return self._produce(kind, broker, spec)

    def _produce(self, kind: str, broker: Broker, spec: TaskSpec) -> int:
        """Produce the burst and wait until the broker has ingested as many activations,
        or `_INGEST_TIMEOUT_S`."""
        burst = self._ids.get(kind, [])
        if not burst:
            return 0
        before = _ingested(broker.scrape())
        produce_tasks(self._bootstrap, self._topic, burst, spec)
        deadline = time.monotonic() + _INGEST_TIMEOUT_S
        ingested = 0
        while time.monotonic() < deadline:
            ingested = _ingested(broker.scrape()) - before
            if ingested >= len(burst):
                break
            time.sleep(0.05)
        return ingested


def _ingested(exposition: str) -> int:
    return int(sum(samples_by_label(exposition, _INGESTED, "").values()))


def split_ids(
    ids: list[str], kinds: list[str], burst: int
) -> tuple[dict[str, list[str]], list[str]]:
    """A burst of ids for each window fault of `kinds`, and the rest, produced at the rate."""
    bursts = {kind: ids[i * burst : (i + 1) * burst] for i, kind in enumerate(kinds)}
    return bursts, ids[len(kinds) * burst :]


def _start(
    stack: ExitStack, options: ChaosOptions, topic: str
) -> tuple[EmbeddedKafka, SmallDisk, Cluster, Path]:
    """Kafka, the small disk and the broker, SERVING with its partitions; all undone by
    `stack`."""
    disk = stack.enter_context(SmallDisk(options.disk_mb))
    kafka = stack.enter_context(EmbeddedKafka(port=free_port(HOST)))
    # SIGCONT before Tansu is stopped: a stopped process does not act on SIGTERM.
    stack.callback(_resume_kafka, kafka)
    create_topics(kafka.bootstrap, topic, options.partitions)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
    db_path = (disk.path if disk.mounted else workdir) / "chaos.sqlite"
    setup = BrokerSetup(
        commit_delay_ms=options.commit_delay_ms,
        max_tasks=options.tasks,
        max_workers=options.workers,
        session_timeout_ms=options.session_timeout_ms,
        db_path=db_path,
        settings=(
            ("FLUSH_INTERVAL_MS", str(options.flush_interval_ms)),
            ("UPKEEP_DEADLINE_RESET_SKIP_AFTER_STARTUP_SEC", str(options.reset_grace_s)),
            ("PROCESSING_DEADLINE_GRACE_SEC", "0"),
            ("KAFKA_PRODUCE_TIMEOUT_MS", str(options.produce_timeout_ms)),
        ),
    )
    cluster = Cluster(setup, kafka.bootstrap, topic, options.partitions, workdir)
    stack.callback(cluster.stop)
    cluster.start(1)
    cluster.wait_settled()
    warm_up = task_ids(f"{topic}-warm", _WARM_UP_TASKS)
    produce_tasks(kafka.bootstrap, topic, warm_up, TaskSpec(param_bytes=16))
    complete_tasks(cluster.targets, _WARM_UP_TASKS, _WARM_UP_TIMEOUT_S)
    return kafka, disk, cluster, db_path


def run(options: ChaosOptions, command: str = "") -> dict[str, Any]:
    """One chaos run; its result (see the module docstring)."""
    topic = f"chaos-{uuid.uuid4().hex[:8]}"
    spec = TaskSpec(param_bytes=256, processing_deadline_s=options.deadline_s, max_attempts=2)
    planned = plan(
        production_s=options.plan_span_s,
        kills=options.kills,
        aimed_kills=options.aimed_kills,
        windows=options.windows,
        gap_s=options.gap_s,
        seed=options.seed,
    )
    ids = task_ids(topic, options.tasks)
    burst_ids, paced = split_ids(ids, [f.kind for f in planned if f.kind != KILL], options.burst)
    with ExitStack() as stack:
        kafka, disk, cluster, db_path = _start(stack, options, topic)
        broker = Broker(cluster)
        stack.callback(broker.close)
        bursts = Bursts(burst_ids, spec, kafka.bootstrap, topic)
        faults = FaultRunner(
            options=options,
            planned=planned,
            broker=broker,
            kafka=kafka,
            disk=disk,
            db_path=db_path,
            bursts=bursts,
        )
        chunks = chunked(paced, max(1, int(options.production_s / _CHUNK_S)))
        producer = Background(
            "chaos-produce",
            partial(
                produce_paced,
                bootstrap=kafka.bootstrap,
                topic=topic,
                chunks=chunks,
                spec=spec,
                window_s=options.production_s,
            ),
        )
        scheduler = Background("chaos-faults", faults)
        drained: list[float] = []

        def start_background() -> None:
            producer.start()
            scheduler.start()

        def settled() -> bool:
            if faults.error is not None:
                return True
            if not (producer.done and faults.finished.is_set()):
                return False
            try:
                if not (broker.holds_nothing() and cluster.caught_up()):
                    return False
            except Exception:  # the broker between lives, or Kafka slow: not yet
                return False
            drained.append(time.time())
            return True

        try:
            report, started_wall, stopped_wall = run_workers(
                cluster.targets,
                processes=options.processes,
                threads=max(1, options.workers // options.processes),
                work_ms=0.0,
                until_completed=options.tasks,
                max_seconds=options.time_limit_s,
                kind=UnaryWorkers(retry_per_mille=options.retry_per_mille),
                on_started=start_background,
                on_progress=_progress(options.tasks),
                settled=settled,
            )
        finally:
            producer.stop.set()
            scheduler.stop.set()
        print(file=sys.stderr)
        errors = []
        for background in (producer, scheduler):
            try:
                background.join(_JOIN_TIMEOUT_S)
            except Exception as error:
                errors.append(f"{background!r}: {type(error).__name__}: {error}")
        final = broker.sample()
        positions = positions_in_kafka(kafka.bootstrap, topic, options.partitions)
        log_tail = tail(cluster.slots[0].workdir / "broker.log", _LOG_TAIL_LINES)
    return summarize(
        options,
        ids,
        report,
        faults,
        started_wall=started_wall,
        stopped_wall=stopped_wall,
        drained_wall=drained[0] if drained else None,
        errors=errors,
        final=final,
        positions=positions,
        log_tail=log_tail,
        disk=disk,
        command=command,
    )


def summarize(
    options: ChaosOptions,
    ids: list[str],
    report: WorkerReport,
    faults: FaultRunner,
    *,
    started_wall: float,
    stopped_wall: float,
    drained_wall: float | None,
    errors: list[str],
    final: dict[str, Any],
    positions: dict[str, list[tuple[int, int]]],
    log_tail: str,
    disk: SmallDisk,
    command: str,
) -> dict[str, Any]:
    executions = Executions(
        report.received,
        report.received_wall,
        report.completed,
        report.completed_wall,
        report.retried,
    )
    accounting = account(ids, executions)
    bound = duplicate_bound(executions, faults.kills, accounting["duplicated_ids"], positions)
    times, latencies = sorted_completions(report.completed_wall, report.task_latencies_ms)
    retried_times = sorted(
        at
        for task_id, at in zip(report.completed, report.completed_wall, strict=True)
        if task_id in set(report.retried)
    )
    applied_faults = []
    windows = []
    for record in faults.applied:
        effect = (
            window_stats(times, latencies, record.start_wall, record.end_wall)
            if record.applied
            else {}
        )
        entry: dict[str, Any] = {
            **asdict(record),
            "start_s": round(record.start_wall - started_wall, 2) if record.applied else None,
            "end_s": round(record.end_wall - started_wall, 2) if record.applied else None,
            "effect": effect or {"tasks_per_s": None, "p99_ms": None},
        }
        if record.applied:
            windows.append((record.start_wall, record.end_wall))
        if record.applied and record.kind != KILL:
            in_window = sum(1 for at in retried_times if record.start_wall <= at <= record.end_wall)
            entry["checks"] = window_checks(record, effect["tasks"], in_window)
        applied_faults.append(entry)
    last_fault_end = max((end for _, end in windows), default=started_wall)
    baseline = outside_windows(times, latencies, windows, started_wall, last_fault_end)
    planned = len(faults.applied) if faults.error else None
    kills = [f for f in applied_faults if f["kind"] == KILL and f["applied"]]
    missing = [f["kind"] for f in applied_faults if not f["applied"]]
    expected = options.kills + len(options.windows)
    checks_passed = all(f.get("checks", {}).get("passed", True) for f in applied_faults)
    passed = (
        accounting["lost"] == 0
        and accounting["unexpected"] == 0
        and accounting["duplicates"] <= bound["bound"]
        and not missing
        and len(applied_faults) == expected
        and checks_passed
        and faults.error is None
        and not errors
        and drained_wall is not None
    )
    return {
        "command": command,
        "started_at": datetime.datetime.fromtimestamp(started_wall, datetime.UTC).isoformat(),
        "options": asdict(options),
        "passed": passed,
        "accounting": accounting,
        "duplicate_bound": bound,
        "bound_explained": (
            "Bound on duplicate executions: for each kill, the tasks a worker received or had "
            "acknowledged within flush_interval + 2 x the longest flush seen before the kill "
            "(the longest a change stays only in memory), plus those it held unacknowledged "
            "when the broker died; summed over the kills. Every duplicated task should be one "
            "of them: those that are not are listed as unexplained."
        ),
        "kills_applied": len(kills),
        "aimed_kills_in_flush": sum(
            1 for f in kills if f["details"].get("flush_outstanding_when_killed")
        ),
        "faults_planned": expected,
        "faults_recorded": len(applied_faults),
        "faults_not_applied": missing,
        "fault_error": faults.error,
        "schedule_stopped_after": planned,
        "errors": errors,
        "disk": {"tmpfs": disk.mounted, "size_mb": disk.size_mb, "reason": disk.reason},
        "seconds": round(stopped_wall - started_wall, 2),
        "drain_after_last_fault_s": None
        if drained_wall is None
        else round(drained_wall - last_fault_end, 2),
        "baseline": baseline,
        "faults": applied_faults,
        "worker_errors_by_code": dict(report.errors),
        "timeline": {"bin_s": 1.0, "tasks_per_s": rate_series(times, started_wall)},
        "final_broker_sample": final,
        "broker_log_tail": log_tail.splitlines(),
        "machine": machine(),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    accounting, bound = result["accounting"], result["duplicate_bound"]
    baseline = result["baseline"]
    lines = [
        f"chaos: {'PASS' if result['passed'] else 'FAIL'}: {accounting['produced']:,} produced "
        f"({accounting['retried']:,} answered RETRY once), {accounting['lost']} lost, "
        f"{accounting['duplicates']} duplicate executions (bound {bound['bound']:,}, "
        f"{len(bound['unexplained_duplicated_ids'])} unexplained), "
        f"{accounting['unexpected']} unexpected",
        f"  {result['kills_applied']} kills ({result['aimed_kills_in_flush']} inside a flush), "
        f"{result['faults_recorded']}/{result['faults_planned']} faults recorded, not applied: "
        f"{result['faults_not_applied'] or 'none'}; drain after the last fault "
        f"{result['drain_after_last_fault_s']} s; run {result['seconds']} s",
        f"  baseline {baseline['tasks_per_s']:,} tasks/s, p99 {baseline['p99_ms']} ms",
    ]
    for fault in result["faults"]:
        if fault["kind"] == KILL:
            continue
        effect = fault["effect"]
        lines.append(
            f"  {fault['kind']}: {effect['tasks_per_s']} tasks/s, p99 {effect['p99_ms']} ms; "
            f"{fault.get('checks', fault['note'])}"
        )
    kills = [f["effect"] for f in result["faults"] if f["kind"] == KILL and f["applied"]]
    if kills:
        restart = [
            f["details"]["restart_s"]
            for f in result["faults"]
            if f["kind"] == KILL and f["applied"]
        ]
        lines.append(f"  kills: restart {min(restart)}-{max(restart)} s")
    if result["fault_error"] or result["errors"]:
        lines.append(f"  errors: {result['fault_error']} {result['errors']}")
    return lines


def _parser() -> argparse.ArgumentParser:
    defaults = ChaosOptions()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="write the result to this file")
    parser.add_argument(
        "--html", type=Path, help="the page (default loadtest/results/<date>/chaos.html)"
    )
    for name, value in asdict(defaults).items():
        if name == "max_seconds":
            parser.add_argument("--max-seconds", type=float, help="time limit (default: derived)")
            continue
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=type(value), default=value, help=_HELP.get(name))
    return parser


_HELP = {
    "tasks": "activations to produce (default %(default)s)",
    "rate": "activations produced per second (default %(default)s)",
    "kills": "SIGKILLs of the broker, each followed by a restart (default %(default)s)",
    "aimed_kills": "of those, kills fired inside a flush (default %(default)s)",
    "kafka_stop_s": "Kafka SIGSTOPped while workers run; 0: none (default %(default)s)",
    "retry_stop_s": "Kafka SIGSTOPped while retries are due; 0: none (default %(default)s)",
    "disk_full_s": "the database's tmpfs full; 0: none (default %(default)s)",
    "lock_s": "the database locked by another process; 0: none (default %(default)s)",
    "commit_delay_ms": "store.debug_commit_delay_ms: wider flushes (default %(default)s)",
    "retry_per_mille": "first attempts answered RETRY, per thousand (default %(default)s)",
    "seed": "the fault schedule's random seed (default %(default)s)",
}


def _stop_on_sigterm() -> None:
    """SIGTERM takes the path Ctrl-C takes, so the `finally` blocks clean up."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in asdict(ChaosOptions())}
    options = ChaosOptions(**values)
    if options.tasks < 1 or options.rate <= 0 or options.workers < 1 or options.processes < 1:
        parser.error("--tasks, --rate, --workers and --processes must be positive")
    try:
        options.schedule()
    except ValueError as error:
        parser.error(str(error))
    _stop_on_sigterm()
    result = run(options, command=" ".join(["python -m loadtest chaos", *(argv or sys.argv[1:])]))
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("timeline", "faults")}, indent=2)
    )
    for line in summary_lines(result):
        print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON: {args.json}")
    html_path = (
        args.html
        or Path(__file__).parent / "results" / datetime.date.today().isoformat() / "chaos.html"
    )
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(result))
    print(f"HTML: {html_path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
