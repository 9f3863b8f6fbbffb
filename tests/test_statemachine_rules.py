"""Runtime rules in the state machine: at ingest, on what is already held, and after a
restore; driven directly with an explicit clock."""

from __future__ import annotations

import json
from pathlib import Path

from actors.activation import encode_activation
from actors.messages import ProduceKind
from actors.pending import PendingQueue
from actors.records import ActivationId, KafkaOffset, Record, Status
from actors.runtime_rules import RuntimeRules, killswitch_entry
from actors.statemachine import MAX_DEMOTE_ORDERS, Limits, StateMachine
from loadtest import paused
from tests.factories import make_record
from tests.test_runtime_rules import zstd_activation

NOW = 1000.0

KILL_MAIL_TO_BAD = RuntimeRules(
    drop_task_killswitch=(killswitch_entry("mail", {0: "bad"}),),
)


def mail(activation_id: str, to: str, *, compressed: bool = False, **fields: object) -> Record:
    activation = (
        zstd_activation("mail", [to], {})
        if compressed
        else encode_activation(taskname="mail", args=[to])
    )
    return make_record(activation_id, taskname="mail", activation=activation, **fields)


def ingest(machine: StateMachine, *records: Record, now: float = NOW) -> int:
    offsets = tuple(KafkaOffset(r.partition, r.offset) for r in records)
    return machine.ingest(records, offsets, now).killed


def claim_all(machine: StateMachine, application: str | None = None) -> list[str]:
    claimed: list[str] = []
    while (record := machine.claim(NOW, application)) is not None:
        claimed.append(record.id)
    return claimed


# --- killswitch -----------------------------------------------------------------------


def test_killswitch_drops_at_ingest_and_still_advances_the_offset() -> None:
    machine = StateMachine(rules=KILL_MAIL_TO_BAD)
    good, bad = mail("good", "ok"), mail("bad", "bad")
    assert ingest(machine, good, bad) == 1
    assert machine.get(ActivationId("bad")) is None
    assert claim_all(machine) == ["good"]
    assert machine.killed == {KILL_MAIL_TO_BAD.drop_task_killswitch[0].label(): 1}
    flush = machine.take_flush()
    assert flush is not None
    # Nothing of the dropped one is written, yet its offset is in the batch to commit.
    assert {row.id for row in flush.upserts} == {"good"}
    assert [o.offset for o in flush.offsets] == [bad.offset]


def test_killswitch_selects_on_zstd_parameters_at_ingest() -> None:
    machine = StateMachine(rules=KILL_MAIL_TO_BAD)
    ingest(machine, mail("bad", "bad", compressed=True), mail("good", "ok", compressed=True))
    assert claim_all(machine) == ["good"]


def test_killswitch_removes_what_is_already_waiting_and_deletes_its_row() -> None:
    machine = StateMachine()
    ingest(
        machine,
        mail("bad-pending", "bad"),
        mail("bad-delayed", "bad", delay_until=NOW + 60),
        mail("bad-running", "bad"),
        mail("good", "ok"),
    )
    running = machine.claim(NOW, namespace="ns")
    assert running is not None
    assert running.id == "bad-pending"
    flush = machine.take_flush()
    assert flush is not None
    assert machine.flush_done(flush.seq)

    assert machine.apply_rules(KILL_MAIL_TO_BAD, NOW) == 2
    # The one a worker runs is left to finish; the waiting ones are gone, rows and all.
    assert machine.get(ActivationId("bad-pending")) is not None
    assert machine.get(ActivationId("bad-delayed")) is None
    assert machine.get(ActivationId("bad-running")) is None
    flush = machine.take_flush()
    assert flush is not None
    assert set(flush.deletes) == {"bad-delayed", "bad-running"}
    assert claim_all(machine) == ["good"]


# --- demotion -------------------------------------------------------------------------

DEMOTE_NOISY = RuntimeRules(demoted_namespaces=frozenset({"noisy"}), demoted_topic="long")


def test_demoted_at_ingest_is_never_handed_out_and_forwarded_once_acknowledged() -> None:
    machine = StateMachine(rules=DEMOTE_NOISY)
    ingest(machine, make_record("n1", namespace="noisy"), make_record("q1", namespace="quiet"))
    assert claim_all(machine) == ["q1"]
    assert machine.count(Status.DEMOTED) == 1
    orders = [o for o in machine.tick(NOW).to_produce if o.kind is ProduceKind.DEMOTE]
    assert [(o.id, o.topic, o.activation) for o in orders] == [("n1", "long", b"bytes-of-n1")]

    # A produce that failed is no Produced: the record stays and is listed again.
    orders = [o for o in machine.tick(NOW + 1).to_produce if o.kind is ProduceKind.DEMOTE]
    assert [o.id for o in orders] == ["n1"]
    assert machine.produced((ActivationId("n1"),)) == 1
    assert machine.get(ActivationId("n1")) is None
    assert machine.demoted_forwarded == 1
    assert not machine.tick(NOW + 2).to_produce


def test_demotion_of_waiting_records_and_its_lifting() -> None:
    machine = StateMachine()
    ingest(
        machine,
        make_record("p", namespace="noisy"),
        make_record("d", namespace="noisy", delay_until=NOW + 60),
    )
    assert machine.apply_rules(DEMOTE_NOISY, NOW) == 2
    assert machine.count(Status.DEMOTED) == 2
    assert machine.claim(NOW) is None
    # Lifted before Kafka acknowledged: each waits as it did, the delayed one still delayed.
    assert machine.apply_rules(RuntimeRules(), NOW) == 2
    assert machine.count(Status.DEMOTED) == 0
    assert machine.count(Status.DELAY) == 1
    assert claim_all(machine) == ["p"]
    # A forward acknowledged late finds it waiting again: kept (a duplicate, not a loss).
    machine.apply_rules(DEMOTE_NOISY, NOW)
    machine.apply_rules(RuntimeRules(), NOW)
    assert machine.produced((ActivationId("d"),)) == 0
    assert machine.get(ActivationId("d")) is not None


def test_demoted_records_count_against_max_pending() -> None:
    machine = StateMachine(Limits(max_pending_count=2), rules=DEMOTE_NOISY)
    ingest(machine, make_record("a", namespace="noisy"))
    assert not machine.ingest_should_pause
    ingest(machine, make_record("b", namespace="noisy"))
    assert machine.ingest_should_pause


def test_demote_orders_per_tick_are_bounded() -> None:
    machine = StateMachine(rules=DEMOTE_NOISY)
    count = MAX_DEMOTE_ORDERS + 5
    ingest(machine, *(make_record(f"n{i}", namespace="noisy") for i in range(count)))
    assert len(machine.tick(NOW).to_produce) == MAX_DEMOTE_ORDERS


# --- pausing --------------------------------------------------------------------------

PAUSE = RuntimeRules(
    paused_namespaces=frozenset({"held"}), paused_applications=frozenset({"frozen"})
)


def test_paused_groups_are_ingested_but_not_handed_out_until_resumed() -> None:
    machine = StateMachine(rules=PAUSE)
    ingest(
        machine,
        make_record("h1", namespace="held", added_at=1.0),
        make_record("f1", application="frozen", added_at=2.0),
        make_record("ok", added_at=3.0),
        make_record("h2", namespace="held", added_at=4.0),
    )
    assert machine.count(Status.PENDING) == 4
    assert machine.held_pending_count == 3
    assert machine.claim(NOW, "app", "held") is None
    assert machine.claim(NOW, None, "held") is None
    assert machine.claim(NOW, "frozen") is None
    assert claim_all(machine) == ["ok"]
    # The flush carries every paused record: they are kept, not merely in memory.
    flush = machine.take_flush()
    assert flush is not None
    assert {r.id for r in flush.upserts} == {"h1", "f1", "ok", "h2"}

    machine.apply_rules(RuntimeRules(paused_namespaces=frozenset({"held"})), NOW)
    assert machine.held_pending_count == 2
    assert claim_all(machine) == ["f1"]
    machine.apply_rules(RuntimeRules(), NOW)
    assert machine.held_pending_count == 0
    assert claim_all(machine) == ["h1", "h2"]


def test_a_pause_holds_what_is_already_pending() -> None:
    machine = StateMachine()
    ingest(
        machine,
        make_record("h1", namespace="held", added_at=1.0),
        make_record("ok", added_at=2.0),
        make_record("h2", namespace="held", added_at=3.0),
    )
    assert machine.apply_rules(PAUSE, NOW) == 0  # nothing moves: the queue holds them
    assert machine.held_pending_count == 2
    assert claim_all(machine) == ["ok"]
    machine.apply_rules(RuntimeRules(), NOW)
    assert claim_all(machine) == ["h1", "h2"]


def test_paused_records_do_not_stop_ingest_for_the_others() -> None:
    machine = StateMachine(Limits(max_pending_count=2), rules=PAUSE)
    ingest(machine, *(make_record(f"h{i}", namespace="held") for i in range(5)))
    assert not machine.ingest_should_pause
    ingest(machine, make_record("a"), make_record("b"))
    assert machine.ingest_should_pause
    # A claim and a deadline reset move held counts the right way.
    claimed = machine.claim(NOW)
    assert claimed is not None
    assert not machine.ingest_should_pause
    machine.apply_rules(RuntimeRules(), NOW)
    assert machine.held_pending_count == 0
    assert machine.ingest_should_pause


def test_a_pushed_task_that_fails_in_a_now_paused_group_waits_held() -> None:
    machine = StateMachine()
    ingest(machine, make_record("h", namespace="held"))
    record = machine.claim_for_push(NOW, "app", lease_s=30)
    assert record is not None
    machine.apply_rules(PAUSE, NOW)
    assert machine.push_failed(ActivationId("h"))
    assert machine.held_pending_count == 1
    assert machine.claim_for_push(NOW, "app", lease_s=30) is None
    machine.apply_rules(RuntimeRules(), NOW)
    again = machine.claim_for_push(NOW, "app", lease_s=30)
    assert again is not None
    assert again.id == "h"


def test_held_groups_leave_claims_logarithmic() -> None:
    """A claim with many held groups looks at no held heap: the scope's head heap holds
    only live groups once the held heads surfaced (each once)."""
    queue = PendingQueue()
    for i in range(1000):
        queue.push(make_record(f"h{i}", namespace=f"held-{i}", added_at=float(i)))
    queue.push(make_record("live", namespace="live", added_at=5000.0))
    queue.hold(lambda group: group[1].startswith("held-"))
    entry = queue.pop(None, None)
    assert entry is not None
    assert entry[1].id == "live"
    assert queue._heads[(None, None)] == []  # every held head was dropped, none is scanned
    queue.push(make_record("live2", namespace="live", added_at=6000.0))
    assert len(queue._heads[(None, None)]) == 1
    queue.hold(None)
    assert len(queue._heads[(None, None)]) == 1001


# --- restore --------------------------------------------------------------------------


def test_restore_applies_the_rules_in_force() -> None:
    machine = StateMachine()
    ingest(
        machine,
        mail("bad", "bad", namespace="q"),
        make_record("noisy", namespace="noisy"),
        make_record("held", namespace="held"),
        make_record("ok", namespace="q"),
    )
    machine.apply_rules(DEMOTE_NOISY, NOW)
    flush = machine.take_flush()
    assert flush is not None
    rows = {row.id: row for row in flush.upserts}
    blobs = dict(flush.new_blobs)
    restored = [Record.from_row(row, blobs[i]) for i, row in rows.items()]

    # The broker comes back with other rules: kill bad mail and pause "held", no demotion.
    rules = KILL_MAIL_TO_BAD.union(PAUSE)
    fresh = StateMachine(rules=rules)
    fresh.restore(restored)
    assert fresh.get(ActivationId("bad")) is None
    assert fresh.count(Status.DEMOTED) == 0
    assert fresh.held_pending_count == 1
    assert sorted(claim_all(fresh)) == ["noisy", "ok"]
    next_flush = fresh.take_flush()
    assert next_flush is not None
    assert set(next_flush.deletes) == {"bad"}


def test_the_paused_benchmark_runs_and_writes_its_json(tmp_path: Path) -> None:
    """loadtest paused, small: it fails by itself if a claim hands out a paused task."""
    output = tmp_path / "paused.json"
    arguments = ["--paused-namespaces", "10", "--paused-tasks", "1000", "--claims", "2000"]
    assert paused.main([*arguments, "--rounds", "1", "--json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["paused_tasks"] == 1000
    for key in ("none_paused", "paused", "same_tasks_unpaused_elsewhere"):
        assert results[f"claims_per_s_{key}"] > 0
