"""The activation record shared by the state machine and the SQLite writer.

A `Record` is owned by exactly one party at a time: the consumer builds it and hands it
over in an `Ingest` message; from then on only the state machine mutates it. What crosses
to the writer is a snapshot (`Record.snapshot()`), never the live object.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from operator import attrgetter
from typing import NewType

ActivationId = NewType("ActivationId", str)
"""The activation's `id` field: unique across the topic, the key of every index."""

Partition = NewType("Partition", int)
Offset = NewType("Offset", int)


class Status(IntEnum):
    """Where a record is in its life.

    Values 1-5 equal the wire enum `TaskActivationStatus`; `DELAY` is the broker's own
    (a task that is not yet due), never sent to a worker.
    """

    PENDING = 1
    PROCESSING = 2
    FAILURE = 3
    RETRY = 4
    COMPLETE = 5
    DELAY = 6


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
    processing_attempts: int = 0
    at_most_once: bool = False
    on_attempts_exceeded: OnAttemptsExceeded = OnAttemptsExceeded.DISCARD
    expires_at: float | None = None
    delay_until: float | None = None
    attempts: int = 0
    max_attempts: int = 1
    delay_on_retry_s: int | None = None

    def snapshot(self) -> Record:
        """A copy that stays as it is now, for a flush to the writer."""
        # copy.copy goes through __reduce_ex__ and costs ~15 us a record; flushes copy
        # every dirty record, so all fields are read in one C call and passed in order.
        return Record(*_all_fields(self))


_all_fields = attrgetter(*(f.name for f in fields(Record)))


@dataclass(frozen=True, slots=True)
class KafkaOffset:
    """The highest offset of a partition that a batch covers (commit `offset + 1`)."""

    partition: Partition
    offset: Offset
