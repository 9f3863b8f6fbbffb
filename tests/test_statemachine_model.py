"""Random sequences of ingests, claims, results, ticks, flush outcomes and runtime rule
changes (killswitch, demoted and paused groups), checked after every step against rules
that a correct broker cannot break."""

from __future__ import annotations

import copy
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from actors.messages import Flush
from actors.records import (
    ActivationId,
    KafkaOffset,
    Offset,
    OnAttemptsExceeded,
    Partition,
    Record,
    RecordRow,
    Status,
)
from actors.runtime_rules import RuntimeRules, killswitch_entry
from actors.statemachine import Limits, StateMachine
from tests.factories import make_record

APPLICATIONS = ("a1", "a2")
NAMESPACES = ("n1", "n2", "n3")
TASKNAMES = ("t1", "t2")
filters = st.tuples(st.sampled_from((None, *APPLICATIONS)), st.sampled_from((None, *NAMESPACES)))


class StateMachineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.machine = StateMachine(Limits(max_processing_attempts=3))
        self.now = 1000.0
        self.next_offset = 0
        self.ever_ingested: set[ActivationId] = set()
        self.store_rows: dict[ActivationId, RecordRow] = {}
        self.store_blobs: dict[ActivationId, bytes] = {}
        self.outstanding: Flush | None = None
        self.live_before: set[ActivationId] = set()
        self.runtime_rules = RuntimeRules()

    def live_ids(self) -> set[ActivationId]:
        return {record.id for record in self.machine}

    def claimable(self, application: str | None, namespace: str | None) -> list[Record]:
        """What a claim within the filter may hand out now: pending or due, not expired."""
        return [
            r
            for r in self.machine
            if (
                r.status is Status.PENDING
                or (
                    r.status is Status.DELAY
                    and r.delay_until is not None
                    and r.delay_until <= self.now
                )
            )
            and (r.expires_at is None or r.expires_at > self.now)
            and application in (None, r.application)
            and namespace in (None, r.namespace)
            and not self.runtime_rules.is_paused(r.application, r.namespace)
        ]

    def waiting_status(self, record: Record) -> Status:
        """The status of a record that a worker gave back (a failed push, an ended lease)
        and the killswitch left alone."""
        if record.namespace in self.runtime_rules.demoted_namespaces:
            return Status.DEMOTED
        return Status.PENDING

    def killed(self, record: Record) -> bool:
        return self.runtime_rules.killswitch_entry(record.taskname, record.activation) is not None

    # --- operations --------------------------------------------------------------------------

    @rule(
        count=st.integers(1, 4),
        application=st.sampled_from(APPLICATIONS),
        namespace=st.sampled_from(NAMESPACES),
        delay_s=st.sampled_from((None, 0, 5, 20)),
        expires_s=st.sampled_from((None, 3, 50)),
        at_most_once=st.booleans(),
        deadletter=st.booleans(),
        reuse_id=st.booleans(),
        taskname=st.sampled_from(TASKNAMES),
    )
    def ingest(
        self,
        count: int,
        application: str,
        namespace: str,
        delay_s: int | None,
        expires_s: int | None,
        at_most_once: bool,
        deadletter: bool,
        reuse_id: bool,
        taskname: str,
    ) -> None:
        records = []
        for _ in range(count):
            offset = self.next_offset
            self.next_offset += 1
            reusable = sorted(self.ever_ingested)
            name = reusable[offset % len(reusable)] if reuse_id and reusable else f"t{offset}"
            records.append(
                make_record(
                    name,
                    application=application,
                    namespace=namespace,
                    taskname=taskname,
                    received_at=self.now,
                    offset=Offset(offset),
                    delay_until=None if delay_s is None else self.now + delay_s,
                    expires_at=None if expires_s is None else self.now + expires_s,
                    at_most_once=at_most_once,
                    on_attempts_exceeded=(
                        OnAttemptsExceeded.DEADLETTER if deadletter else OnAttemptsExceeded.DISCARD
                    ),
                    max_attempts=2,
                )
            )
        before = self.live_ids()
        held_before = set(before)
        offsets = (KafkaOffset(Partition(0), Offset(self.next_offset - 1)),)
        self.machine.ingest(tuple(records), offsets, self.now)
        live = self.live_ids()
        for record in records:
            if record.id in before:
                continue  # a duplicate, of a record held before or of one in this batch
            before.add(record.id)
            self.ever_ingested.add(record.id)
            assert (record.id not in live) == self.killed(record), "killswitch at ingest"
            if record.id in live and namespace in self.runtime_rules.demoted_namespaces:
                assert record.status is Status.DEMOTED
        assert held_before <= live, "ingest removed a record"

    @rule(
        paused_namespaces=st.frozensets(st.sampled_from(NAMESPACES), max_size=2),
        paused_applications=st.frozensets(st.sampled_from(APPLICATIONS), max_size=1),
        demoted=st.frozensets(st.sampled_from(NAMESPACES), max_size=1),
        killed=st.frozensets(st.sampled_from(TASKNAMES), max_size=1),
    )
    def set_rules(
        self,
        paused_namespaces: frozenset[str],
        paused_applications: frozenset[str],
        demoted: frozenset[str],
        killed: frozenset[str],
    ) -> None:
        # An entry with a selector never matches here: the records' bytes do not decode
        # (fail open).
        entries = tuple(killswitch_entry(name) for name in sorted(killed))
        self.runtime_rules = RuntimeRules(
            drop_task_killswitch=(*entries, killswitch_entry("t1", {0: 1})),
            demoted_namespaces=demoted,
            paused_namespaces=paused_namespaces,
            paused_applications=paused_applications,
        )
        before = {r.id: copy.copy(r) for r in self.machine}
        self.machine.apply_rules(self.runtime_rules, self.now)
        waiting = (Status.PENDING, Status.DELAY)
        for activation_id, record in before.items():
            now_record = self.machine.get(activation_id)
            if now_record is None:
                assert record.status in (*waiting, Status.DEMOTED), f"removed {record!r}"
                assert self.killed(record), f"removed {record!r}"
                continue
            if record.status in (*waiting, Status.DEMOTED):
                demoted_now = record.namespace in demoted
                assert (now_record.status is Status.DEMOTED) == demoted_now, now_record
            else:
                assert now_record.status is record.status, "a rule moved a worker's task"

    @rule(scope=filters)
    def claim(self, scope: tuple[str | None, str | None]) -> None:
        application, namespace = scope
        eligible = self.claimable(application, namespace)
        before = {r.id: r.expires_at for r in self.machine}
        record = self.machine.claim(self.now, application, namespace)
        if not eligible:
            assert record is None
        else:
            oldest = min(r.added_at for r in eligible)
            assert record is not None
            assert record.id in {r.id for r in eligible}, "a claim crossed its filter"
            assert record.added_at == oldest, "claims come oldest first within their filter"
            assert record.status is Status.PROCESSING
        for gone in before.keys() - self.live_ids():
            expires_at = before[gone]
            assert expires_at is not None, "claim removed a task that cannot expire"
            assert expires_at <= self.now, "claim removed a live task"

    @rule(application=st.sampled_from((None, *APPLICATIONS)), lease_s=st.sampled_from((1, 10)))
    def claim_for_push(self, application: str | None, lease_s: float) -> None:
        eligible = self.claimable(application, None)
        attempts = {r.id: r.processing_attempts for r in self.machine}
        record = self.machine.claim_for_push(self.now, application, lease_s)
        if not eligible:
            assert record is None
            return
        assert record is not None
        assert record.added_at == min(r.added_at for r in eligible), "pushes go oldest first"
        assert record.status is Status.CLAIMED
        assert record.processing_deadline == self.now + lease_s
        assert record.processing_attempts == attempts[record.id]

    @rule(pick=st.integers(0, 1000), acknowledged=st.booleans())
    def push_outcome(self, pick: int, acknowledged: bool) -> None:
        claimed = sorted(r.id for r in self.machine if r.status is Status.CLAIMED)
        if not claimed:
            return
        target = claimed[pick % len(claimed)]
        record = self.machine.get(target)
        assert record is not None
        attempts = record.processing_attempts
        if acknowledged:
            assert self.machine.push_acknowledged(target, self.now)
            assert record.status is Status.PROCESSING
            grace_s = self.machine.limits.processing_deadline_grace_s
            expected = self.now + record.processing_deadline_duration_s + grace_s
            assert record.processing_deadline == expected
        else:
            assert self.machine.push_failed(target)
            if self.killed(record):
                assert self.machine.get(target) is None, "a failed push of a killed task"
                return
            assert record.status is self.waiting_status(record)
            assert record.processing_deadline is None
        assert record.processing_attempts == attempts, "a push outcome counted an attempt"
        assert not self.machine.push_failed(target), "a push settled twice"

    @rule(
        pick=st.integers(0, 1000),
        status=st.sampled_from((Status.COMPLETE, Status.RETRY, Status.FAILURE)),
        max_attempts=st.sampled_from((None, 1, 5)),
    )
    def conclude(self, pick: int, status: Status, max_attempts: int | None) -> None:
        candidates = sorted(self.ever_ingested)
        if not candidates:
            return
        target = candidates[pick % len(candidates)]
        before = self.live_ids()
        self.machine.conclude(target, status, max_attempts=max_attempts)
        assert before - self.live_ids() <= {target}, "a result removed another task"

    @rule(seconds=st.sampled_from((0.5, 2, 7, 30)), resets=st.booleans())
    def tick(self, seconds: float, resets: bool) -> None:
        self.now += seconds
        before = {r.id: copy.copy(r) for r in self.machine}
        result = self.machine.tick(self.now, deadline_resets=resets)
        for gone in before.keys() - self.live_ids():
            record = before[gone]
            expired = record.expires_at is not None and record.expires_at <= self.now
            overdue = (
                resets
                and record.status is Status.PROCESSING
                and record.processing_deadline is not None
                and record.processing_deadline <= self.now
            )
            lease_ended_killed = (
                record.status is Status.CLAIMED
                and record.processing_deadline is not None
                and record.processing_deadline <= self.now
                and self.killed(record)
            )
            assert expired or overdue or lease_ended_killed, f"tick removed {record!r}"
        for record in before.values():
            lease_ended = (
                record.status is Status.CLAIMED
                and record.processing_deadline is not None
                and record.processing_deadline <= self.now
            )
            now_record = self.machine.get(record.id)
            if lease_ended and now_record is not None:
                assert now_record.status is self.waiting_status(record), "an ended lease"
                assert now_record.processing_attempts == record.processing_attempts
        produce_ids = {order.id for order in result.to_produce}
        awaiting = {
            r.id for r in self.machine if r.status in (Status.RETRY, Status.FAILURE, Status.DEMOTED)
        }
        assert produce_ids == awaiting

    @rule(take=st.integers(0, 10))
    def produced(self, take: int) -> None:
        orders = self.machine.produce_orders()[:take]
        acknowledged = tuple(order.id for order in orders)
        before = self.live_ids()
        self.machine.produced(acknowledged)
        assert before - self.live_ids() == set(acknowledged)

    @precondition(lambda self: self.outstanding is None)
    @rule()
    def take_flush(self) -> None:
        self.outstanding = self.machine.take_flush()

    @precondition(lambda self: self.outstanding is not None)
    @rule(succeed=st.booleans())
    def flush_outcome(self, succeed: bool) -> None:
        flush = self.outstanding
        assert flush is not None
        self.outstanding = None
        if not succeed:
            assert self.machine.flush_failed(flush.seq)
            return
        for activation_id in flush.deletes:
            self.store_rows.pop(activation_id, None)
            self.store_blobs.pop(activation_id, None)
        for row in flush.upserts:
            self.store_rows[row.id] = row
        self.store_blobs.update(flush.new_blobs)
        assert self.machine.flush_done(flush.seq)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def each_live_id_has_exactly_one_status(self) -> None:
        records = list(self.machine)
        assert len({r.id for r in records}) == len(records) == len(self.machine)
        by_status = Counter(r.status for r in records)
        for status, count in self.machine.counts_by_status().items():
            assert by_status[status] == count, status
        assert Status.COMPLETE not in by_status
        held = sum(
            r.status is Status.PENDING and self.runtime_rules.is_paused(r.application, r.namespace)
            for r in records
        )
        assert self.machine.held_pending_count == held
        for record in records:
            if record.status in (Status.PENDING, Status.DELAY):
                assert not self.killed(record), "a killswitch match is still waiting"
                assert record.namespace not in self.runtime_rules.demoted_namespaces
            if record.status is Status.DEMOTED:
                assert record.namespace in self.runtime_rules.demoted_namespaces
                assert not self.killed(record), "a killswitch match is still forwarded"

    @invariant()
    def flushed_batches_reproduce_the_state(self) -> None:
        if self.outstanding is not None:
            return
        final = self.machine.take_flush()
        if final is not None:
            self.outstanding = final
            self.flush_outcome(succeed=True)
        stored = {}
        for activation_id, row in self.store_rows.items():
            stored[activation_id] = Record.from_row(row, self.store_blobs[activation_id])
        live = {r.id: r for r in self.machine}
        assert stored == live
        replica = StateMachine(self.machine.limits, self.runtime_rules)
        replica.restore([copy.copy(r) for r in stored.values()])
        # A restart returns claims whose pushes died with the process to waiting, where
        # the rules meet them as they would a failed push.
        expected: Counter[tuple[str, str, Status]] = Counter()
        for record in self.machine:
            status = record.status
            if status is Status.CLAIMED:
                if self.killed(record):
                    continue
                demoted = record.namespace in self.runtime_rules.demoted_namespaces
                status = Status.DEMOTED if demoted else Status.PENDING
            expected[(record.application, record.namespace, status)] += 1
        assert replica.counts_by_group() == +expected


TestStateMachineModel = StateMachineModel.TestCase
TestStateMachineModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
