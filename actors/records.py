"""The activation record shared by the state machine and the SQLite writer.

A `Record` is owned by exactly one party at a time: the consumer builds it and hands it
over in an `Ingest` message; from then on only the state machine mutates it. What crosses
to the writer is a `RecordRow` (`Record.row()`): an immutable copy of everything but the
activation bytes, which are written once, apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from operator import attrgetter
from typing import NamedTuple, NewType

ActivationId = NewType("ActivationId", str)
"""The activation's `id` field: unique across the topic, the key of every index."""

Partition = NewType("Partition", int)
Offset = NewType("Offset", int)


class Status(IntEnum):
    """Where a record is in its life.

    Values 1-5 equal the wire enum `TaskActivationStatus`; `DELAY` (a task that is not yet
    due), `CLAIMED` (taken for a push that the worker has not yet acknowledged) and
    `DEMOTED` (in a demoted namespace, waiting for Kafka to acknowledge its forward to the
    demoted topic) are the broker's own, never sent to a worker.
    """

    PENDING = 1
    PROCESSING = 2
    FAILURE = 3
    RETRY = 4
    COMPLETE = 5
    DELAY = 6
    CLAIMED = 7
    DEMOTED = 8


class OnAttemptsExceeded(IntEnum):
    """What happens to a task whose attempts ran out; values equal the wire enum."""

    UNSPECIFIED = 0
    DISCARD = 1
    DEADLETTER = 2


@dataclass(slots=True)
class Record:
    """One in-flight activation: what the transitions need, and its bytes.

    Times are Unix seconds (float): `received_at` comes from the producer's clock, and
    every deadline derived from it must share that clock.
    """

    id: ActivationId
    application: str
    namespace: str
    taskname: str
    status: Status
    received_at: float
    added_at: float
    partition: Partition
    offset: Offset
    activation: bytes = field(repr=False)
    processing_deadline_duration_s: int = 0
    processing_deadline: float | None = None
    """PROCESSING: when the task goes back to pending. CLAIMED: when its push lease ends."""
    processing_attempts: int = 0
    at_most_once: bool = False
    on_attempts_exceeded: OnAttemptsExceeded = OnAttemptsExceeded.DISCARD
    expires_at: float | None = None
    delay_until: float | None = None
    attempts: int = 0
    max_attempts: int = 1
    delay_on_retry_s: int | None = None

    def row(self) -> RecordRow:
        """The stored columns as they are now, for a flush to the writer.

        Every flush copies every dirty record: one C call reads the fields, and a tuple
        holds them (a Record copy cost several times more, mostly in __init__).
        """
        return RecordRow._make(_row_fields(self))

    @classmethod
    def from_row(cls, row: RecordRow, activation: bytes) -> Record:
        return cls(activation=activation, **row._asdict())


class RecordRow(NamedTuple):
    """A record's stored columns: `Record` without its activation bytes, in field order."""

    id: ActivationId
    application: str
    namespace: str
    taskname: str
    status: Status
    received_at: float
    added_at: float
    partition: Partition
    offset: Offset
    processing_deadline_duration_s: int
    processing_deadline: float | None
    processing_attempts: int
    at_most_once: bool
    on_attempts_exceeded: OnAttemptsExceeded
    expires_at: float | None
    delay_until: float | None
    attempts: int
    max_attempts: int
    delay_on_retry_s: int | None


_row_fields = attrgetter(*RecordRow._fields)
if [f.name for f in fields(Record) if f.name != "activation"] != list(RecordRow._fields):
    raise TypeError("RecordRow must list Record's fields, in order, without activation")


@dataclass(frozen=True, slots=True)
class KafkaOffset:
    """The highest offset of a partition that a batch covers (commit `offset + 1`)."""

    partition: Partition
    offset: Offset
