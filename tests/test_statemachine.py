"""Every transition of the state machine, driven directly with an explicit clock."""

from __future__ import annotations

import pytest

from actors.messages import ConcludeOutcome, ProduceKind
from actors.records import (
    ActivationId,
    KafkaOffset,
    Offset,
    OnAttemptsExceeded,
    Partition,
    Record,
    Status,
)
from actors.statemachine import Limits, StateMachine, first_claim_latency_s
from tests.factories import make_record

NOW = 1000.0


def ingest(machine: StateMachine, *records: Record, now: float = NOW) -> None:
    offsets = tuple(KafkaOffset(r.partition, r.offset) for r in records)
    machine.ingest(records, offsets, now)


def ids(*names: str) -> tuple[ActivationId, ...]:
    return tuple(ActivationId(n) for n in names)


def claimed_id(
    machine: StateMachine,
    now: float = NOW,
    *,
    application: str | None = None,
    namespace: str | None = None,
) -> str | None:
    record = machine.claim(now, application, namespace)
    return None if record is None else record.id


# --- ingest ---------------------------------------------------------------------------


def test_ingest_makes_records_pending_and_dirty() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"), make_record("b"))
    assert machine.count(Status.PENDING) == 2
    assert machine.dirty_count == 2


def test_ingest_deduplicates_by_id() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"))
    result = machine.ingest((make_record("a"), make_record("b")), (), NOW)
    assert (result.accepted, result.duplicates) == (1, 1)
    assert len(machine) == 2


def test_delayed_record_waits_in_delay_until_due() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a", received_at=NOW, delay_until=NOW + 30))
    assert machine.count(Status.DELAY) == 1
    assert machine.claim(NOW + 29) is None
    assert claimed_id(machine, NOW + 30) == "a"


def test_delay_is_capped_at_the_configured_maximum() -> None:
    machine = StateMachine(Limits(max_delayed_task_allowed_s=3600))
    ingest(machine, make_record("a", received_at=NOW, delay_until=NOW + 10 * 3600))
    record = machine.get(ActivationId("a"))
    assert record is not None
    assert record.delay_until == NOW + 3600
    assert machine.tick(NOW + 3600).delays_due == 1
    assert machine.count(Status.PENDING) == 1


def test_delay_already_past_at_ingest_is_pending_at_once() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a", received_at=NOW - 60, delay_until=NOW - 30))
    assert machine.count(Status.PENDING) == 1


# --- claim ------------------------------------------------------------------------------


def test_claim_hands_out_oldest_first_and_sets_the_deadline() -> None:
    machine = StateMachine(Limits(processing_deadline_grace_s=3))
    ingest(machine, make_record("old"), now=NOW)
    ingest(machine, make_record("new"), now=NOW + 1)
    record = machine.claim(NOW + 5)
    assert record is not None
    assert record.id == "old"
    assert record.status is Status.PROCESSING
    assert record.processing_deadline == NOW + 5 + 10 + 3
    assert claimed_id(machine, NOW + 5) == "new"
    assert machine.claim(NOW + 5) is None


def test_ties_in_added_at_keep_ingest_order() -> None:
    machine = StateMachine()
    records = [make_record(f"t{i}", offset=Offset(100 - i)) for i in (3, 1, 4, 0, 2)]
    ingest(machine, *records)
    order = [claimed_id(machine) for _ in records]
    assert order == ["t3", "t1", "t4", "t0", "t2"]


def test_application_filter_never_sees_other_applications() -> None:
    machine = StateMachine()
    ingest(machine, make_record("x1", application="x"), make_record("y1", application="y"))
    assert claimed_id(machine, application="y") == "y1"
    assert machine.claim(NOW, application="y") is None
    assert claimed_id(machine, application="x") == "x1"


def test_namespace_filter_applies_within_the_application() -> None:
    machine = StateMachine()
    ingest(
        machine,
        make_record("x-a", application="x", namespace="a"),
        make_record("y-a", application="y", namespace="a"),
        make_record("x-b", application="x", namespace="b"),
    )
    assert machine.claim(NOW, application="x", namespace="c") is None
    assert claimed_id(machine, application="y", namespace="a") == "y-a"
    assert machine.claim(NOW, application="y", namespace="a") is None
    assert claimed_id(machine, application="x", namespace="b") == "x-b"
    assert claimed_id(machine, namespace="a") == "x-a"


def test_filters_interleave_without_handing_out_twice() -> None:
    machine = StateMachine()
    for i in range(30):
        ingest(
            machine,
            make_record(f"r{i}", application=f"app{i % 2}", namespace=f"ns{i % 3}"),
            now=NOW + i,
        )
    seen: list[str | None] = []
    filters: list[tuple[str | None, str | None]] = [
        (None, None),
        ("app0", None),
        ("app1", "ns2"),
        (None, "ns1"),
    ]
    for round_ in range(40):
        application, namespace = filters[round_ % len(filters)]
        seen.append(claimed_id(machine, application=application, namespace=namespace))
    handed_out = [s for s in seen if s is not None]
    assert sorted(handed_out) == sorted(f"r{i}" for i in range(30))


def test_claim_drops_expired_pending_tasks_on_the_way() -> None:
    machine = StateMachine()
    ingest(machine, make_record("stale", received_at=NOW, expires_at=NOW + 5))
    ingest(machine, make_record("fresh", received_at=NOW), now=NOW + 1)
    assert claimed_id(machine, NOW + 6) == "fresh"
    assert machine.get(ActivationId("stale")) is None
    assert len(machine) == 1


# --- conclude ---------------------------------------------------------------------------


def claimed(machine: StateMachine, record: Record) -> Record:
    ingest(machine, record)
    got = machine.claim(NOW)
    assert got is not None
    return got


def test_complete_removes_the_record() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a"))
    assert machine.conclude(ActivationId("a"), Status.COMPLETE) is ConcludeOutcome.APPLIED
    assert len(machine) == 0


def test_retry_waits_for_the_produce_then_finishes() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", attempts=0, max_attempts=3, delay_on_retry_s=7))
    machine.conclude(ActivationId("a"), Status.RETRY)
    assert machine.count(Status.RETRY) == 1
    (order,) = machine.tick(NOW).to_produce
    assert (order.kind, order.max_attempts, order.delay_on_retry_s) == (ProduceKind.RETRY, 3, 7)
    assert order.activation == b"bytes-of-a"
    assert machine.produced(ids("a")) == 1
    assert len(machine) == 0


def test_retry_request_rewrites_max_attempts_and_delay() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", attempts=0, max_attempts=1))
    machine.conclude(ActivationId("a"), Status.RETRY, max_attempts=4, delay_on_retry_s=9)
    (order,) = machine.produce_orders()
    assert (order.kind, order.max_attempts, order.delay_on_retry_s) == (ProduceKind.RETRY, 4, 9)


@pytest.mark.parametrize(
    ("policy", "left"),
    [(OnAttemptsExceeded.DEADLETTER, 1), (OnAttemptsExceeded.DISCARD, 0)],
)
def test_retry_with_attempts_exhausted_follows_on_attempts_exceeded(
    policy: OnAttemptsExceeded, left: int
) -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", attempts=2, max_attempts=3, on_attempts_exceeded=policy))
    machine.conclude(ActivationId("a"), Status.RETRY)
    assert len(machine) == left
    kinds = [o.kind for o in machine.produce_orders()]
    assert kinds == ([ProduceKind.DEADLETTER] if left else [])


def test_failure_with_deadletter_produces_the_original_bytes() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER))
    machine.conclude(ActivationId("a"), Status.FAILURE)
    (order,) = machine.tick(NOW).to_produce
    assert (order.kind, order.activation) == (ProduceKind.DEADLETTER, b"bytes-of-a")
    machine.produced(ids("a"))
    assert len(machine) == 0


def test_failure_with_discard_drops_at_once() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", on_attempts_exceeded=OnAttemptsExceeded.DISCARD))
    machine.conclude(ActivationId("a"), Status.FAILURE)
    assert len(machine) == 0
    assert machine.produce_orders() == ()


def test_unknown_or_finished_ids_are_counted_no_ops() -> None:
    machine = StateMachine()
    assert machine.conclude(ActivationId("ghost"), Status.COMPLETE) is ConcludeOutcome.UNKNOWN
    claimed(machine, make_record("a", on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER))
    machine.conclude(ActivationId("a"), Status.FAILURE)
    assert machine.conclude(ActivationId("a"), Status.COMPLETE) is ConcludeOutcome.UNKNOWN
    assert machine.count(Status.FAILURE) == 1


@pytest.mark.parametrize("status", [Status.PENDING, Status.PROCESSING, Status.DELAY])
def test_conclude_refuses_statuses_a_worker_cannot_send(status: Status) -> None:
    machine = StateMachine()
    with pytest.raises(ValueError, match="COMPLETE, RETRY or FAILURE"):
        machine.conclude(ActivationId("a"), status)


def test_late_result_for_a_task_reset_to_pending_concludes_it() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", processing_deadline_duration_s=10))
    assert machine.tick(NOW + 60).deadline_resets == 1
    assert machine.count(Status.PENDING) == 1
    assert machine.conclude(ActivationId("a"), Status.COMPLETE) is ConcludeOutcome.LATE
    assert machine.claim(NOW + 61) is None
    assert len(machine) == 0


# --- tick -------------------------------------------------------------------------------


def test_deadline_reset_returns_the_task_to_pending_with_one_more_attempt() -> None:
    machine = StateMachine(Limits(processing_deadline_grace_s=3))
    claimed(machine, make_record("a", processing_deadline_duration_s=10))
    assert machine.tick(NOW + 12.9).deadline_resets == 0
    assert machine.tick(NOW + 13).deadline_resets == 1
    record = machine.get(ActivationId("a"))
    assert record is not None
    assert (record.status, record.processing_attempts) == (Status.PENDING, 1)
    assert claimed_id(machine, NOW + 14) == "a"


def test_first_claim_latency_counts_from_receipt_or_due_time_and_only_once() -> None:
    machine = StateMachine(Limits(processing_deadline_grace_s=0))
    ingest(
        machine,
        make_record("a", received_at=NOW - 2.5, processing_deadline_duration_s=10),
        # The producer's clock runs ahead of ours.
        make_record("ahead", received_at=NOW + 5, processing_deadline_duration_s=600),
        make_record("delayed", received_at=NOW, delay_until=NOW + 30),
    )
    first = machine.claim(NOW)
    assert first is not None
    assert first.id == "a"
    assert first_claim_latency_s(first, NOW) == 2.5
    ahead = machine.claim(NOW)
    assert ahead is not None
    assert first_claim_latency_s(ahead, NOW) == 0.0

    assert machine.tick(NOW + 10).deadline_resets == 1
    again = machine.claim(NOW + 11)
    assert again is not None
    assert again.id == "a"
    assert first_claim_latency_s(again, NOW + 11) is None

    delayed = machine.claim(NOW + 30.25)
    assert delayed is not None
    assert first_claim_latency_s(delayed, NOW + 30.25) == 0.25  # not the 30 s of delay


def test_deadline_resets_can_be_held_back() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a"))
    assert machine.tick(NOW + 600, deadline_resets=False).deadline_resets == 0
    assert machine.count(Status.PROCESSING) == 1
    assert machine.tick(NOW + 600).deadline_resets == 1


def test_at_most_once_goes_to_failure_on_its_deadline() -> None:
    machine = StateMachine()
    claimed(
        machine,
        make_record("a", at_most_once=True, on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER),
    )
    result = machine.tick(NOW + 600)
    assert (result.deadline_resets, result.failed_by_deadline) == (0, 1)
    assert machine.count(Status.FAILURE) == 1
    assert [o.kind for o in result.to_produce] == [ProduceKind.DEADLETTER]


def test_processing_attempts_cap_fails_the_task() -> None:
    machine = StateMachine(Limits(max_processing_attempts=2))
    ingest(machine, make_record("a"))
    now = NOW
    for _ in range(2):
        assert machine.claim(now) is not None
        now += 600
        machine.tick(now)
    assert machine.get(ActivationId("a")) is None


def test_tick_expires_pending_tasks_only() -> None:
    machine = StateMachine()
    ingest(machine, make_record("p", expires_at=NOW + 5), make_record("c", expires_at=NOW + 5))
    assert claimed_id(machine) == "p"
    result = machine.tick(NOW + 5)
    assert result.expired == 1
    assert machine.get(ActivationId("c")) is None
    assert machine.get(ActivationId("p")) is not None


def test_expired_task_reset_to_pending_is_dropped_by_the_next_tick() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a", expires_at=NOW + 5, processing_deadline_duration_s=10))
    machine.tick(NOW + 5)
    machine.tick(NOW + 60)
    assert machine.count(Status.PENDING) == 1
    assert machine.tick(NOW + 61).expired == 1
    assert len(machine) == 0


def test_failed_produce_keeps_the_order_for_the_next_tick() -> None:
    machine = StateMachine()
    claimed(machine, make_record("a"))
    machine.conclude(ActivationId("a"), Status.RETRY)
    assert len(machine.tick(NOW).to_produce) == 1
    assert len(machine.tick(NOW + 1).to_produce) == 1
    machine.produced(ids("a"))
    assert machine.tick(NOW + 2).to_produce == ()


# --- backpressure and counts ----------------------------------------------------------------


def test_ingest_should_pause_at_each_limit() -> None:
    machine = StateMachine(Limits(max_pending_count=2, max_processing_count=1, max_delay_count=1))
    ingest(machine, make_record("a"))
    assert not machine.ingest_should_pause
    ingest(machine, make_record("b"))
    assert machine.ingest_should_pause
    machine.claim(NOW)
    assert machine.ingest_should_pause  # one processing, the limit
    machine.conclude(ActivationId("a"), Status.COMPLETE)
    assert not machine.ingest_should_pause
    ingest(machine, make_record("d", delay_until=NOW + 100))
    assert machine.ingest_should_pause


def test_counts_by_status_group_and_partition() -> None:
    machine = StateMachine()
    ingest(
        machine,
        make_record("a", namespace="n1", partition=Partition(0)),
        make_record("b", namespace="n2", partition=Partition(1)),
        make_record("c", namespace="n2", partition=Partition(1)),
    )
    machine.claim(NOW, application="app", namespace="n2")
    assert machine.counts_by_status()[Status.PENDING] == 2
    assert machine.counts_by_group() == {
        ("app", "n1", Status.PENDING): 1,
        ("app", "n2", Status.PENDING): 1,
        ("app", "n2", Status.PROCESSING): 1,
    }
    assert machine.counts_by_partition() == {0: 1, 1: 2}


def test_oldest_pending_added_at() -> None:
    machine = StateMachine()
    assert machine.oldest_pending_added_at() is None
    ingest(machine, make_record("a"), now=NOW)
    ingest(machine, make_record("b"), now=NOW + 3)
    machine.claim(NOW + 4)
    assert machine.oldest_pending_added_at() == NOW + 3


# --- flushing ---------------------------------------------------------------------------


def test_flush_carries_rows_blobs_and_offsets_once() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a", partition=Partition(2), offset=Offset(41)))
    flush = machine.take_flush()
    assert flush is not None
    assert [r.id for r in flush.upserts] == ["a"]
    assert flush.new_blobs == ((ActivationId("a"), b"bytes-of-a"),)
    assert flush.offsets == (KafkaOffset(Partition(2), Offset(41)),)
    assert machine.take_flush() is None  # one outstanding at a time
    assert machine.flush_done(flush.seq)
    assert machine.take_flush() is None  # nothing changed since


def test_flush_snapshots_do_not_follow_later_changes() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"))
    flush = machine.take_flush()
    assert flush is not None
    machine.claim(NOW)
    assert flush.upserts[0].status is Status.PENDING


def test_changes_during_a_flush_coalesce_into_the_next() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"), make_record("b"))
    first = machine.take_flush()
    assert first is not None
    machine.claim(NOW)
    machine.claim(NOW)
    machine.conclude(ActivationId("a"), Status.COMPLETE)
    machine.flush_done(first.seq)
    second = machine.take_flush()
    assert second is not None
    assert [r.id for r in second.upserts] == ["b"]
    assert second.upserts[0].status is Status.PROCESSING
    assert second.deletes == ids("a")
    assert second.new_blobs == ()


def test_record_finished_before_its_first_flush_never_reaches_the_store() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"))
    machine.claim(NOW)
    machine.conclude(ActivationId("a"), Status.COMPLETE)
    flush = machine.take_flush()
    assert flush is not None
    assert (flush.upserts, flush.deletes, flush.new_blobs) == ((), (), ())
    assert flush.offsets  # its offset is still covered, so it can be committed


def test_failed_flush_comes_back_whole_in_the_next_batch() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"), make_record("b"))
    first = machine.take_flush()
    assert first is not None
    machine.flush_done(first.seq)
    machine.claim(NOW)
    machine.conclude(ActivationId("a"), Status.COMPLETE)
    ingest(machine, make_record("c", offset=Offset(999)))
    second = machine.take_flush()
    assert second is not None
    assert not machine.flush_failed(second.seq + 1)  # not the outstanding batch: ignored
    assert machine.flush_failed(second.seq)
    third = machine.take_flush()
    assert third is not None
    assert {r.id for r in third.upserts} == {r.id for r in second.upserts}
    assert set(third.deletes) == set(second.deletes) == {"a"}
    assert set(third.new_blobs) == set(second.new_blobs)
    assert third.offsets == second.offsets
    assert third.seq > second.seq


def test_reingest_of_a_finished_id_cancels_its_pending_delete() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a", offset=Offset(5)))
    first = machine.take_flush()
    assert first is not None
    machine.flush_done(first.seq)
    machine.claim(NOW)
    machine.conclude(ActivationId("a"), Status.COMPLETE)
    ingest(machine, make_record("a", offset=Offset(5)), now=NOW + 1)
    flush = machine.take_flush()
    assert flush is not None
    assert flush.deletes == ()
    assert [r.id for r in flush.upserts] == ["a"]


# --- restore ---------------------------------------------------------------------------------


def test_restore_rebuilds_every_index() -> None:
    rows = [
        make_record("p", status=Status.PENDING, added_at=NOW + 1),
        make_record("q", status=Status.PENDING, added_at=NOW),
        make_record("w", status=Status.PROCESSING, processing_deadline=NOW + 5),
        make_record("d", status=Status.DELAY, delay_until=NOW + 50),
        make_record("r", status=Status.RETRY),
        make_record("f", status=Status.FAILURE, on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER),
    ]
    machine = StateMachine()
    machine.restore(rows)
    assert machine.take_flush() is None
    assert claimed_id(machine) == "q"
    result = machine.tick(NOW + 60)
    assert (result.deadline_resets, result.delays_due) == (2, 1)  # w, and the q just claimed
    assert {o.kind for o in result.to_produce} == {ProduceKind.RETRY, ProduceKind.DEADLETTER}
    machine.claim(NOW + 60)
    machine.conclude(ActivationId("w"), Status.COMPLETE)
    flush = machine.take_flush()
    assert flush is not None
    assert "w" in flush.deletes  # restored rows are known to be stored


def test_restore_refuses_a_machine_with_state() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"))
    with pytest.raises(ValueError, match="empty"):
        machine.restore([make_record("b")])


# --- push delivery -----------------------------------------------------------------------


def test_a_push_claim_is_processing_only_once_acknowledged() -> None:
    machine = StateMachine(Limits(processing_deadline_grace_s=3))
    ingest(machine, make_record("a", processing_deadline_duration_s=60))
    record = machine.claim_for_push(NOW, None, lease_s=10)
    assert record is not None
    assert (record.status, record.processing_deadline) == (Status.CLAIMED, NOW + 10)
    assert machine.claim(NOW) is None, "a claimed task is not handed out again"
    assert machine.push_acknowledged(ActivationId("a"), NOW + 2)
    assert (record.status, record.processing_deadline) == (Status.PROCESSING, NOW + 2 + 63)
    assert not machine.push_acknowledged(ActivationId("a"), NOW + 3)


def test_a_failed_push_returns_the_task_to_its_place_without_an_attempt() -> None:
    machine = StateMachine()
    ingest(machine, make_record("old"), make_record("new"), now=NOW)
    record = machine.claim_for_push(NOW, "app", lease_s=10)
    assert record is not None
    assert record.id == "old"
    assert machine.push_failed(record.id)
    assert (record.status, record.processing_attempts) == (Status.PENDING, 0)
    assert claimed_id(machine) == "old", "oldest first, after a failed push too"


def test_push_claims_stay_within_their_application() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a", application="one"), make_record("b", application="two"))
    record = machine.claim_for_push(NOW, "two", lease_s=10)
    assert record is not None
    assert record.id == "b"
    assert machine.claim_for_push(NOW, "two", lease_s=10) is None


def test_an_ended_lease_returns_the_task_even_during_the_startup_grace() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"))
    machine.claim_for_push(NOW, None, lease_s=10)
    assert machine.tick(NOW + 5, deadline_resets=False).leases_ended == 0
    result = machine.tick(NOW + 11, deadline_resets=False)
    assert result.leases_ended == 1
    record = machine.get(ActivationId("a"))
    assert record is not None
    assert (record.status, record.processing_attempts) == (Status.PENDING, 0)
    assert not machine.push_acknowledged(ActivationId("a"), NOW + 12), "the lease is over"


def test_a_result_for_a_claimed_task_concludes_it() -> None:
    machine = StateMachine()
    ingest(machine, make_record("a"))
    machine.claim_for_push(NOW, None, lease_s=10)
    assert machine.conclude(ActivationId("a"), Status.COMPLETE) is ConcludeOutcome.APPLIED
    assert len(machine) == 0
    assert not machine.push_acknowledged(ActivationId("a"), NOW)
    assert machine.tick(NOW + 60).leases_ended == 0


def test_claimed_tasks_count_against_the_processing_limit() -> None:
    machine = StateMachine(Limits(max_processing_count=2))
    ingest(machine, make_record("a"), make_record("b"))
    machine.claim_for_push(NOW, None, lease_s=10)
    assert not machine.ingest_should_pause
    machine.claim(NOW)
    assert machine.ingest_should_pause


def test_restore_returns_claimed_rows_to_pending() -> None:
    machine = StateMachine()
    claimed = make_record("a", status=Status.CLAIMED, processing_deadline=NOW + 10)
    machine.restore([claimed])
    assert (claimed.status, claimed.processing_deadline) == (Status.PENDING, None)
    assert machine.count(Status.CLAIMED) == 0
    assert claimed_id(machine) == "a"
    flush = machine.take_flush()
    assert flush is not None
    assert [(row.id, row.status) for row in flush.upserts] == [("a", Status.PROCESSING)]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_pending_count"):
        Limits(max_pending_count=0)
    with pytest.raises(ValueError, match="max_processing_attempts"):
        Limits(max_processing_attempts=0)
