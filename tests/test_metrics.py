"""Metrics: each observer call moves its series; the collector reads mailboxes and actor
snapshots at scrape time without waiting on a busy actor. A fresh registry per test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pykka
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from actors.errors import MailboxFull
from actors.messages import Claim, Flush, Ingest, StoreSizesQuery, TickResult, WorkBatch
from actors.metrics import (
    MAILBOX_BUCKETS,
    TRANSITION_KINDS,
    ActorSnapshots,
    BrokerCollector,
    FirstClaimMetrics,
    FrontendMetrics,
    MailboxMetrics,
    Metrics,
    UpkeepMetrics,
    WriterMetrics,
)
from actors.records import KafkaOffset, Offset, Partition, Status
from actors.runtime import BrokerActor, MailboxConfig, MailboxPolicy, mailbox_stats_of
from actors.state import StateActor, StateConfig
from actors.writer import SqliteWriter, WriterConfig
from tests.factories import make_record

TIMEOUT_S = 5.0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def actors() -> Iterator[list[pykka.ActorRef[Any]]]:
    """Refs a test started; all stopped in teardown, even when the test failed."""
    started: list[pykka.ActorRef[Any]] = []
    yield started
    for ref in reversed(started):
        if ref.is_alive():
            ref.stop(timeout=TIMEOUT_S)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@dataclass(frozen=True, slots=True)
class Hold:
    entered: threading.Event
    release: threading.Event


@dataclass(frozen=True, slots=True)
class Ping:
    pass


class Holder(BrokerActor):
    """Answers `Ping`; `Hold` keeps it busy until released (bounded by the test timeout)."""

    def handle(self, message: object) -> object:
        match message:
            case Hold(entered, release):
                entered.set()
                release.wait(TIMEOUT_S)
            case Ping():
                return "pong"
        return None


def hold(ref: pykka.ActorRef[Any]) -> threading.Event:
    entered, release = threading.Event(), threading.Event()
    ref.tell(Hold(entered, release))
    assert entered.wait(TIMEOUT_S)
    return release


# --- observers ----------------------------------------------------------------------------------


def test_mailbox_metrics_histograms_by_actor_and_counters_by_message_type(
    registry: CollectorRegistry,
) -> None:
    observer = MailboxMetrics(registry)
    observer.dequeued("state", "Claim", 0.002, depth=3)
    observer.dequeued("state", "Ingest", 0.004, depth=2)
    observer.handled("state", "Claim", 0.0001)
    observer.handled("state", "Claim", 0.0003)
    observer.handled("writer", "Flush", 0.3)

    wait = "taskbroker_mailbox_wait_seconds"
    assert value(registry, f"{wait}_count", actor="state") == 2
    assert value(registry, f"{wait}_sum", actor="state") == pytest.approx(0.006)
    assert value(registry, f"{wait}_bucket", actor="state", le="0.001") == 0
    assert value(registry, f"{wait}_bucket", actor="state", le="0.0025") == 1
    assert value(registry, f"{wait}_bucket", actor="state", le="0.01") == 2
    assert value(registry, f"{wait}_bucket", actor="state", le="+Inf") == 2
    handling = "taskbroker_mailbox_handling_seconds"
    assert value(registry, f"{handling}_count", actor="state") == 2
    assert value(registry, f"{handling}_bucket", actor="writer", le="0.25") == 0
    assert value(registry, f"{handling}_bucket", actor="writer", le="1.0") == 1
    handled = "taskbroker_mailbox_messages_handled_total"
    assert value(registry, handled, actor="state", message="Claim") == 2
    assert value(registry, handled, actor="writer", message="Flush") == 1
    busy = "taskbroker_mailbox_message_handling_seconds_total"
    assert value(registry, busy, actor="state", message="Claim") == pytest.approx(0.0004)
    # The message type labels only the counters.
    assert value(registry, f"{wait}_count", actor="state", message="Claim") is None
    assert observer.waits()["state"][5] == 1  # 0.002 s: the bucket up to 0.0025 s


def test_mailbox_metrics_buckets_hold_the_bound_itself(registry: CollectorRegistry) -> None:
    observer = MailboxMetrics(registry)
    for bound in MAILBOX_BUCKETS:
        observer.dequeued("a", "M", bound, depth=0)
    observer.dequeued("a", "M", MAILBOX_BUCKETS[-1] * 2, depth=0)
    assert observer.waits()["a"] == [1] * (len(MAILBOX_BUCKETS) + 1)
    exposition = generate_latest(registry).decode()
    assert "_created" not in exposition


def test_mailbox_metrics_on_a_real_actor(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]]
) -> None:
    ref = Holder.start("holder", MailboxConfig(size=10), MailboxMetrics(registry))
    actors.append(ref)
    for _ in range(3):
        assert ref.ask(Ping(), timeout=TIMEOUT_S) == "pong"

    assert value(registry, "taskbroker_mailbox_wait_seconds_count", actor="holder") == 3
    assert value(registry, "taskbroker_mailbox_handling_seconds_count", actor="holder") == 3
    handled = "taskbroker_mailbox_messages_handled_total"
    assert value(registry, handled, actor="holder", message="Ping") == 3


def test_frontend_metrics_requests_and_latency_by_method_and_code(
    registry: CollectorRegistry,
) -> None:
    observer = FrontendMetrics(registry)
    observer.handled("GetTask", grpc.StatusCode.OK, 0.001)
    observer.handled("GetTask", grpc.StatusCode.NOT_FOUND, 0.002)
    observer.handled("GetTask", grpc.StatusCode.NOT_FOUND, 0.002)
    observer.handled("SetTaskStatus", grpc.StatusCode.RESOURCE_EXHAUSTED, 0.5)
    observer.batch_sent(7)

    requests = "taskbroker_grpc_requests_total"
    assert value(registry, requests, method="GetTask", code="OK") == 1
    assert value(registry, requests, method="GetTask", code="NOT_FOUND") == 2
    assert value(registry, requests, method="SetTaskStatus", code="RESOURCE_EXHAUSTED") == 1
    latency = "taskbroker_grpc_request_duration_seconds"
    assert value(registry, f"{latency}_count", method="GetTask", code="NOT_FOUND") == 2
    assert value(
        registry, f"{latency}_sum", method="SetTaskStatus", code="RESOURCE_EXHAUSTED"
    ) == pytest.approx(0.5)
    batches = "taskbroker_grpc_state_batch_size"
    assert value(registry, f"{batches}_count") == 1
    assert value(registry, f"{batches}_bucket", le="4.0") == 0
    assert value(registry, f"{batches}_bucket", le="8.0") == 1


def test_upkeep_metrics_duration_transitions_and_last_tick(registry: CollectorRegistry) -> None:
    observer = UpkeepMetrics(registry, clock=lambda: 1_700_000_000.0)
    transitions = "taskbroker_upkeep_transitions_total"
    for kind in TRANSITION_KINDS:  # every kind is there from the start, at zero
        assert value(registry, transitions, kind=kind) == 0
    assert value(registry, "taskbroker_upkeep_last_tick_timestamp_seconds") == 0

    result = TickResult(
        to_produce=(), deadline_resets=2, expired=3, delays_due=4, failed_by_deadline=5
    )
    observer.ticked(0.02, result, produced=6, failed=7)
    observer.ticked(0.01, result, produced=0, failed=0)

    expected = {
        "deadline_reset": 4,
        "expired": 6,
        "delay_due": 8,
        "failed_by_deadline": 10,
        "produced": 6,
        "produce_failed": 7,
    }
    assert {kind: value(registry, transitions, kind=kind) for kind in expected} == expected
    assert value(registry, "taskbroker_upkeep_tick_duration_seconds_count") == 2
    assert value(registry, "taskbroker_upkeep_tick_duration_seconds_sum") == pytest.approx(0.03)
    assert value(registry, "taskbroker_upkeep_last_tick_timestamp_seconds") == 1_700_000_000.0


def test_writer_metrics_flush_duration_rows_bytes_and_failures(
    registry: CollectorRegistry,
) -> None:
    observer = WriterMetrics(registry)
    observer.flushed(0.004, rows=30, bytes_written=5000)
    observer.flush_failed()
    observer.flush_failed()

    assert value(registry, "taskbroker_writer_flush_duration_seconds_count") == 1
    assert value(registry, "taskbroker_writer_flush_rows_sum") == 30
    assert value(registry, "taskbroker_writer_flush_bytes_sum") == 5000
    assert value(registry, "taskbroker_writer_flush_failures_total") == 2


class _Collected:
    def __init__(self) -> None:
        self.messages: list[object] = []

    def tell(self, message: object) -> None:
        self.messages.append(message)


FIRST_CLAIM = "taskbroker_first_claim_latency_seconds"


def test_first_claim_metrics_buckets_count_and_sum_by_namespace_and_task(
    registry: CollectorRegistry,
) -> None:
    observer = FirstClaimMetrics(registry, max_task_names=100)
    for latency_s in (0.003, 0.004, 0.2, 45.0, 7200.0):
        observer.first_claimed("ns", "send_email", latency_s)
    observer.first_claimed("ns", "resize", 0.001)

    labels = {"namespace": "ns", "taskname": "send_email"}
    assert value(registry, f"{FIRST_CLAIM}_count", **labels) == 5
    assert value(registry, f"{FIRST_CLAIM}_sum", **labels) == pytest.approx(7245.207)
    cumulative = {
        le: value(registry, f"{FIRST_CLAIM}_bucket", **labels, le=le)
        for le in ("0.001", "0.0025", "0.005", "0.25", "30.0", "60.0", "600.0", "+Inf")
    }
    assert cumulative == {
        "0.001": 0,
        "0.0025": 0,
        "0.005": 2,
        "0.25": 3,
        "30.0": 3,
        "60.0": 4,
        "600.0": 4,
        "+Inf": 5,
    }
    # A bound is inclusive (le): 1 ms lands in the first bucket.
    resize = {"namespace": "ns", "taskname": "resize"}
    assert value(registry, f"{FIRST_CLAIM}_bucket", **resize, le="0.001") == 1


def test_first_claim_metrics_cap_the_label_pairs(registry: CollectorRegistry) -> None:
    observer = FirstClaimMetrics(registry, max_task_names=2)
    observer.first_claimed("n1", "a", 1.0)
    observer.first_claimed("n1", "b", 1.0)
    observer.first_claimed("n1", "c", 1.0)  # a known namespace: its own "other"
    observer.first_claimed("n1", "d", 1.0)
    observer.first_claimed("n2", "a", 1.0)  # a new namespace: "other" / "other"
    observer.first_claimed("n3", "e", 1.0)
    observer.first_claimed("n1", "a", 1.0)  # under the cap from the start: still its own

    counts = {
        (s.labels["namespace"], s.labels["taskname"]): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == f"{FIRST_CLAIM}_count"
    }
    assert counts == {
        ("n1", "a"): 2,
        ("n1", "b"): 1,
        ("n1", "other"): 2,
        ("other", "other"): 2,
    }
    with pytest.raises(ValueError, match="max_task_names"):
        FirstClaimMetrics(CollectorRegistry(), max_task_names=0)


def test_a_state_actors_first_claims_appear_on_the_metrics_page(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]]
) -> None:
    state = StateActor.start(
        StateConfig(),
        MailboxConfig(size=100),
        claim_observer=FirstClaimMetrics(registry, max_task_names=100),
        clock=lambda: 1000.0,
    )
    actors.append(state)
    records = (
        make_record("a", namespace="ns", taskname="t", received_at=999.996),
        make_record("b", namespace="ns", taskname="t", received_at=998.0),
    )
    state.tell(Ingest(records, (KafkaOffset(Partition(0), Offset(1)),)))
    answers = state.ask(WorkBatch((Claim(), Claim(), Claim())), block=True, timeout=TIMEOUT_S)
    assert answers[2] is None

    page = generate_latest(registry).decode()
    (family,) = [f for f in text_string_to_metric_families(page) if f.name == FIRST_CLAIM]
    assert family.type == "histogram"
    assert "sqlite-direct" in family.documentation
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[(f"{FIRST_CLAIM}_count", None)] == 2
    assert samples[(f"{FIRST_CLAIM}_sum", None)] == pytest.approx(2.004)
    assert samples[(f"{FIRST_CLAIM}_bucket", "0.005")] == 1
    assert samples[(f"{FIRST_CLAIM}_bucket", "2.5")] == 2


def test_the_writer_reports_each_committed_flush(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]], tmp_path: Path
) -> None:
    writer = SqliteWriter.start(
        WriterConfig(db_path=tmp_path / "broker.sqlite"),
        _Collected(),
        mailbox=MailboxConfig(size=16),
        flush_observer=WriterMetrics(registry),
    )
    actors.append(writer)
    records = tuple(make_record(f"id-{n}") for n in range(3))
    flush = Flush(
        seq=1,
        upserts=tuple(record.row() for record in records),
        deletes=(),
        new_blobs=tuple((r.id, r.activation) for r in records),
        offsets=(),
    )
    writer.tell(flush)
    writer.ask(StoreSizesQuery(), timeout=TIMEOUT_S)  # answered after the flush

    assert value(registry, "taskbroker_writer_flush_duration_seconds_count") == 1
    assert value(registry, "taskbroker_writer_flush_rows_sum") == flush.row_changes
    assert value(registry, "taskbroker_writer_flush_bytes_sum") == sum(
        len(r.activation) for r in records
    )
    assert value(registry, "taskbroker_writer_flush_failures_total") == 0


# --- the collector -----------------------------------------------------------------------------


def test_collector_reads_mailbox_counters_and_an_overflow_moves_its_counter(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]]
) -> None:
    ref = Holder.start("holder", MailboxConfig(size=2, policy=MailboxPolicy.FAIL))
    actors.append(ref)
    registry.register(BrokerCollector(lambda: [("holder", ref)], ActorSnapshots(), lambda: True))

    release = hold(ref)
    ref.tell(Ping())
    ref.tell(Ping())
    with pytest.raises(MailboxFull):
        ref.tell(Ping())

    assert value(registry, "taskbroker_mailbox_depth_messages", actor="holder") == 2
    assert value(registry, "taskbroker_mailbox_high_water_messages", actor="holder") == 2
    assert (
        value(registry, "taskbroker_mailbox_capacity_messages", actor="holder", policy="fail") == 2
    )
    overflows = "taskbroker_mailbox_overflows_total"
    assert value(registry, overflows, actor="holder", policy="fail") == 1
    assert value(registry, "taskbroker_actor_up", actor="holder") == 1
    assert value(registry, "taskbroker_ready") == 1

    release.set()
    deadline = time.monotonic() + TIMEOUT_S
    while mailbox_stats_of(ref).depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert value(registry, "taskbroker_mailbox_depth_messages", actor="holder") == 0
    assert value(registry, "taskbroker_mailbox_high_water_messages", actor="holder") == 2
    ref.stop(timeout=TIMEOUT_S)
    assert value(registry, "taskbroker_actor_up", actor="holder") == 0


def test_collector_reports_the_state_actors_numbers_from_a_snapshot(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]]
) -> None:
    now = 10_000.0
    state = StateActor.start(StateConfig(), MailboxConfig(size=100), clock=lambda: now)
    actors.append(state)
    records = (
        make_record("a", namespace="emails"),
        make_record("b", namespace="emails"),
        make_record("c", namespace="reports", application="billing"),
    )
    state.tell(Ingest(records, (KafkaOffset(Partition(0), Offset(2)),)))
    snapshots = ActorSnapshots(state=state)
    registry.register(BrokerCollector(lambda: [("state", state)], snapshots, lambda: False))
    assert (
        value(registry, "taskbroker_state_activations", status="pending") is None
    )  # not asked yet

    snapshots.refresh()

    assert value(registry, "taskbroker_ready") == 0
    assert value(registry, "taskbroker_state_activations", status="pending") == 3
    assert value(registry, "taskbroker_state_activations", status="processing") == 0
    by_namespace = "taskbroker_state_namespace_activations"
    assert (
        value(registry, by_namespace, application="app", namespace="emails", status="pending") == 2
    )
    assert (
        value(registry, by_namespace, application="billing", namespace="reports", status="pending")
        == 1
    )
    assert value(registry, "taskbroker_state_partition_activations", partition="0") == 3
    oldest_age = value(registry, "taskbroker_state_oldest_pending_age_seconds")
    assert oldest_age is not None
    assert oldest_age > 0  # ingested at the fake clock's 10_000
    for result in ("hit", "miss"):
        assert value(registry, "taskbroker_state_claims_total", result=result) == 0
    for outcome in ("applied", "late", "unknown"):
        assert value(registry, "taskbroker_state_conclusions_total", outcome=outcome) == 0
    age = value(registry, "taskbroker_snapshot_age_seconds", source="state")
    assert age is not None
    assert 0 <= age < TIMEOUT_S


def test_a_busy_actor_never_slows_a_scrape_and_gets_one_question_at_a_time(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]]
) -> None:
    ref = Holder.start("holder", MailboxConfig(size=10))
    actors.append(ref)
    snapshots = ActorSnapshots(state=ref, ask_timeout_s=0.05)
    registry.register(BrokerCollector(lambda: [("holder", ref)], snapshots, lambda: True))
    release = hold(ref)

    started = time.monotonic()
    for _ in range(3):
        snapshots.refresh()  # each round waits at most the ask timeout
        assert value(registry, "taskbroker_mailbox_depth_messages", actor="holder") == 1
    assert time.monotonic() - started < 1.0
    assert snapshots.state is None  # no answer yet, and no number made up
    assert value(registry, "taskbroker_snapshot_age_seconds", source="state") is None
    release.set()


def test_snapshots_poll_on_their_own_thread_until_stopped(
    actors: list[pykka.ActorRef[Any]], tmp_path: Path
) -> None:
    state = StateActor.start(StateConfig(), MailboxConfig(size=100))
    actors.append(state)
    writer = SqliteWriter.start(
        WriterConfig(db_path=tmp_path / "broker.sqlite"), state, mailbox=MailboxConfig(size=16)
    )
    actors.append(writer)
    snapshots = ActorSnapshots(state=state, writer=writer, interval_s=0.02)
    snapshots.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while (snapshots.state is None or snapshots.store is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert snapshots.state is not None
        assert snapshots.state.value.by_status[Status.PENDING] == 0
        assert snapshots.store is not None
        assert snapshots.store.value.db_bytes > 0
    finally:
        snapshots.stop()
    assert "metrics-snapshots" not in {t.name for t in threading.enumerate()}


def test_every_family_is_declared_once_with_help_prefix_and_conventions(
    registry: CollectorRegistry,
) -> None:
    Metrics(registry)
    FirstClaimMetrics(registry, max_task_names=100)
    collector = BrokerCollector(list, ActorSnapshots(), lambda: True)
    registry.register(collector)
    with pytest.raises(DuplicateTimeseries):
        registry.register(BrokerCollector(list, ActorSnapshots(), lambda: True))
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)  # a second declaration of the same names
    with pytest.raises(ValueError, match="Duplicated"):
        FirstClaimMetrics(registry, max_task_names=100)

    families = [*registry.collect(), *collector.describe()]
    for family in families:
        assert family.name.startswith("taskbroker_"), family.name
        assert len(family.documentation) > 20, family.name
        if family.type == "counter":
            # The exposition adds `_total`; the family name itself carries no unit clash.
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram" or family.name.endswith(("_seconds", "_bytes")):
            assert family.name.endswith(("_seconds", "_bytes", "_rows", "_size")), (
                f"{family.name} names no unit"
            )


def test_state_stats_statuses_appear_as_lowercase_labels(
    registry: CollectorRegistry, actors: list[pykka.ActorRef[Any]]
) -> None:
    state = StateActor.start(StateConfig(), MailboxConfig(size=100))
    actors.append(state)
    snapshots = ActorSnapshots(state=state)
    registry.register(BrokerCollector(lambda: [("state", state)], snapshots, lambda: True))
    snapshots.refresh()
    statuses = {
        sample.labels["status"]
        for family in registry.collect()
        if family.name == "taskbroker_state_activations"
        for sample in family.samples
    }
    assert statuses == {s.name.lower() for s in Status if s is not Status.COMPLETE}
