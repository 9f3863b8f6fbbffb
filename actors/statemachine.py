"""Every in-flight activation's state and every transition: plain Python, no threads, no I/O.

The state actor is a thin shell around `StateMachine`; each method takes `now` so that
tests drive the clock. Heaps are indexes that may hold dead entries: an entry is trusted
only after checking it against the record it names, so no transition ever searches a heap.

Runtime rules (`actors.runtime_rules`) are data here: at ingest a killswitch match is
dropped, a demoted namespace's activation becomes DEMOTED (forwarded by upkeep, like a
dead letter), and a paused group's activation is pending but held by the queue;
`apply_rules` does the same to what is already held.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from actors.messages import (
    ConcludeOutcome,
    Flush,
    ProduceKind,
    ProduceOrder,
    TickResult,
)
from actors.pending import Entry, PendingQueue
from actors.records import (
    ActivationId,
    KafkaOffset,
    Offset,
    OnAttemptsExceeded,
    Partition,
    Record,
    Status,
)
from actors.runtime_rules import RuntimeRules

# Enum members hash in Python code (Enum.__hash__), several times slower than ints: on
# the claim and result paths statuses are matched in tuples (identity first, no hashing)
# and counted in lists indexed by value.
_CONCLUSIONS = (Status.COMPLETE, Status.RETRY, Status.FAILURE)
_CONCLUDABLE = (Status.PROCESSING, Status.PENDING, Status.CLAIMED)
_AWAITING_PRODUCE = (Status.RETRY, Status.FAILURE, Status.DEMOTED)
_WAITING = (Status.PENDING, Status.DELAY)
"""What a killswitch removes and a demotion forwards: work no worker holds yet."""
MAX_DEMOTE_ORDERS = 10_000
"""Forwards listed per tick: demoting a big namespace must not make one tick produce (and
build the messages of) every task it holds at once."""
_STATUS_SLOTS = max(Status) + 1
_COUNTED = tuple(s for s in Status if s is not Status.COMPLETE)


@dataclass(frozen=True, slots=True)
class Limits:
    """The knobs of the transitions; defaults are taskbroker's."""

    max_pending_count: int = 2048
    max_processing_count: int = 2048
    max_delay_count: int = 8192
    max_processing_attempts: int = 5
    processing_deadline_grace_s: float = 3.0
    max_delayed_task_allowed_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_pending_count", "max_processing_count", "max_delay_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_processing_attempts < 1:
            raise ValueError(
                f"max_processing_attempts must be at least 1, got {self.max_processing_attempts}"
            )
        if self.processing_deadline_grace_s < 0:
            raise ValueError("processing_deadline_grace_s must not be negative")
        if self.max_delayed_task_allowed_s < 0:
            raise ValueError("max_delayed_task_allowed_s must not be negative")


def admit(record: Record, now: float, limits: Limits) -> None:
    """Ready a newly consumed record for either design: stamped `added_at`, its delay
    capped, and DELAY while it is not yet due, PENDING otherwise."""
    record.added_at = now
    if record.delay_until is not None:
        cap = record.received_at + limits.max_delayed_task_allowed_s
        record.delay_until = min(record.delay_until, cap)
    due = record.delay_until is not None and record.delay_until > now
    record.status = Status.DELAY if due else Status.PENDING


def first_claim_latency_s(record: Record, now: float) -> float | None:
    """For a record `claim` just handed out: seconds from when it became claimable (its
    `received_at`, or `delay_until` when it was delayed: waiting out a delay is not latency)
    to `now`, or None when it was handed out before.

    A record goes back to pending only through a deadline reset, which counts a processing
    attempt, so no attempts means a first claim (or a claim lost in a crash before it was
    flushed, which the restarted broker cannot tell apart). `received_at` is the producer's
    clock: a producer ahead of ours counts as 0 rather than not at all.
    """
    if record.processing_attempts:
        return None
    start = record.received_at if record.delay_until is None else record.delay_until
    latency_s = now - start
    return latency_s if latency_s > 0.0 else 0.0


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int
    killed: int = 0
    """Dropped by the killswitch (counted in `accepted` too: the offsets advance)."""


@dataclass(slots=True)
class _InFlightFlush:
    """What the outstanding flush carried, to be marked dirty again if it fails."""

    seq: int
    upserted: frozenset[ActivationId]
    blobs: frozenset[ActivationId]
    deletes: frozenset[ActivationId]
    offsets: dict[Partition, Offset]


@dataclass(slots=True)
class _Changes:
    """What the next flush must carry."""

    dirty: set[ActivationId] = field(default_factory=set)
    blobs: set[ActivationId] = field(default_factory=set)
    deletes: set[ActivationId] = field(default_factory=set)
    offsets: dict[Partition, Offset] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.dirty or self.blobs or self.deletes or self.offsets)

    def merge_offsets(self, offsets: dict[Partition, Offset]) -> None:
        for partition, offset in offsets.items():
            if offset > self.offsets.get(partition, -1):
                self.offsets[partition] = offset


class StateMachine:
    """Owns every in-flight record, its indexes, and what must reach SQLite next."""

    def __init__(self, limits: Limits | None = None, rules: RuntimeRules | None = None) -> None:
        self.limits = limits or Limits()
        self._rules = rules or RuntimeRules()
        self._pausing = False
        self._held_pending = 0
        """PENDING records of paused groups: they do not count against max_pending_count,
        or pausing one namespace would stop ingest for every other."""
        self._demoted: set[ActivationId] = set()
        self.killed: Counter[str] = Counter()
        """Activations dropped by the killswitch, by entry label, since start."""
        self.demoted_forwarded = 0
        self._records: dict[ActivationId, Record] = {}
        self._pending = PendingQueue()
        self._deadlines: list[tuple[float, ActivationId]] = []
        self._delays: list[tuple[float, ActivationId]] = []
        self._expiries: list[tuple[float, ActivationId]] = []
        self._leases: list[tuple[float, ActivationId]] = []
        # A claimed record's pending entry, so that a failed push puts it back in its place.
        self._claimed_entries: dict[ActivationId, Entry] = {}
        self._retry: set[ActivationId] = set()
        self._deadletter: set[ActivationId] = set()
        self._by_status = [0] * _STATUS_SLOTS
        self._by_group: dict[tuple[str, str], list[int]] = {}
        self._by_partition: Counter[Partition] = Counter()
        self._changes = _Changes()
        # Ids whose row was handed to the writer: only those need a delete when they finish.
        self._in_store: set[ActivationId] = set()
        self._in_flight: _InFlightFlush | None = None
        self._flush_seq = 0
        self._hold_paused_groups()

    def __repr__(self) -> str:
        counts = ", ".join(
            f"{s.name.lower()}={self._by_status[s]}" for s in Status if self._by_status[s]
        )
        return f"StateMachine({counts or 'empty'}, dirty={len(self._changes.dirty)})"

    # --- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records.values())

    def get(self, activation_id: ActivationId) -> Record | None:
        return self._records.get(activation_id)

    def count(self, status: Status) -> int:
        return self._by_status[status]

    def counts_by_status(self) -> dict[Status, int]:
        return {status: self._by_status[status] for status in _COUNTED}

    def counts_by_group(self) -> dict[tuple[str, str, Status], int]:
        return {
            (application, namespace, status): counts[status]
            for (application, namespace), counts in self._by_group.items()
            for status in _COUNTED
            if counts[status]
        }

    def counts_by_partition(self) -> dict[Partition, int]:
        return {partition: n for partition, n in self._by_partition.items() if n}

    @property
    def rules(self) -> RuntimeRules:
        return self._rules

    @property
    def held_pending_count(self) -> int:
        """PENDING records that a paused namespace or application holds back."""
        return self._held_pending

    @property
    def ingest_should_pause(self) -> bool:
        limits = self.limits
        by_status = self._by_status
        return (
            by_status[Status.PENDING] - self._held_pending + by_status[Status.DEMOTED]
            >= limits.max_pending_count
            or self._by_status[Status.PROCESSING] + self._by_status[Status.CLAIMED]
            >= limits.max_processing_count
            or self._by_status[Status.DELAY] >= limits.max_delay_count
        )

    @property
    def dirty_count(self) -> int:
        changes = self._changes
        return len(changes.dirty) + len(changes.deletes)

    @property
    def flush_outstanding(self) -> bool:
        return self._in_flight is not None

    @property
    def has_unflushed_changes(self) -> bool:
        return bool(self._changes) or self._in_flight is not None

    def oldest_pending_added_at(self) -> float | None:
        entry = self._pending.peek_oldest()
        return None if entry is None else entry[1].added_at

    # --- transitions ----------------------------------------------------------------------

    def ingest(
        self, records: tuple[Record, ...], offsets: tuple[KafkaOffset, ...], now: float
    ) -> IngestResult:
        """Take ownership of newly consumed records; an id already in flight is a duplicate.

        A killswitch match is dropped here; its offset still advances with the batch's."""
        accepted = killed = 0
        rules = self._rules
        screening = bool(rules.drop_task_killswitch or rules.demoted_namespaces)
        for record in records:
            if record.id in self._records:
                continue
            accepted += 1
            admit(record, now, self.limits)
            if screening:
                entry = rules.killswitch_entry(record.taskname, record.activation)
                if entry is not None:
                    self.killed[entry.label()] += 1
                    killed += 1
                    continue
                if record.namespace in rules.demoted_namespaces:
                    record.status = Status.DEMOTED
            self._add(record)
            self._changes.dirty.add(record.id)
            self._changes.deletes.discard(record.id)
            self._changes.blobs.add(record.id)
        self._changes.merge_offsets({o.partition: o.offset for o in offsets})
        return IngestResult(accepted=accepted, duplicates=len(records) - accepted, killed=killed)

    def apply_rules(self, rules: RuntimeRules, now: float) -> int:
        """Put `rules` in force for what is held and what comes: killswitch matches that
        no worker holds yet are dropped (their rows deleted by the next flush), waiting
        records of demoted namespaces become DEMOTED, DEMOTED ones whose namespace is no
        longer demoted wait again, and paused groups are held. Returns how many records
        changed. O(records): rules change rarely."""
        self._rules = rules
        self._hold_paused_groups()
        if not (rules.drop_task_killswitch or rules.demoted_namespaces or self._demoted):
            return 0
        changed = 0
        for record in list(self._records.values()):
            status = record.status
            if status in _WAITING:
                changed += self._screened_out(record)
            elif status is Status.DEMOTED:
                changed += self._demoted_again(record, now)
        return changed

    def claim(
        self, now: float, application: str | None = None, namespace: str | None = None
    ) -> Record | None:
        """Hand out the oldest pending record within the filter; expired ones are dropped."""
        delays = self._delays
        if delays and delays[0][0] <= now:
            self._promote_delays(now)
        while (entry := self._pending.pop(application, namespace)) is not None:
            record = entry[1]
            if record.expires_at is not None and record.expires_at <= now:
                self._finish(record)
                continue
            self._start_processing(record, now)
            return record
        return None

    def claim_for_push(self, now: float, application: str | None, lease_s: float) -> Record | None:
        """Take the oldest pending record of `application` for a push: CLAIMED until the
        worker acknowledges it (`push_acknowledged`), refuses it (`push_failed`), or the
        lease ends (`tick`), whichever comes first."""
        delays = self._delays
        if delays and delays[0][0] <= now:
            self._promote_delays(now)
        while (entry := self._pending.pop(application, None)) is not None:
            record = entry[1]
            if record.expires_at is not None and record.expires_at <= now:
                self._finish(record)
                continue
            lease_until = now + lease_s
            self._claimed_entries[record.id] = entry
            record.processing_deadline = lease_until
            heapq.heappush(self._leases, (lease_until, record.id))
            self._set_status(record, Status.CLAIMED)
            return record
        return None

    def push_acknowledged(self, activation_id: ActivationId, now: float) -> bool:
        """The worker took the task: PROCESSING, its deadline counted from now, as if it
        had been pulled now. False when it is no longer CLAIMED (a result came first, or
        the lease ended)."""
        record = self._records.get(activation_id)
        if record is None or record.status is not Status.CLAIMED:
            return False
        self._start_processing(record, now)
        return True

    def push_failed(self, activation_id: ActivationId) -> bool:
        """The push did not reach a worker: pending again, in its old place, and no
        processing attempt counted (no worker ran it)."""
        record = self._records.get(activation_id)
        if record is None or record.status is not Status.CLAIMED:
            return False
        self._unclaim(record)
        return True

    def conclude(
        self,
        activation_id: ActivationId,
        status: Status,
        *,
        max_attempts: int | None = None,
        delay_on_retry_s: int | None = None,
    ) -> ConcludeOutcome:
        """Apply a worker's result. A result for a task reset to pending after its deadline
        still counts: the worker was late, not dead, and running it again would duplicate it.
        """
        if (
            status is not Status.COMPLETE
            and status is not Status.RETRY
            and (status is not Status.FAILURE)
        ):
            raise ValueError(f"a result is COMPLETE, RETRY or FAILURE, not {status!r}")
        record = self._records.get(activation_id)
        if record is None or record.status not in _CONCLUDABLE:
            return ConcludeOutcome.UNKNOWN
        outcome = (
            ConcludeOutcome.LATE if record.status is Status.PENDING else ConcludeOutcome.APPLIED
        )
        if status is Status.COMPLETE:
            self._finish(record)
        elif status is Status.FAILURE:
            self._fail(record)
        else:
            if max_attempts is not None:
                record.max_attempts = max_attempts
            if delay_on_retry_s is not None:
                record.delay_on_retry_s = delay_on_retry_s
            if record.attempts + 1 < record.max_attempts:
                self._retry.add(record.id)
                self._set_status(record, Status.RETRY)
            else:
                self._fail(record)
        return outcome

    def tick(self, now: float, *, deadline_resets: bool = True) -> TickResult:
        """Run every time-driven transition and list what Kafka must acknowledge next.

        Leases end even during the startup grace: a push that never finished reached no
        worker that could still report it."""
        delays_due = self._promote_delays(now)
        leases_ended = self._end_leases(now)
        expired = self._expire(now)
        resets, failed_by_deadline = self._handle_deadlines(now) if deadline_resets else (0, 0)
        return TickResult(
            to_produce=self.produce_orders(),
            deadline_resets=resets,
            expired=expired,
            delays_due=delays_due,
            failed_by_deadline=failed_by_deadline,
            leases_ended=leases_ended,
        )

    def produce_orders(self) -> tuple[ProduceOrder, ...]:
        orders = [self._order(self._records[i], ProduceKind.RETRY) for i in self._retry]
        orders += [self._order(self._records[i], ProduceKind.DEADLETTER) for i in self._deadletter]
        if self._demoted:
            topic, records = self._rules.demoted_topic, self._records
            orders += [
                self._order(records[i], ProduceKind.DEMOTE, topic)
                for i in itertools.islice(self._demoted, MAX_DEMOTE_ORDERS)
            ]
        return tuple(orders)

    def produced(self, ids: tuple[ActivationId, ...]) -> int:
        """Kafka acknowledged these retries, dead letters and demoted forwards; returns how
        many finished. A forward acknowledged after its namespace was no longer demoted
        finds the record waiting again and leaves it: a duplicate, not a loss."""
        finished = 0
        for activation_id in ids:
            record = self._records.get(activation_id)
            if record is not None and record.status in _AWAITING_PRODUCE:
                if record.status is Status.DEMOTED:
                    self.demoted_forwarded += 1
                self._finish(record)
                finished += 1
        return finished

    def restore(self, records: tuple[Record, ...] | list[Record]) -> None:
        """Rebuild every index from persisted rows; only an empty machine can be restored."""
        if self._records or self._changes:
            raise ValueError(f"restore needs an empty state machine, not {self!r}")
        for record in records:
            self._in_store.add(record.id)
            if record.status is Status.CLAIMED:
                # Its push died with the last process: no worker acknowledged it.
                record.status, record.processing_deadline = Status.PENDING, None
                self._changes.dirty.add(record.id)
            self._add(record)
            if record.status is Status.PROCESSING and record.processing_deadline is not None:
                heapq.heappush(self._deadlines, (record.processing_deadline, record.id))
        # The rules may have changed while the broker was down. A forward given up goes to
        # DELAY if it has a delay at all: the first tick promotes what is already due.
        self.apply_rules(self._rules, now=0.0)

    # --- flushing -------------------------------------------------------------------------

    def take_flush(self) -> Flush | None:
        """The next batch for the writer, or None while one is outstanding or nothing changed."""
        if self._in_flight is not None or not self._changes:
            return None
        changes, self._changes = self._changes, _Changes()
        self._flush_seq += 1
        records = self._records
        self._in_store.update(changes.blobs)
        self._in_flight = _InFlightFlush(
            seq=self._flush_seq,
            upserted=frozenset(changes.dirty),
            blobs=frozenset(changes.blobs),
            deletes=frozenset(changes.deletes),
            offsets=changes.offsets,
        )
        return Flush(
            seq=self._flush_seq,
            upserts=tuple(records[i].row() for i in changes.dirty),
            deletes=tuple(changes.deletes),
            new_blobs=tuple((i, records[i].activation) for i in changes.blobs),
            offsets=tuple(KafkaOffset(p, o) for p, o in sorted(changes.offsets.items())),
        )

    def flush_done(self, seq: int) -> bool:
        """The writer committed batch `seq`; False when it is not the outstanding one."""
        if self._in_flight is None or self._in_flight.seq != seq:
            return False
        self._in_flight = None
        return True

    def flush_failed(self, seq: int) -> bool:
        """The writer rolled batch `seq` back: its changes go into the next batch again."""
        in_flight = self._in_flight
        if in_flight is None or in_flight.seq != seq:
            return False
        self._in_flight = None
        records, changes = self._records, self._changes
        changes.dirty.update(i for i in in_flight.upserted if i in records)
        changes.blobs.update(i for i in in_flight.blobs if i in records)
        changes.deletes.update(i for i in in_flight.deletes if i not in records)
        changes.merge_offsets(in_flight.offsets)
        return True

    # --- internals ------------------------------------------------------------------------

    def _add(self, record: Record) -> None:
        """Index a record that is new to memory, by the status it arrives with."""
        if record.status is Status.DELAY and record.delay_until is None:
            record.status = Status.PENDING
        status = record.status
        self._records[record.id] = record
        self._by_partition[record.partition] += 1
        self._by_status[status] += 1
        group = (record.application, record.namespace)
        counts = self._by_group.get(group)
        if counts is None:
            counts = self._by_group[group] = [0] * _STATUS_SLOTS
        counts[status] += 1
        if status is Status.PENDING:
            if self._pausing and self._rules.is_paused(*group):
                self._held_pending += 1
            self._enter_pending(record)
        elif status is Status.DELAY and record.delay_until is not None:
            heapq.heappush(self._delays, (record.delay_until, record.id))
        elif status is Status.RETRY:
            self._retry.add(record.id)
        elif status is Status.FAILURE:
            self._deadletter.add(record.id)
        elif status is Status.DEMOTED:
            self._demoted.add(record.id)

    def _demoted_again(self, record: Record, now: float) -> bool:
        """Rules changed for a record waiting to be forwarded: the killswitch drops it, a
        namespace no longer demoted makes it wait as it did. True when it changed."""
        rules = self._rules
        entry = rules.killswitch_entry(record.taskname, record.activation)
        if entry is not None:
            self.killed[entry.label()] += 1
            self._finish(record)
            return True
        if record.namespace in rules.demoted_namespaces:
            return False
        self._demoted.discard(record.id)
        if record.delay_until is not None and record.delay_until > now:
            self._set_status(record, Status.DELAY)
            heapq.heappush(self._delays, (record.delay_until, record.id))
        else:
            self._set_status(record, Status.PENDING)
            self._enter_pending(record)
        return True

    def _screened_out(self, record: Record) -> bool:
        """Meet the rules as a newly ingested record would, for one about to wait again
        (or waiting when the rules changed): True when the killswitch dropped it or it
        was demoted."""
        rules = self._rules
        if not (rules.drop_task_killswitch or rules.demoted_namespaces):
            return False
        entry = rules.killswitch_entry(record.taskname, record.activation)
        if entry is not None:
            self.killed[entry.label()] += 1
            self._finish(record)
            self._pending.prune((record.application, record.namespace))
            return True
        if record.namespace in rules.demoted_namespaces:
            self._demoted.add(record.id)
            self._set_status(record, Status.DEMOTED)
            return True
        return False

    def _hold_paused_groups(self) -> None:
        rules = self._rules
        self._pausing = bool(rules.paused_namespaces or rules.paused_applications)
        if not self._pausing:
            self._pending.hold(None)
            self._held_pending = 0
            return
        is_paused = rules.is_paused
        self._pending.hold(lambda group: is_paused(*group))
        self._held_pending = sum(
            counts[Status.PENDING] for group, counts in self._by_group.items() if is_paused(*group)
        )

    def _start_processing(self, record: Record, now: float) -> None:
        self._claimed_entries.pop(record.id, None)
        grace_s = self.limits.processing_deadline_grace_s
        deadline = now + record.processing_deadline_duration_s + grace_s
        record.processing_deadline = deadline
        heapq.heappush(self._deadlines, (deadline, record.id))
        self._set_status(record, Status.PROCESSING)

    def _unclaim(self, record: Record) -> None:
        record.processing_deadline = None
        entry = self._claimed_entries.pop(record.id, None)
        if self._screened_out(record):
            return
        self._set_status(record, Status.PENDING)
        if entry is None:
            self._enter_pending(record)
            return
        self._pending.push_back(entry)
        if record.expires_at is not None:
            # Its first expiry entry may have been passed over while it was claimed.
            heapq.heappush(self._expiries, (record.expires_at, record.id))

    def _end_leases(self, now: float) -> int:
        ended = 0
        for record in self._due(self._leases, now, Status.CLAIMED, "processing_deadline"):
            self._unclaim(record)
            ended += 1
        return ended

    def _enter_pending(self, record: Record) -> None:
        self._pending.push(record)
        if record.expires_at is not None:
            heapq.heappush(self._expiries, (record.expires_at, record.id))

    def _set_status(self, record: Record, status: Status) -> None:
        old = record.status
        by_status = self._by_status
        by_status[old] -= 1
        by_status[status] += 1
        # A record leaves PENDING for PROCESSING or CLAIMED only through a claim, which
        # never hands out a held group: the claim path skips the lookup.
        if (
            self._pausing
            and status is not Status.PROCESSING
            and status is not Status.CLAIMED
            and (old is Status.PENDING) != (status is Status.PENDING)
            and self._rules.is_paused(record.application, record.namespace)
        ):
            self._held_pending += 1 if status is Status.PENDING else -1
        counts = self._by_group[(record.application, record.namespace)]
        counts[old] -= 1
        counts[status] += 1
        record.status = status
        self._changes.dirty.add(record.id)

    def _fail(self, record: Record) -> None:
        if record.on_attempts_exceeded is OnAttemptsExceeded.DEADLETTER:
            self._deadletter.add(record.id)
            self._set_status(record, Status.FAILURE)
        else:
            self._finish(record)

    def _finish(self, record: Record) -> None:
        """The record is complete: it leaves memory, and its row goes if it was ever written."""
        activation_id = record.id
        del self._records[activation_id]
        self._claimed_entries.pop(activation_id, None)
        self._by_status[record.status] -= 1
        self._by_group[(record.application, record.namespace)][record.status] -= 1
        self._by_partition[record.partition] -= 1
        self._retry.discard(activation_id)
        self._deadletter.discard(activation_id)
        self._demoted.discard(activation_id)
        if (
            self._pausing
            and record.status is Status.PENDING
            and self._rules.is_paused(record.application, record.namespace)
        ):
            self._held_pending -= 1
        changes = self._changes
        changes.dirty.discard(activation_id)
        changes.blobs.discard(activation_id)
        if activation_id in self._in_store:
            self._in_store.discard(activation_id)
            changes.deletes.add(activation_id)
        record.status = Status.COMPLETE

    def _promote_delays(self, now: float) -> int:
        promoted = 0
        for record in self._due(self._delays, now, Status.DELAY, "delay_until"):
            self._set_status(record, Status.PENDING)
            self._enter_pending(record)
            promoted += 1
        return promoted

    def _expire(self, now: float) -> int:
        expired = 0
        for record in self._due(self._expiries, now, Status.PENDING, "expires_at"):
            self._finish(record)
            self._pending.prune((record.application, record.namespace))
            expired += 1
        return expired

    def _handle_deadlines(self, now: float) -> tuple[int, int]:
        resets = failed = 0
        for record in self._due(self._deadlines, now, Status.PROCESSING, "processing_deadline"):
            record.processing_deadline = None
            record.processing_attempts += 1
            exhausted = record.processing_attempts >= self.limits.max_processing_attempts
            if record.at_most_once or exhausted:
                self._fail(record)
                failed += 1
            elif not self._screened_out(record):
                self._set_status(record, Status.PENDING)
                self._enter_pending(record)
                resets += 1
        return resets, failed

    def _due(
        self, heap: list[tuple[float, ActivationId]], now: float, status: Status, field: str
    ) -> Iterator[Record]:
        """Pop the entries of `heap` due by `now`, yielding each record the entry still
        stands for: still in `status`, its time `field` unchanged. Other entries are dead
        (the record moved on, or was rescheduled with a new entry) and are dropped."""
        records = self._records
        while heap and heap[0][0] <= now:
            at, activation_id = heapq.heappop(heap)
            record = records.get(activation_id)
            if record is not None and record.status is status and getattr(record, field) == at:
                yield record

    @staticmethod
    def _order(record: Record, kind: ProduceKind, topic: str = "") -> ProduceOrder:
        return ProduceOrder(
            id=record.id,
            kind=kind,
            activation=record.activation,
            max_attempts=record.max_attempts,
            delay_on_retry_s=record.delay_on_retry_s,
            topic=topic,
        )
