"""Every message that crosses between actors: frozen dataclasses, named for what happened
(`FlushDone`) or for what is asked (`Claim`).

Records inside `Ingest` and `Restore` change owner with the message: the sender never
touches them again. `Flush` carries immutable `RecordRow`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from actors.records import ActivationId, KafkaOffset, Partition, Record, RecordRow, Status
from actors.runtime import Essential
from actors.runtime_rules import RuntimeRules


class Recipient(Protocol):
    """Anything a message can be told to: a pykka `ActorRef`, or a test's collector."""

    def tell(self, message: object) -> None: ...


# --- To the state actor -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ingest:
    """New activations consumed from Kafka, and the offsets the batch covers.

    `offsets` may reach past the last record: messages that did not decode were
    dead-lettered by the consumer and still advance their partition.
    """

    records: tuple[Record, ...]
    offsets: tuple[KafkaOffset, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    """Hand out the oldest pending activation matching the filter (ask).

    The answer is the serialized `TaskActivation`, or None when nothing is pending.
    A namespace filter without an application matches that namespace in every application.
    """

    application: str | None = None
    namespace: str | None = None


class ConcludeOutcome(Enum):
    """What a worker's result did, for the caller's counters."""

    APPLIED = "applied"
    LATE = "late"  # the task had been reset to pending after its deadline; it is concluded
    UNKNOWN = "unknown"  # no such id, or already finished: a no-op


@dataclass(frozen=True, slots=True)
class Conclude:
    """A worker's result for one activation (ask), optionally claiming the next task.

    `status` is COMPLETE, RETRY or FAILURE; `max_attempts` and `delay_on_retry_s`, when
    given, replace those of the stored retry state.
    """

    id: ActivationId
    status: Status
    max_attempts: int | None = None
    delay_on_retry_s: int | None = None
    fetch_next: Claim | None = None


@dataclass(frozen=True, slots=True)
class ConcludeResult:
    outcome: ConcludeOutcome
    next_task: bytes | None = None


@dataclass(frozen=True, slots=True)
class WorkBatch:
    """The claims and results of many worker calls in one mailbox message (ask).

    Answered with one answer per request, in order: the serialized activation or None for
    a `Claim`, a `ConcludeResult` for a `Conclude`. The front end sends one per round of
    its event loop, so one wake-up of the state actor serves every call of that round.
    """

    requests: tuple[Claim | Conclude, ...]


WorkAnswer = bytes | None | ConcludeResult
"""What the state actor answers for one request of a `WorkBatch`."""


@dataclass(frozen=True, slots=True)
class ClaimForPush:
    """The pusher has room for `count` more pushes to `application` (tell). The state
    claims up to that many, each CLAIMED for `lease_s`, and tells `reply_to` one
    `ClaimedForPush`, empty when nothing is pending."""

    application: str
    count: int
    lease_s: float
    reply_to: Recipient


@dataclass(frozen=True, slots=True)
class ClaimedForPush:
    """Tasks claimed for pushes to `application`: (id, serialized TaskActivation), oldest
    first."""

    application: str
    tasks: tuple[tuple[ActivationId, bytes], ...]


@dataclass(frozen=True, slots=True)
class PushesSettled(Essential):
    """Workers acknowledged these pushes (PROCESSING from now), or refused them or could not
    be reached (pending again). Essential: the pusher's rate is bounded by its pushes in
    flight, and a lost settlement would leave tasks claimed until their leases end."""

    acknowledged: tuple[ActivationId, ...] = ()
    failed: tuple[ActivationId, ...] = ()


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock moved (ask): run deadline resets, expiry, delays, and the attempts cap.

    `deadline_resets` is False during the grace period after startup, when workers may
    still finish tasks that they claimed from the previous process.
    """

    now: float
    deadline_resets: bool = True


class ProduceKind(Enum):
    RETRY = "retry"
    DEADLETTER = "deadletter"
    DEMOTE = "demote"


@dataclass(frozen=True, slots=True)
class ProduceOrder:
    """An activation that needs a Kafka produce before its record can be removed.

    For RETRY, the producer builds the new activation from `activation` with `attempts`
    + 1, `max_attempts` and `delay_on_retry_s` (already rewritten by the worker's request).
    For DEADLETTER and DEMOTE, `activation` is sent as it is; DEMOTE goes to `topic` (the
    rules' demoted topic, which may change while the broker runs).
    """

    id: ActivationId
    kind: ProduceKind
    activation: bytes
    max_attempts: int
    delay_on_retry_s: int | None
    topic: str = ""


@dataclass(frozen=True, slots=True)
class TickResult:
    to_produce: tuple[ProduceOrder, ...]
    deadline_resets: int
    expired: int
    delays_due: int
    failed_by_deadline: int
    leases_ended: int = 0
    """Pushes never acknowledged within their lease: back to pending."""


@dataclass(frozen=True, slots=True)
class Produced(Essential):
    """Kafka acknowledged these retries and dead letters: their records are finished."""

    ids: tuple[ActivationId, ...]


@dataclass(frozen=True, slots=True)
class ApplyRules(Essential):
    """The runtime rules changed (the file, a control action, SIGHUP): put them in force for
    what is held and what comes. Essential: a lost one would leave a killswitch unapplied."""

    rules: RuntimeRules


@dataclass(frozen=True, slots=True)
class Restore(Essential):
    """Every record the writer loaded at startup; the state machine starts from these."""

    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class FlushDone(Essential):
    seq: int


@dataclass(frozen=True, slots=True)
class FlushFailed(Essential):
    seq: int
    error: str


@dataclass(frozen=True, slots=True)
class FlushDue:
    """The flush timer fired: send a batch if anything is dirty and none is outstanding."""


@dataclass(frozen=True, slots=True)
class Connect(Essential):
    """The supervisor introduces the state actor to peers started after it."""

    writer: Recipient | None = None
    consumer: Recipient | None = None


@dataclass(frozen=True, slots=True)
class Drain:
    """Send what is dirty now (ask); True once nothing is left unflushed. Shutdown repeats
    it until True, so the last changes reach the writer before it closes."""


@dataclass(frozen=True, slots=True)
class Stats:
    """Ask for a `StateStats`."""


@dataclass(frozen=True, slots=True)
class StateStats:
    by_status: dict[Status, int]
    by_group: dict[tuple[str, str, Status], int]  # (application, namespace, status) -> records
    by_partition: dict[Partition, int]
    dirty: int
    flush_outstanding: bool
    ingest_paused: bool
    oldest_pending_added_at: float | None
    claims: dict[str, int]  # "hit" / "miss"
    conclusions: dict[str, int]  # by ConcludeOutcome value
    killed: dict[str, int] = field(default_factory=dict)
    """Dropped by the killswitch since start, by entry label."""
    demoted_forwarded: int = 0
    held_pending: int = 0
    """Pending activations a paused namespace or application holds back."""


# --- To the SQLite writer ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flush:
    """One transaction's worth of changes; the writer answers FlushDone or FlushFailed.

    Deletes are applied before upserts, so an id that finished and was then ingested
    again ends up stored.
    """

    seq: int
    upserts: tuple[RecordRow, ...]
    deletes: tuple[ActivationId, ...]
    new_blobs: tuple[tuple[ActivationId, bytes], ...]
    offsets: tuple[KafkaOffset, ...]

    @property
    def row_changes(self) -> int:
        return len(self.upserts) + len(self.deletes) + len(self.new_blobs)


@dataclass(frozen=True, slots=True)
class LoadAndRestore:
    """Load every stored record and tell them to the state as one `Restore` (ask);
    answered with the number of records restored."""


@dataclass(frozen=True, slots=True)
class Maintain:
    """Give free pages back and checkpoint the WAL, optionally VACUUM (ask); answered with
    the store's sizes afterwards."""

    full_vacuum: bool = False


@dataclass(frozen=True, slots=True)
class StoreSizesQuery:
    """Ask for the store's file sizes on disk."""


# --- To the Kafka consumer -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Persisted(Essential):
    """These offsets are durable in SQLite: they may be committed to Kafka."""

    offsets: tuple[KafkaOffset, ...]


@dataclass(frozen=True, slots=True)
class StopConsuming:
    """Shutdown (ask): pause every partition for good and hand the state what is batched,
    so that the state's last flush covers everything consumed; offsets are committed when
    the consumer stops."""


@dataclass(frozen=True, slots=True)
class IngestBackpressure(Essential):
    """The state crossed a `max_*_count` limit (pause) or fell back under all (resume)."""

    pause: bool


@dataclass(frozen=True, slots=True)
class ConsumerStatsQuery:
    """Ask the consumer for a `ConsumerStats`."""


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """The consumer's counters since it started, and its partitions now.

    `committed` maps a partition to the offset last committed for it (the next offset
    to consume, as Kafka counts it); `decode_failures` is keyed by `DecodeReason`.
    """

    consumed: int
    ingested: int
    batches: int
    decode_failures: dict[str, int]
    dead_lettered: int
    dead_letter_failures: int
    kafka_errors: int
    commit_failures: int
    assigned: tuple[Partition, ...]
    paused: tuple[Partition, ...]
    committed: dict[Partition, int]
    backpressure: bool
    high_watermarks: dict[Partition, int] = field(default_factory=dict)
    """Each assigned partition's end (the offset of the next message produced to it) as of
    the consumer's last fetch from it; absent until a fetch saw it. The committed lag of a
    partition is its high watermark minus its committed offset."""


# --- To the gRPC front end ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadTls:
    """Asks the front end to read its certificate files again (the supervisor's SIGHUP)."""


@dataclass(frozen=True, slots=True)
class SetServing(Essential):
    """The broker is ready (restored, consuming) or no longer is: flips gRPC health."""

    serving: bool
