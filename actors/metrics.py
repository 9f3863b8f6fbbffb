"""Every Prometheus metric of the broker, declared once, on an injected registry.

Two kinds of source feed them:

- Observers, called by the actors as things happen (`MailboxMetrics`, `FrontendMetrics`,
  `UpkeepMetrics`, `WriterMetrics`, `PusherMetrics`, `FirstClaimMetrics`): histograms and
  counters of events.
- `BrokerCollector`, read at scrape time: mailbox counters straight from each mailbox
  (no message needed), and the values that live inside actors (state counts, consumer
  counters, store sizes) from `ActorSnapshots`, which asks the actors on its own thread.
  A scrape therefore never sends a message and never waits on an actor: a slow actor
  makes its numbers older (`taskbroker_snapshot_age_seconds` says how much), not the
  scrape slower.

Names follow Prometheus conventions: the `taskbroker_` prefix, the unit last, `_total`
on counters; every family has a fixed label set.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final, Generic, Protocol, TypeVar

import grpc
import pykka
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from actors.activation import DECODE_REASONS
from actors.errors import BrokerError
from actors.messages import (
    ConcludeOutcome,
    ConsumerStats,
    ConsumerStatsQuery,
    StateStats,
    Stats,
    StoreSizesQuery,
    TickResult,
)
from actors.runtime import MailboxPolicy, MailboxStats, mailbox_stats_of
from actors.services import ABUSE_REASONS
from actors.store import StoreSizes

logger = logging.getLogger(__name__)

PREFIX: Final = "taskbroker_"

MAILBOX_BUCKETS: Final = (
    0.000025, 0.0001, 0.00025, 0.001, 0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0,
)  # fmt: skip
"""Time in a mailbox and handling time: 10 to 50 µs for an actor keeping up (the ops tests'
load: 90 % of the state's messages under 50 µs), a millisecond or two for a timer message or
an ingest batch, tens of milliseconds for a flush, and up to seconds behind a full `block`
mailbox. Steps of 2.5 and 4 keep a p99 read from them within that factor."""
_MAILBOX_LE: Final = (*(str(bound) for bound in MAILBOX_BUCKETS), "+Inf")
# A gRPC call costs a few hundred µs of the server's CPU at the least; calls wait up to
# seconds behind a full mailbox. 12 buckets, not 16: /metrics keeps to its budget.
_REQUEST_BUCKETS: Final = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip
# A flush (and an upkeep tick) takes about a millisecond on a quiet disk, tens under load,
# and seconds on a disk that stalls.
_FLUSH_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
)  # fmt: skip
_ROWS_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
_BYTES_BUCKETS: Final = tuple(float(1024 * 4**n) for n in range(10))  # 1 KiB .. 256 MiB
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A waiting worker takes a task within milliseconds of its reaching Kafka; a backlog keeps
# tasks waiting for minutes.
_FIRST_CLAIM_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Every bound is a float, and str() of one is what prometheus_client writes for it.
_FIRST_CLAIM_LE: Final = (*(str(bound) for bound in _FIRST_CLAIM_BUCKETS), "+Inf")

TRANSITION_KINDS: Final = (
    "deadline_reset",
    "expired",
    "delay_due",
    "failed_by_deadline",
    "produced",
    "produce_failed",
)
"""The label values of `taskbroker_upkeep_transitions_total`."""

CLAIM_RESULTS: Final = ("hit", "miss")

OTHER: Final = "other"
"""The label value that stands for every task name (or namespace) past the label cap."""


# --- observers ---------------------------------------------------------------------------------


class MailboxMetrics:
    """The `MailboxObserver` of every actor, and the collector that exports what it saw:

    - `taskbroker_mailbox_wait_seconds{actor}` (time in the mailbox) and
      `taskbroker_mailbox_handling_seconds{actor}`: histograms per actor;
    - `taskbroker_mailbox_messages_handled_total{actor,message}` and
      `taskbroker_mailbox_message_handling_seconds_total{actor,message}`: per message type,
      counters only (which message keeps an actor busy is their ratio and their rate).

    Histograms per message type were 770 of the 1,149 lines of /metrics after the ops
    tests' short load (21 lines a series, 18 series, twice); per actor, with 12 buckets,
    they are 150.

    Not prometheus_client metrics, for the same reason as `FirstClaimMetrics`: these run on
    every message of every actor. `dequeued` and `handled` run on the actor's own thread,
    and actors' names are unique in a broker, so each series has one writer and needs no
    lock; a scrape copies each list in one `list.copy`, under the GIL.

    Depth, high-water mark and overflows are not taken from these calls: they arrive from
    several threads outside the mailbox's lock, so a depth set from them can be stale.
    `BrokerCollector` reads the mailbox's own exact counters at scrape time instead.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._waited: dict[str, _BucketSeries] = {}
        self._handled: dict[str, _BucketSeries] = {}
        self._by_message: dict[tuple[str, str], _MessageTotals] = {}
        registry.register(self)

    def enqueued(self, actor: str, depth: int) -> None:
        pass  # read exactly at scrape time, see the class docstring

    def overflowed(self, actor: str, policy: MailboxPolicy) -> None:
        pass  # read exactly at scrape time, see the class docstring

    def dequeued(self, actor: str, message_type: str, waited_s: float, depth: int) -> None:
        series = self._waited.get(actor)
        if series is None:
            series = self._waited[actor] = _BucketSeries(MAILBOX_BUCKETS, _MAILBOX_LE)
        series.observe(waited_s)

    def handled(self, actor: str, message_type: str, seconds: float) -> None:
        series = self._handled.get(actor)
        if series is None:
            series = self._handled[actor] = _BucketSeries(MAILBOX_BUCKETS, _MAILBOX_LE)
        series.observe(seconds)
        totals = self._by_message.get((actor, message_type))
        if totals is None:
            totals = self._by_message[(actor, message_type)] = _MessageTotals()
        totals.count += 1
        totals.seconds += seconds

    def waits(self) -> dict[str, list[int]]:
        """Each actor's time-in-mailbox counts per bucket of `MAILBOX_BUCKETS` (the last:
        above every bound), since the start."""
        return {actor: series.counts.copy() for actor, series in self._waited.copy().items()}

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        waited, handled, messages, seconds = families = self._families()
        for family, by_actor in ((waited, self._waited), (handled, self._handled)):
            for actor, series in by_actor.copy().items():
                series.export(family, [actor])
        for (actor, message), totals in self._by_message.copy().items():
            messages.add_metric([actor, message], totals.count)
            seconds.add_metric([actor, message], totals.seconds)
        return families

    @staticmethod
    def _families() -> list[Any]:
        return [
            HistogramMetricFamily(
                f"{PREFIX}mailbox_wait_seconds",
                "Time a message spent in an actor's mailbox before the actor took it.",
                labels=("actor",),
            ),
            HistogramMetricFamily(
                f"{PREFIX}mailbox_handling_seconds",
                "Time an actor spent handling one message.",
                labels=("actor",),
            ),
            CounterMetricFamily(
                f"{PREFIX}mailbox_messages_handled",
                "Messages an actor handled, by message type.",
                labels=("actor", "message"),
            ),
            CounterMetricFamily(
                f"{PREFIX}mailbox_message_handling_seconds",
                "Time an actor spent handling messages of each type (its rate: the share of "
                "the actor's thread that type takes).",
                labels=("actor", "message"),
            ),
        ]


class _MessageTotals:
    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0


class FrontendMetrics:
    """The `FrontendObserver`: gRPC calls by method and status code, batches to the state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            f"{PREFIX}grpc_requests",
            "ConsumerService calls answered, by method and gRPC status code.",
            ("method", "code"),
            registry=registry,
        )
        self._latency = Histogram(
            f"{PREFIX}grpc_request_duration_seconds",
            "Time from a ConsumerService call's arrival to its answer, by method and code.",
            ("method", "code"),
            registry=registry,
            buckets=_REQUEST_BUCKETS,
        )
        self._batches = Histogram(
            f"{PREFIX}grpc_state_batch_size",
            "Requests (claims and results) per batch from the front end to the state actor.",
            registry=registry,
            buckets=_BATCH_BUCKETS,
        )
        self._abuse = Counter(
            f"{PREFIX}grpc_abusive_requests",
            "Requests no correct worker sends, refused: by reason (signature: a missing or "
            "invalid signature; malformed: bytes that are not the request message).",
            ("reason",),
            registry=registry,
        )
        for reason in ABUSE_REASONS:  # a fixed label set, at 0 from the start
            self._abuse.labels(reason)
        # labels() takes a lock and builds a key; handled() runs on every gRPC call.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (method, code.name)
        children = self._children.get(key)
        if children is None:
            # Two threads may both get here; labels() hands both the same children.
            children = self._children[key] = (
                self._requests.labels(*key),
                self._latency.labels(*key),
            )
        children[0].inc()
        children[1].observe(seconds)

    def batch_sent(self, size: int) -> None:
        self._batches.observe(size)

    def abused(self, reason: str) -> None:
        self._abuse.labels(reason).inc()


class UpkeepMetrics:
    """The `UpkeepObserver`: tick duration, when upkeep last ticked, transitions by kind."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._duration = Histogram(
            f"{PREFIX}upkeep_tick_duration_seconds",
            "Time one upkeep tick took: the state's Tick, producing retries and dead "
            "letters, and waiting for Kafka's acknowledgements.",
            registry=registry,
            buckets=_FLUSH_BUCKETS,
        )
        self._last_tick = Gauge(
            f"{PREFIX}upkeep_last_tick_timestamp_seconds",
            "Unix time at which upkeep last completed a tick (0: never). "
            "Upkeep is stalled when this falls behind.",
            registry=registry,
        )
        self._transitions = Counter(
            f"{PREFIX}upkeep_transitions",
            "Time-driven transitions made by upkeep, by kind: deadline_reset (processing "
            "past its deadline, back to pending), expired, delay_due (delay to pending), "
            "failed_by_deadline (deadline passed with attempts used up), produced (retry or "
            "dead letter acknowledged by Kafka), produce_failed (not acknowledged; tried "
            "again next tick).",
            ("kind",),
            registry=registry,
        )
        self._by_kind = {kind: self._transitions.labels(kind) for kind in TRANSITION_KINDS}

    def ticked(self, seconds: float, result: TickResult, produced: int, failed: int) -> None:
        self._duration.observe(seconds)
        self._last_tick.set(self._clock())
        counts = {
            "deadline_reset": result.deadline_resets,
            "expired": result.expired,
            "delay_due": result.delays_due,
            "failed_by_deadline": result.failed_by_deadline,
            "produced": produced,
            "produce_failed": failed,
        }
        for kind, count in counts.items():
            if count:
                self._by_kind[kind].inc(count)


class WriterMetrics:
    """The `WriterObserver`: flush duration, rows and bytes per flush, failures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._duration = Histogram(
            f"{PREFIX}writer_flush_duration_seconds",
            "Time the SQLite writer took to commit one flush (one transaction).",
            registry=registry,
            buckets=_FLUSH_BUCKETS,
        )
        self._rows = Histogram(
            f"{PREFIX}writer_flush_rows",
            "Row changes (upserts, deletes, new activation blobs) in one committed flush.",
            registry=registry,
            buckets=_ROWS_BUCKETS,
        )
        self._bytes = Histogram(
            f"{PREFIX}writer_flush_bytes",
            "Activation bytes written by one committed flush.",
            registry=registry,
            buckets=_BYTES_BUCKETS,
        )
        self._failures = Counter(
            f"{PREFIX}writer_flush_failures",
            "Flushes the SQLite store refused (disk full, I/O error, locked); their changes "
            "go again with the next flush.",
            registry=registry,
        )

    def flushed(self, seconds: float, rows: int, bytes_written: int) -> None:
        self._duration.observe(seconds)
        self._rows.observe(rows)
        self._bytes.observe(bytes_written)

    def flush_failed(self) -> None:
        self._failures.inc()

    def flush_totals(self) -> tuple[int, float]:
        """Flushes committed since the start and the seconds they took in all, for the
        status page's history."""
        count, seconds = 0, 0.0
        for family in self._duration.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count = int(sample.value)
                elif sample.name.endswith("_sum"):
                    seconds = sample.value
        return count, seconds


class PusherMetrics:
    """The `PushObserver`: pushes by endpoint and result code, their latency, pushes in
    flight and backoffs per endpoint, claim asks, and pending activations of applications
    missing from worker_map. Endpoints and applications come from the configuration, so the
    label sets are bounded by it. CLAIMED (pushed, not yet acknowledged) activations are
    `taskbroker_state_activations{status="claimed"}`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._pushes = Counter(
            f"{PREFIX}pushes",
            "PushTask calls answered or failed, by worker endpoint and gRPC status code "
            "(OK acknowledged; RESOURCE_EXHAUSTED worker busy; UNAVAILABLE and "
            "DEADLINE_EXCEEDED unreachable or too slow).",
            ("endpoint", "code"),
            registry=registry,
        )
        self._latency = Histogram(
            f"{PREFIX}push_duration_seconds",
            "Time from a PushTask call's start to its answer or failure, by endpoint and code.",
            ("endpoint", "code"),
            registry=registry,
            buckets=(*_REQUEST_BUCKETS, 30.0, 60.0),
        )
        self._in_flight = Gauge(
            f"{PREFIX}push_in_flight",
            "PushTask calls outstanding now, by worker endpoint.",
            ("endpoint",),
            registry=registry,
        )
        self._backoffs = Counter(
            f"{PREFIX}push_backoffs",
            "Times a worker endpoint was backed off after a failed push (each rest, not "
            "each failed push).",
            ("endpoint",),
            registry=registry,
        )
        self._asks = Counter(
            f"{PREFIX}push_claim_asks",
            "ClaimForPush asks answered by the state, by application and result: tasks "
            "(some claimed) or empty (nothing pending; the application rests).",
            ("application", "result"),
            registry=registry,
        )
        self._unmapped = Gauge(
            f"{PREFIX}push_unmapped_pending_activations",
            "Pending activations of an application that has no worker_map entry: they wait "
            "for one. Read from the state every few seconds.",
            ("application",),
            registry=registry,
        )
        # labels() takes a lock and builds a key; these run on every push.
        self._finished_by: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._in_flight_by: dict[str, Any] = {}

    def push_started(self, endpoint: str) -> None:
        self._in_flight_of(endpoint).inc()

    def pushed(self, endpoint: str, code: grpc.StatusCode, seconds: float) -> None:
        self._in_flight_of(endpoint).dec()
        key = (endpoint, code.name)
        children = self._finished_by.get(key)
        if children is None:
            children = self._finished_by[key] = (
                self._pushes.labels(*key),
                self._latency.labels(*key),
            )
        children[0].inc()
        children[1].observe(seconds)

    def backed_off(self, endpoint: str) -> None:
        self._backoffs.labels(endpoint).inc()

    def claim_answered(self, application: str, tasks: int) -> None:
        self._asks.labels(application, "tasks" if tasks else "empty").inc()

    def unmapped_pending(self, counts: Mapping[str, int]) -> None:
        for application, count in counts.items():
            self._unmapped.labels(application).set(count)

    def _in_flight_of(self, endpoint: str) -> Any:
        child = self._in_flight_by.get(endpoint)
        if child is None:
            child = self._in_flight_by[endpoint] = self._in_flight.labels(endpoint)
        return child


class _BucketSeries:
    """One label set's observations: a count per bucket (the last: above every bound)."""

    __slots__ = ("bounds", "counts", "le", "sum_s")

    def __init__(self, bounds: tuple[float, ...], le: tuple[str, ...]) -> None:
        self.bounds = bounds
        self.le = le
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    def export(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative = list(accumulate(self.counts.copy()))
        family.add_metric(labels, list(zip(self.le, cumulative, strict=True)), self.sum_s)


class RuntimeRuleMetrics:
    """The incident controls (`actors.control`, the state's `RuleObserver`): what the rules
    did and whether the rules file reads. Killswitch entries are few and set by an operator,
    so the entry is a label."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._killed = Counter(
            f"{PREFIX}killswitch_dropped",
            "Activations dropped by a killswitch entry, at ingest or from what was waiting.",
            ("entry",),
            registry=registry,
        )
        self._demoted = Counter(
            f"{PREFIX}demoted_forwarded",
            "Activations of demoted namespaces forwarded to the demoted topic (acknowledged).",
            registry=registry,
        )
        self._reload_failures = Counter(
            f"{PREFIX}runtime_rules_reload_failures",
            "Reads of the runtime rules file that failed; the previous rules stayed.",
            registry=registry,
        )
        self._file_ok = Gauge(
            f"{PREFIX}runtime_rules_file_ok",
            "1 when the last read of the runtime rules file succeeded, 0 when it failed.",
            registry=registry,
        )
        self._file_ok.set(1)

    def killed(self, label: str, count: int) -> None:
        self._killed.labels(label).inc(count)

    def demoted(self, count: int) -> None:
        self._demoted.inc(count)

    def rules_loaded(self) -> None:
        self._file_ok.set(1)

    def rules_load_failed(self) -> None:
        self._reload_failures.inc()
        self._file_ok.set(0)


class FirstClaimMetrics:
    """The state actor's `ClaimObserver`, and the collector that exports what it observed:
    `taskbroker_first_claim_latency_seconds{namespace,taskname}`.

    Not a prometheus_client `Histogram`: its `observe` takes locks, 0.92 µs a call with the
    labelled child cached, against 0.17 µs for `first_claimed` here (timeit, 500k calls,
    this machine), on a path the state actor runs up to ~100k times a second. Only the
    state actor's thread writes, so nothing is lost without a lock. A scrape copies each
    series' counts with one `list.copy`, which holds the GIL throughout, so its buckets
    agree with each other; its sum may differ from them by the claims made meanwhile.

    At most `max_task_names` (namespace, taskname) pairs get series of their own. Later
    pairs of a namespace that has one report taskname "other", so a namespace's total stays
    right for every namespace seen before the cap (the dashboard sums by namespace); a
    namespace first seen past the cap reports namespace "other" too, since namespaces are
    no better bounded than task names. At most twice `max_task_names` series, plus one.
    """

    def __init__(self, registry: CollectorRegistry, max_task_names: int) -> None:
        if max_task_names < 1:
            raise ValueError(f"max_task_names must be at least 1, got {max_task_names}")
        self._max_task_names = max_task_names
        self._pairs = 0
        self._by_namespace: dict[str, dict[str, _BucketSeries]] = {}
        registry.register(self)

    def first_claimed(self, namespace: str, taskname: str, latency_s: float) -> None:
        by_task = self._by_namespace.get(namespace)
        series = None if by_task is None else by_task.get(taskname)
        if series is None:
            series = self._series_of_new(namespace, taskname)
        series.counts[bisect_left(_FIRST_CLAIM_BUCKETS, latency_s)] += 1
        series.sum_s += latency_s

    def _series_of_new(self, namespace: str, taskname: str) -> _BucketSeries:
        """The series a pair without one reports to: its own while under the cap."""
        by_task = self._by_namespace.get(namespace)
        if self._pairs < self._max_task_names:
            self._pairs += 1
            if by_task is None:
                by_task = self._by_namespace[namespace] = {}
            own = by_task[taskname] = _BucketSeries(_FIRST_CLAIM_BUCKETS, _FIRST_CLAIM_LE)
            return own
        if by_task is None:
            by_task = self._by_namespace.get(OTHER)
            if by_task is None:
                by_task = self._by_namespace[OTHER] = {}
        # Not cached under the pair's own name: that would grow with every name seen.
        series = by_task.get(OTHER)
        if series is None:
            series = by_task[OTHER] = _BucketSeries(_FIRST_CLAIM_BUCKETS, _FIRST_CLAIM_LE)
        return series

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        # Copies, because the state actor may add a series while a scrape reads them.
        for namespace, by_task in self._by_namespace.copy().items():
            for taskname, series in by_task.copy().items():
                series.export(family, [namespace, taskname])
        return [family]

    @staticmethod
    def _family() -> HistogramMetricFamily:
        return HistogramMetricFamily(
            f"{PREFIX}first_claim_latency_seconds",
            "Time from an activation's received_at (its delay_until when it was delayed) to "
            "its first claim by a worker, by namespace and task name; a claim after a "
            'deadline reset is not counted. Past metrics_max_task_names pairs: taskname "other" '
            'within a namespace already seen, namespace "other" for a new one. Not reported in '
            "the sqlite-direct store mode.",
            labels=("namespace", "taskname"),
        )


class Metrics:
    """Every observer, declared on one registry. The supervisor hands each to its actor;
    it builds `FirstClaimMetrics` itself, on `registry`, since that one takes a setting."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.mailbox = MailboxMetrics(registry)
        self.frontend = FrontendMetrics(registry)
        self.upkeep = UpkeepMetrics(registry)
        self.writer = WriterMetrics(registry)
        self.pusher = PusherMetrics(registry)


# --- snapshots of what lives inside actors -----------------------------------------------------

T = TypeVar("T")


class KafkaContact(Protocol):
    """When Kafka last answered the consumer (`actors.consumer.KafkaSilence`), readable
    from any thread without a message."""

    def silent_s(self) -> float: ...

    def answering(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Snapshot(Generic[T]):
    value: T
    taken_at: float
    """`time.monotonic()` when the answer arrived."""


class _Source(Generic[T]):
    """One actor asked one question, with at most one ask in flight: an actor that does not
    answer is not sent another question each round, so its mailbox does not fill with them.
    """

    def __init__(self, name: str, ref: pykka.ActorRef[Any], question: object) -> None:
        self.name = name
        self._ref = ref
        self._question = question
        self._pending: pykka.Future[Any] | None = None
        self.latest: Snapshot[T] | None = None

    def ask(self) -> None:
        if self._pending is not None:
            return
        try:
            self._pending = self._ref.ask(self._question, block=False)
        except (BrokerError, pykka.ActorDeadError) as error:  # a `fail` mailbox, a dead actor
            logger.debug("snapshot of %s not asked: %s", self.name, error)

    def collect(self, timeout_s: float, now: Callable[[], float]) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            value: T = pending.get(timeout=max(timeout_s, 0.0))
        except pykka.Timeout:
            return  # still in flight; collected in a later round
        except (BrokerError, pykka.ActorDeadError) as error:
            logger.debug("snapshot of %s failed: %s", self.name, error)
        else:
            self.latest = Snapshot(value, now())
        self._pending = None


class ActorSnapshots:
    """Asks the state, consumer and writer for their numbers every `interval_s` on a daemon
    thread, each answer bounded by `ask_timeout_s`; readers get the latest answers.

    Sources may be added as their actors start (`watch`), so the poller can exist, and
    scrapes be answered, before the broker has finished starting.
    """

    def __init__(
        self,
        *,
        state: pykka.ActorRef[Any] | None = None,
        consumer: pykka.ActorRef[Any] | None = None,
        writer: pykka.ActorRef[Any] | None = None,
        interval_s: float = 1.0,
        ask_timeout_s: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0 or not ask_timeout_s > 0:
            raise ValueError("snapshot interval_s and ask_timeout_s must be positive")
        self._state: _Source[StateStats] | None = None
        self._consumer: _Source[ConsumerStats] | None = None
        self._writer: _Source[StoreSizes] | None = None
        self.kafka: KafkaContact | None = None
        """Read live, not polled: set once the consumer exists."""
        self._interval_s = interval_s
        self._ask_timeout_s = ask_timeout_s
        self._monotonic = monotonic
        self._round_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshots", daemon=True)
        self.watch(state=state, consumer=consumer, writer=writer)

    def watch(
        self,
        *,
        state: pykka.ActorRef[Any] | None = None,
        consumer: pykka.ActorRef[Any] | None = None,
        writer: pykka.ActorRef[Any] | None = None,
    ) -> None:
        """Poll these actors from the next round on."""
        with self._round_lock:
            if state is not None:
                self._state = _Source("state", state, Stats())
            if consumer is not None:
                self._consumer = _Source("consumer", consumer, ConsumerStatsQuery())
            if writer is not None:
                self._writer = _Source("writer", writer, StoreSizesQuery())

    def __repr__(self) -> str:
        ages = {name: f"{age:.1f}s" for name, age in self.ages_s().items()}
        return f"<ActorSnapshots every {self._interval_s}s ages={ages}>"

    @property
    def state(self) -> Snapshot[StateStats] | None:
        return None if self._state is None else self._state.latest

    @property
    def consumer(self) -> Snapshot[ConsumerStats] | None:
        return None if self._consumer is None else self._consumer.latest

    @property
    def store(self) -> Snapshot[StoreSizes] | None:
        return None if self._writer is None else self._writer.latest

    def ages_s(self) -> dict[str, float]:
        """Seconds since each source last answered; a source that never did is absent."""
        now = self._monotonic()
        return {
            source.name: now - source.latest.taken_at
            for source in self._sources()
            if source.latest is not None
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._ask_timeout_s + 1.0)

    def refresh(self) -> None:
        """One round now, on the caller's thread: ask every source, wait for the answers
        until the ask timeout. Rounds never overlap."""
        with self._round_lock:
            deadline = self._monotonic() + self._ask_timeout_s
            sources = self._sources()
            for source in sources:
                source.ask()
            for source in sources:
                source.collect(deadline - self._monotonic(), self._monotonic)

    def _sources(self) -> list[_Source[Any]]:
        return [s for s in (self._state, self._consumer, self._writer) if s is not None]

    def _run(self) -> None:
        while True:
            self.refresh()
            if self._stopping.wait(self._interval_s):
                return


# --- the scrape-time collector -----------------------------------------------------------------


class BrokerCollector:
    """Reads mailbox counters, actor liveness, readiness and the latest snapshots at
    scrape time. Never sends a message, so a scrape cannot hang on a busy actor."""

    def __init__(
        self,
        actors: Callable[[], Sequence[tuple[str, pykka.ActorRef[Any]]]],
        snapshots: ActorSnapshots,
        ready: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._actors = actors
        self._snapshots = snapshots
        self._ready = ready
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        # The names only, so the registry refuses a second declaration of any of them.
        return list(_Families().all())

    def collect(self) -> Iterable[Metric]:
        families = _Families()
        families.ready.add_metric([], 1.0 if self._ready() else 0.0)
        for name, ref in self._actors():
            families.add_actor(name, ref)
        snapshots = self._snapshots
        for source, age_s in snapshots.ages_s().items():
            families.snapshot_age.add_metric([source], age_s)
        if snapshots.state is not None:
            families.add_state(snapshots.state.value, self._clock())
        if snapshots.kafka is not None:
            families.add_kafka_contact(snapshots.kafka)
        if snapshots.consumer is not None:
            families.add_consumer(
                snapshots.consumer.value,
                lag_known=snapshots.kafka is None or snapshots.kafka.answering(),
            )
        if snapshots.store is not None:
            families.add_store(snapshots.store.value)
        return list(families.all())


class _Families:
    """One scrape's worth of the collector's families, filled from what is known."""

    def __init__(self) -> None:
        self.ready = _gauge(
            "ready",
            "1 while the broker is ready: restored, consuming, and upkeep ticking (what "
            "/readyz and gRPC health report); 0 otherwise.",
        )
        self.actor_up = _gauge("actor_up", "1 while the actor runs, 0 once it stopped.", "actor")
        self.depth = _gauge(
            "mailbox_depth_messages",
            "Messages waiting in the actor's mailbox now.",
            "actor",
        )
        self.high_water = _gauge(
            "mailbox_high_water_messages",
            "The most messages the actor's mailbox has held at once since it started.",
            "actor",
        )
        self.capacity = _gauge(
            "mailbox_capacity_messages",
            "The mailbox's configured size, with its overflow policy as a label.",
            "actor",
            "policy",
        )
        self.overflows = _counter(
            "mailbox_overflows",
            "Messages the actor's full mailbox refused (block after the push timeout, fail) "
            "or dropped (drop_newest, drop_oldest), by actor and policy.",
            "actor",
            "policy",
        )
        self.snapshot_age = _gauge(
            "snapshot_age_seconds",
            "Age of the latest answer from an actor (state, consumer, writer) behind the "
            "values read from it; it grows while that actor is too busy to answer.",
            "source",
        )
        self.activations = _gauge(
            "state_activations",
            "Activations held by the state actor, by status (finished ones are not held).",
            "status",
        )
        self.activations_by_namespace = _gauge(
            "state_namespace_activations",
            "Activations held by the state actor, by application, namespace and status.",
            "application",
            "namespace",
            "status",
        )
        self.activations_by_partition = _gauge(
            "state_partition_activations",
            "Activations held by the state actor, by the Kafka partition they came from.",
            "partition",
        )
        self.oldest_pending = _gauge(
            "state_oldest_pending_age_seconds",
            "Age of the oldest pending activation, since it was ingested (0: none pending). "
            "The pending lag: how far workers are behind.",
        )
        self.dirty = _gauge(
            "state_dirty_records",
            "Records changed in memory and not yet handed to the writer.",
        )
        self.flush_outstanding = _gauge(
            "state_flush_outstanding",
            "1 while a flush is with the writer and not yet answered.",
        )
        self.ingest_paused = _gauge(
            "state_ingest_paused",
            "1 while the state has asked the consumer to pause (a max_*_count limit reached).",
        )
        self.claims = _counter(
            "state_claims",
            "Claims answered by the state actor: hit (a task handed out) or miss (none pending).",
            "result",
        )
        self.conclusions = _counter(
            "state_conclusions",
            "Worker results handled by the state actor, by outcome: applied, late (after a "
            "deadline reset), unknown (no such task, or already finished).",
            "outcome",
        )
        self.consumed = _counter(
            "kafka_messages_consumed", "Messages read from the activations topic."
        )
        self.ingested = _counter(
            "kafka_activations_ingested", "Activations decoded and handed to the state actor."
        )
        self.batches = _counter("kafka_ingest_batches", "Ingest batches sent to the state actor.")
        self.decode_failures = _counter(
            "kafka_decode_failures",
            "Messages that are not valid activations, by reason; each is dead-lettered.",
            "reason",
        )
        self.dead_lettered = _counter(
            "kafka_dead_lettered",
            "Undecodable messages sent to the dead-letter topic and acknowledged.",
        )
        self.dead_letter_failures = _counter(
            "kafka_dead_letter_failures",
            "Dead-letter produces Kafka did not acknowledge (the partition is held and "
            "the message tried again).",
        )
        self.kafka_errors = _counter("kafka_errors", "Errors reported by the Kafka consumer.")
        self.commit_failures = _counter(
            "kafka_commit_failures", "Offset commits that Kafka refused."
        )
        self.assigned = _gauge(
            "kafka_assigned_partitions", "Partitions assigned to this broker's consumer."
        )
        self.paused = _gauge(
            "kafka_paused_partitions",
            "Assigned partitions paused now (backpressure from the state, or a held dead letter).",
        )
        self.backpressure = _gauge(
            "kafka_backpressure",
            "1 while the consumer pauses ingest because the state asked it to.",
        )
        self.committed = _gauge(
            "kafka_committed_offset",
            "The offset last committed for the partition (the next one to consume); "
            "everything before it is durable in SQLite.",
            "partition",
        )
        self.high_watermark = _gauge(
            "kafka_high_watermark_offset",
            "The partition's end (the offset of the next message produced) as of the "
            "consumer's last fetch from it.",
            "partition",
        )
        self.lag = _gauge(
            "kafka_consumer_lag_messages",
            "Messages of the partition not yet committed: high watermark minus committed "
            "offset (consumed but not yet durable ones included). Absent for a partition "
            "until this process first commits for it, and while Kafka does not answer "
            "(its end is unknown then).",
            "partition",
        )
        self.kafka_reachable = _gauge(
            "kafka_reachable",
            "1 while Kafka answers the consumer; 0 once it has been silent for the session "
            "timeout (down, hung or cut off): the broker then serves what it holds, and "
            "consumes and commits nothing until Kafka answers again.",
        )
        self.kafka_silence = _gauge(
            "kafka_silence_seconds",
            "Seconds since Kafka last answered the consumer (anything received at all).",
        )
        self.db_bytes = _gauge("store_database_bytes", "Size of the SQLite database file.")
        self.wal_bytes = _gauge("store_wal_bytes", "Size of the SQLite write-ahead log.")

    def all(self) -> Iterator[Metric]:
        return (value for value in vars(self).values() if isinstance(value, Metric))

    def add_actor(self, name: str, ref: pykka.ActorRef[Any]) -> None:
        self.actor_up.add_metric([name], 1.0 if ref.is_alive() else 0.0)
        try:
            stats: MailboxStats = mailbox_stats_of(ref)
        except TypeError:
            return  # not a broker actor: no mailbox counters to report
        self.depth.add_metric([name], stats.depth)
        self.high_water.add_metric([name], stats.high_water)
        self.capacity.add_metric([name, stats.policy.value], stats.size)
        self.overflows.add_metric([name, stats.policy.value], stats.overflows)

    def add_state(self, stats: StateStats, now: float) -> None:
        for status, count in stats.by_status.items():
            self.activations.add_metric([status.name.lower()], count)
        for (application, namespace, status), count in stats.by_group.items():
            self.activations_by_namespace.add_metric(
                [application, namespace, status.name.lower()], count
            )
        for partition, count in stats.by_partition.items():
            self.activations_by_partition.add_metric([str(partition)], count)
        added_at = stats.oldest_pending_added_at
        self.oldest_pending.add_metric([], 0.0 if added_at is None else max(now - added_at, 0.0))
        self.dirty.add_metric([], stats.dirty)
        self.flush_outstanding.add_metric([], float(stats.flush_outstanding))
        self.ingest_paused.add_metric([], float(stats.ingest_paused))
        for result in CLAIM_RESULTS:
            self.claims.add_metric([result], stats.claims.get(result, 0))
        for outcome in ConcludeOutcome:
            self.conclusions.add_metric([outcome.value], stats.conclusions.get(outcome.value, 0))

    def add_kafka_contact(self, kafka: KafkaContact) -> None:
        self.kafka_reachable.add_metric([], 1.0 if kafka.answering() else 0.0)
        self.kafka_silence.add_metric([], kafka.silent_s())

    def add_consumer(self, stats: ConsumerStats, lag_known: bool = True) -> None:
        self.consumed.add_metric([], stats.consumed)
        self.ingested.add_metric([], stats.ingested)
        self.batches.add_metric([], stats.batches)
        for reason in DECODE_REASONS:
            self.decode_failures.add_metric([reason], stats.decode_failures.get(reason, 0))
        self.dead_lettered.add_metric([], stats.dead_lettered)
        self.dead_letter_failures.add_metric([], stats.dead_letter_failures)
        self.kafka_errors.add_metric([], stats.kafka_errors)
        self.commit_failures.add_metric([], stats.commit_failures)
        self.assigned.add_metric([], len(stats.assigned))
        self.paused.add_metric([], len(stats.paused))
        self.backpressure.add_metric([], float(stats.backpressure))
        for partition, offset in stats.committed.items():
            self.committed.add_metric([str(partition)], offset)
        for partition, high in stats.high_watermarks.items():
            self.high_watermark.add_metric([str(partition)], high)
            committed = stats.committed.get(partition)
            # Until this process commits for a partition, what the group committed before
            # is unknown here, and a silent Kafka's end is unknown: no lag rather than a
            # made-up one.
            if committed is not None and lag_known:
                self.lag.add_metric([str(partition)], max(high - committed, 0))

    def add_store(self, sizes: StoreSizes) -> None:
        self.db_bytes.add_metric([], sizes.db_bytes)
        self.wal_bytes.add_metric([], sizes.wal_bytes)


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}{name}", documentation, labels=labels)


def _counter(name: str, documentation: str, *labels: str) -> CounterMetricFamily:
    # CounterMetricFamily appends `_total` to the samples, as Counter does.
    return CounterMetricFamily(f"{PREFIX}{name}", documentation, labels=labels)
