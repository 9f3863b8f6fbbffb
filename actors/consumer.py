"""KafkaConsumer: the actor that reads activations from Kafka and commits durable offsets.

It polls in short slices, each one a `_PollDue` message it tells itself, so `Persisted`,
`IngestBackpressure`, a stats query and a stop are served between two slices. A slice
takes what the client holds, or waits for the first message to arrive, and hands what it
decoded to the state actor at once: in one `Ingest`, or in several past the count and
byte limits. No record waits for a batch to fill, so a task is claimable as soon as it
is read; durability does not need ingest batches, the state actor batches its flushes.
An offset is committed only once the writer's `Persisted` says the rows behind it are
durable.

A message that does not decode is dead-lettered with headers that say why, and its offset
travels in the next `Ingest` like any other, so it is committed once the batch around it
is durable. If Kafka does not acknowledge the dead letter, the consumer does not move past
that message: it seeks its partition back to it, pauses that partition for
`dlq_retry_backoff_ms` and then reads it again. Skipping it would lose it; stopping the
whole consumer would stall the partitions that are fine.

A rebalance takes partitions away inside a fetch (librdkafka runs the revoke on this
thread). The consumer then commits, synchronously, every durable offset of them Kafka has
not acknowledged, and drops what it read of them but did not hand over: the batch, an
`Ingest` the state refused, a message fetched before the revoke. What the state took stays
with it and finishes on this broker's file; the next owner reads on from the commit.

The logic lives in plain classes (`IngestBatch`, `CommitTracker`, and `PauseState`, which
takes `now` as an argument); the actor is the adapter around the confluent-kafka
client, and the one place where its errors become `KafkaUnavailable`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import pykka
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from actors.activation import ActivationDecodeError, decode_record
from actors.errors import ConfigError, KafkaUnavailable, MailboxFull
from actors.logs import quiet_repeats
from actors.messages import (
    ConsumerStats,
    ConsumerStatsQuery,
    Ingest,
    IngestBackpressure,
    Persisted,
    Recipient,
    StopConsuming,
)
from actors.producer import OutgoingMessage, ProduceReport
from actors.records import KafkaOffset, Offset, Partition, Record
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver

logger = logging.getLogger(__name__)
# librdkafka's own reports, which repeat on every reconnect while Kafka is away.
_client_log = logging.getLogger(f"{__name__}.librdkafka")

DECODE_ERROR_HEADER = "taskbroker-decode-error"
SOURCE_TOPIC_HEADER = "taskbroker-source-topic"
SOURCE_PARTITION_HEADER = "taskbroker-source-partition"
SOURCE_OFFSET_HEADER = "taskbroker-source-offset"

_AUTO_OFFSET_RESETS = ("earliest", "latest", "error")

# A failed commit is sent again after this long even if no new Persisted comes: on a
# quiet topic the next one may be far off.
_COMMIT_RETRY_S = 1.0

# How often librdkafka reports its statistics, from which `KafkaSilence` learns when Kafka
# last answered. A JSON document per second is cheap next to 20 fetches a second.
_STATISTICS_INTERVAL_MS = 1_000
# A document stamped further back than this (or in the future) is on another clock than
# ours: it is read as written when it was read.
_STALE_STATISTICS_S = 60.0


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The most one `Ingest` carries; a slice that read more sends several (taskbroker's
    `db_insert_batch_max_len` and `_max_size`, with their defaults)."""

    max_len: int = 256
    max_bytes: int = 16_000_000

    def __post_init__(self) -> None:
        for key in ("max_len", "max_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"consumer.batch.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """How the consumer reaches Kafka, batches, and handles messages it cannot decode.

    `session_timeout_ms` is short by default because a consumer-group join waits for half
    of it before assigning partitions; the heartbeat is a third of it.

    `fetch_wait_max_ms` is how long Kafka may hold a fetch that found nothing. Kafka answers
    as soon as a message arrives, whatever this is; Tansu (the embedded Kafka) does not,
    and with librdkafka's 500 a message idled there for up to 150 ms before the client got
    it (measured: idle topic, one produce every 50-400 ms: 50 gives median 8 ms, worst
    24 ms; 100 gives 12 ms, 51 ms). The price on Kafka is 20 empty fetches a second per
    broker while idle.
    """

    bootstrap_servers: str
    topic: str = "taskworker"
    group_id: str = "taskworker"
    dlq_topic: str = "taskworker-dlq"
    session_timeout_ms: int = 6_000
    auto_offset_reset: str = "latest"
    batch: BatchLimits = BatchLimits()
    poll_slice_ms: int = 50
    """The longest one slice waits for a first message; it returns as soon as one arrives."""
    poll_max_messages: int = 1_000
    fetch_wait_max_ms: int = 50
    dlq_timeout_ms: int = 5_000
    dlq_retry_backoff_ms: int = 5_000
    max_delayed_task_allowed_s: int = 3_600
    client_id: str = "taskbroker-actors"
    security: Mapping[str, str] = field(default_factory=dict, repr=False)
    """librdkafka's security.*, sasl.* and ssl.* settings; out of repr: it holds secrets."""

    def __post_init__(self) -> None:
        for key in ("bootstrap_servers", "topic", "group_id", "dlq_topic"):
            if not getattr(self, key):
                raise ConfigError(f"consumer.{key} must not be empty")
        if self.topic == self.dlq_topic:
            raise ConfigError(f"consumer.dlq_topic must differ from consumer.topic {self.topic!r}")
        for key in (
            "session_timeout_ms",
            "poll_slice_ms",
            "poll_max_messages",
            "fetch_wait_max_ms",
            "dlq_timeout_ms",
            "dlq_retry_backoff_ms",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"consumer.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_delayed_task_allowed_s < 0:
            raise ConfigError(
                "consumer.max_delayed_task_allowed_s must be >= 0, "
                f"got {self.max_delayed_task_allowed_s}"
            )
        if self.auto_offset_reset not in _AUTO_OFFSET_RESETS:
            raise ConfigError(
                f"consumer.auto_offset_reset must be one of {_AUTO_OFFSET_RESETS}, "
                f"got {self.auto_offset_reset!r}"
            )

    def client_settings(self) -> dict[str, str | int | bool]:
        """The librdkafka settings this configuration stands for."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "client.id": self.client_id,
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(self.session_timeout_ms // 3, 1),
            "auto.offset.reset": self.auto_offset_reset,
            "fetch.wait.max.ms": self.fetch_wait_max_ms,
            # Offsets are committed by hand, and only after Persisted covers them.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Eager assignors: with cooperative-sticky, Tansu gave a second member no
            # partitions until the first one left the group.
            "partition.assignment.strategy": "range,roundrobin",
            **self.security,
        }


class IngestBatch:
    """Records and offsets on their way to the state, with the limits of one `Ingest`.

    Offsets are kept per partition as the highest one seen; a dead-lettered message adds
    its offset without a record.
    """

    def __init__(self, limits: BatchLimits) -> None:
        self._limits = limits
        self._records: list[Record] = []
        self._offsets: dict[Partition, Offset] = {}
        self._bytes = 0

    def __repr__(self) -> str:
        return (
            f"<IngestBatch {len(self._records)} records, {self._bytes} bytes, "
            f"partitions {sorted(self._offsets)}>"
        )

    def __len__(self) -> int:
        return len(self._records)

    @property
    def empty(self) -> bool:
        """Nothing to send: every record adds its offset, so no offsets means no records."""
        return not self._offsets

    @property
    def full(self) -> bool:
        return len(self._records) >= self._limits.max_len or self._bytes >= self._limits.max_bytes

    def add_record(self, record: Record) -> None:
        self._records.append(record)
        self._bytes += len(record.activation)
        self._advance(record.partition, record.offset)

    def add_skipped(self, partition: Partition, offset: Offset) -> None:
        """A message that is done with (dead-lettered) but must still be committed."""
        self._advance(partition, offset)

    def take(self) -> Ingest:
        """The `Ingest` for everything added so far; the batch starts over empty."""
        ingest = Ingest(
            tuple(self._records),
            tuple(KafkaOffset(p, o) for p, o in sorted(self._offsets.items())),
        )
        self._records = []
        self._offsets = {}
        self._bytes = 0
        return ingest

    def drop(self, partitions: Collection[Partition]) -> None:
        """Forget what was added of `partitions`."""
        self._records = [r for r in self._records if r.partition not in partitions]
        self._offsets = {p: o for p, o in self._offsets.items() if p not in partitions}
        self._bytes = sum(len(record.activation) for record in self._records)

    def _advance(self, partition: Partition, offset: Offset) -> None:
        self._offsets[partition] = max(offset, self._offsets.get(partition, offset))


def without_partitions(ingest: Ingest, partitions: Collection[Partition]) -> Ingest | None:
    """`ingest` less the records and offsets of `partitions`; None when nothing is left."""
    offsets = tuple(o for o in ingest.offsets if o.partition not in partitions)
    if not offsets:
        return None
    records = tuple(r for r in ingest.records if r.partition not in partitions)
    return Ingest(records, offsets)


class CommitTracker:
    """Which offsets are durable, which of those Kafka was asked to commit, and which it
    acknowledged, for the partitions this consumer read since they were assigned to it.

    Offsets here are the highest offset covered (as in `KafkaOffset`); Kafka is sent
    offset + 1, the next one to consume.
    """

    def __init__(self) -> None:
        self._first_read: dict[Partition, Offset] = {}
        self._durable: dict[Partition, Offset] = {}
        self._committed: dict[Partition, Offset] = {}
        self._acknowledged: dict[Partition, Offset] = {}

    def __repr__(self) -> str:
        return (
            f"<CommitTracker first_read={self._first_read} durable={self._durable} "
            f"committed={self._committed} acknowledged={self._acknowledged}>"
        )

    def read_at(self, partition: Partition, offset: Offset) -> None:
        """A message of `partition` at `offset` was read; the first one since the partition
        was assigned is where this ownership of it starts."""
        self._first_read.setdefault(partition, offset)

    def persisted(self, offsets: Iterable[KafkaOffset]) -> None:
        for item in offsets:
            first = self._first_read.get(item.partition)
            if first is None or item.offset < first:
                # Records of an earlier ownership, flushed late: a later owner may have
                # committed past them, and committing them would move the group back.
                continue
            self._durable[item.partition] = max(
                item.offset, self._durable.get(item.partition, item.offset)
            )

    def uncommitted(self, partitions: Iterable[Partition]) -> dict[Partition, Offset]:
        """The durable offsets among `partitions` that are ahead of their last commit."""
        return self._ahead_of(self._committed, partitions)

    def unacknowledged(self, partitions: Iterable[Partition]) -> dict[Partition, Offset]:
        """The durable offsets among `partitions` that Kafka has not acknowledged: sent
        or not, they must be committed before the partitions go."""
        return self._ahead_of(self._acknowledged, partitions)

    def committing(self, offsets: Mapping[Partition, Offset]) -> None:
        """A commit of `offsets` was sent; they are not offered again unless it fails."""
        self._committed.update(offsets)

    def commit_failed(self, partition: Partition, offset: Offset) -> None:
        """Offer `offset` again, unless a later commit of the partition superseded it."""
        if self._committed.get(partition) == offset:
            del self._committed[partition]

    def acknowledged(self, partition: Partition, offset: Offset) -> None:
        if partition in self._first_read:  # else a commit of an ownership that has ended
            self._acknowledged[partition] = max(offset, self._acknowledged.get(partition, offset))

    def forget(self, partitions: Iterable[Partition]) -> None:
        """The partitions left this consumer: a later owner's commits are not ours to redo."""
        for partition in partitions:
            for offsets in (self._first_read, self._durable, self._committed, self._acknowledged):
                offsets.pop(partition, None)

    def acknowledged_offsets(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
        """What Kafka has acknowledged per partition among `partitions`, as it counts
        (next to consume)."""
        acknowledged = self._acknowledged
        return {p: acknowledged[p] + 1 for p in partitions if p in acknowledged}

    def committed(self) -> dict[Partition, int]:
        """The last offset sent per partition, as Kafka counts it (next to consume)."""
        return {partition: offset + 1 for partition, offset in self._committed.items()}

    def _ahead_of(
        self, done: Mapping[Partition, Offset], partitions: Iterable[Partition]
    ) -> dict[Partition, Offset]:
        found: dict[Partition, Offset] = {}
        for partition in partitions:
            durable = self._durable.get(partition)
            if durable is not None and durable > done.get(partition, -1):
                found[partition] = durable
        return found


class KafkaSilence:
    """How long Kafka has been silent towards this consumer, read from librdkafka's
    statistics, and whether that is long enough to call it unreachable.

    A Kafka that is down, hung (a stopped process keeps its sockets open, so librdkafka
    sees no error for a long while) or cut off looks the same here: nothing received.
    A healthy one answers a fetch every `fetch_wait_max_ms` and a heartbeat every third of
    the session timeout, so a silence as long as the session timeout is the one Kafka
    itself would take for a dead member. A group join that Kafka holds for a few seconds
    (Tansu does) stays well short of it.
    """

    def __init__(
        self, unreachable_after_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._unreachable_after_s = unreachable_after_s
        self._clock = clock
        # No answer yet: silent since it was made. Written by the consumer's thread only,
        # read by any; a float assignment is atomic.
        self._last_answer_at = clock()

    def __repr__(self) -> str:
        return f"<KafkaSilence last answer at {self._last_answer_at:.1f}>"

    def observe(self, statistics: Mapping[str, object], now: float | None = None) -> None:
        """One statistics document (librdkafka's JSON, parsed), read at `now`.

        Its idle times count from when librdkafka wrote it (`ts`, microseconds on the
        monotonic clock `time.monotonic` reads too), not from when it was read: a document
        read late must not make an old answer look recent.
        """
        now = self._clock() if now is None else now
        written_us = statistics.get("ts")
        if isinstance(written_us, int) and now - _STALE_STATISTICS_S <= written_us / 1e6 <= now:
            now = written_us / 1e6
        brokers = statistics.get("brokers")
        if not isinstance(brokers, Mapping):
            return
        idle_us = [
            broker["rxidle"]
            for broker in brokers.values()
            if isinstance(broker, Mapping)
            and broker.get("state") == "UP"
            and isinstance(broker.get("rxidle"), int)
            and broker["rxidle"] >= 0  # -1: nothing received on this connection yet
        ]
        if idle_us:
            self._last_answer_at = max(self._last_answer_at, now - min(idle_us) / 1e6)

    def silent_s(self, now: float | None = None) -> float:
        """Seconds since Kafka last answered (anything received at all)."""
        return max((self._clock() if now is None else now) - self._last_answer_at, 0.0)

    def answering(self, now: float | None = None) -> bool:
        """False once Kafka has been silent for the session timeout."""
        return self.silent_s(now) < self._unreachable_after_s


class PauseState:
    """Which assigned partitions must not be fetched from, and why.

    All of them while the state asks for backpressure or refuses an `Ingest` (its mailbox
    is full); one of them while a dead letter of it waits for another try (a hold).
    """

    def __init__(self) -> None:
        self.backpressure = False
        self.ingest_blocked = False
        self.stopping = False
        self._holds: dict[Partition, tuple[Offset, float]] = {}

    def __repr__(self) -> str:
        return (
            f"<PauseState backpressure={self.backpressure} "
            f"ingest_blocked={self.ingest_blocked} holds={self._holds}>"
        )

    def hold(self, partition: Partition, offset: Offset, retry_at: float) -> None:
        """Read nothing of `partition` from `offset` on until `retry_at`."""
        self._holds[partition] = (offset, retry_at)

    def held(self, partition: Partition, offset: Offset) -> bool:
        """Whether a message must be ignored: it is at or past its partition's hold."""
        hold = self._holds.get(partition)
        return hold is not None and offset >= hold[0]

    def release_due(self, now: float) -> list[Partition]:
        due = [p for p, (_, retry_at) in self._holds.items() if retry_at <= now]
        for partition in due:
            del self._holds[partition]
        return due

    def forget(self, partitions: Iterable[Partition]) -> None:
        for partition in partitions:
            self._holds.pop(partition, None)

    def paused(self, assigned: Iterable[Partition]) -> set[Partition]:
        """The partitions among `assigned` that must be paused now."""
        if self.backpressure or self.ingest_blocked or self.stopping:
            return set(assigned)
        return {p for p in assigned if p in self._holds}


class DeadLetterSink(Protocol):
    """Where undecodable messages go: `actors.producer.KafkaProducer` in production."""

    def produce_many(self, items: Sequence[OutgoingMessage], timeout_s: float) -> ProduceReport: ...

    def close(self, timeout_s: float) -> int: ...


@dataclass(frozen=True, slots=True)
class _PollDue:
    """The consumer's note to itself: read the next slice from Kafka."""


class KafkaConsumer(BrokerActor):
    """Consumes `config.topic` into `state`; commits what the writer reports durable.

    Messages: `Persisted` and `IngestBackpressure` (tell), `ConsumerStatsQuery`
    (ask → `ConsumerStats`). The confluent client is used on the actor's thread only
    (it is not thread-safe), except for its construction here, which fails fast on a
    setting librdkafka rejects.
    """

    def __init__(
        self,
        config: ConsumerConfig,
        state: Recipient,
        dead_letters: DeadLetterSink,
        *,
        mailbox: MailboxConfig,
        observer: MailboxObserver | None = None,
        name: str = "kafka-consumer",
        assigned: threading.Event | None = None,
        silence: KafkaSilence | None = None,
    ) -> None:
        super().__init__(name, mailbox, observer)
        self._config = config
        self._state = state
        self._dead_letters = dead_letters
        # Set at the first partition assignment: the broker is then "consuming".
        self._first_assignment = assigned or threading.Event()
        quiet_repeats(_client_log)
        # Shared with whoever reports health (the supervisor passes it in): read on other
        # threads without a message, so it tells the truth while this actor is stuck too.
        self._silence = silence or KafkaSilence(config.session_timeout_ms / 1000)
        self._answering = True  # what was last logged about Kafka answering
        try:
            self._consumer = Consumer(
                {
                    **config.client_settings(),
                    "on_commit": self._on_commit,
                    "statistics.interval.ms": _STATISTICS_INTERVAL_MS,
                    "stats_cb": self._on_statistics,
                },
                logger=_client_log,
                error_cb=partial(_log_client_error, config.bootstrap_servers),
            )
        except KafkaException as exc:
            raise ConfigError(f"the Kafka consumer rejected its settings: {exc}") from exc
        self._batch = IngestBatch(config.batch)
        self._undelivered: Ingest | None = None
        self._commits = CommitTracker()
        self._pauses = PauseState()
        self._assigned: set[Partition] = set()
        self._paused: set[Partition] = set()
        # Revokes and losses so far: `_fetch` tells by it whether one ran inside a fetch.
        self._departures = 0
        self._poll_scheduled = False
        self._commit_retry_at: float | None = None
        self._consumed = 0
        self._ingested = 0
        self._batches = 0
        self._decode_failures: Counter[str] = Counter()
        self._dead_lettered = 0
        self._dead_letter_failures = 0
        self._kafka_errors = 0
        self._commit_failures = 0

    def __repr__(self) -> str:
        return (
            f"<KafkaConsumer {self.name} topic={self._config.topic!r} "
            f"group={self._config.group_id!r} assigned={sorted(self._assigned)}>"
        )

    def on_start(self) -> None:
        try:
            self._consumer.subscribe(
                [self._config.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except KafkaException as exc:
            raise KafkaUnavailable(f"subscribing to {self._config.topic!r} failed: {exc}") from exc
        self._schedule_poll()

    def on_stop(self) -> None:
        # Best effort: what the state takes now is flushed by it; the offsets of anything
        # left are not committed, so the group's next consumer reads those again.
        self._send_batch()
        self.release()

    def release(self) -> None:
        self._commit(self._commits.unacknowledged(self._assigned), asynchronous=False)
        final = self._commits.acknowledged_offsets(self._assigned)
        logger.info(
            "committed the final offsets of %s (next to read): %s",
            self._config.topic,
            ", ".join(f"partition {p} at {o}" for p, o in sorted(final.items())) or "none",
        )
        try:
            # Leaves the group at once, so its partitions move without a session timeout;
            # the revoke it runs finds nothing left to commit.
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("closing the Kafka consumer failed: %s", exc)
        self._dead_letters.close(timeout_s=self._config.dlq_timeout_ms / 1000)

    def handle(self, message: object) -> object:
        try:
            return self._dispatch(message)
        finally:
            self._schedule_poll()

    def _dispatch(self, message: object) -> object:
        match message:
            case _PollDue():
                self._poll_scheduled = False
                self._poll_slice()
            case Persisted(offsets):
                self._commits.persisted(offsets)
                self._commit(self._commits.uncommitted(self._assigned), asynchronous=True)
            case IngestBackpressure(pause):
                if pause != self._pauses.backpressure:
                    logger.info(
                        "state asks to %s ingest after %d consumed",
                        "pause" if pause else "resume",
                        self._consumed,
                    )
                self._pauses.backpressure = pause
                self._apply_pauses()
            case ConsumerStatsQuery():
                return self._stats()
            case StopConsuming():
                self._pauses.stopping = True
                self._apply_pauses()
                self._send_batch()
            case _:
                raise TypeError(f"Kafka consumer got an unknown message: {message!r}")
        return None

    def _schedule_poll(self) -> None:
        """Keep exactly one `_PollDue` in the mailbox while the actor runs."""
        if self._poll_scheduled:
            return
        try:
            self.actor_ref.tell(_PollDue())
        except MailboxFull:
            # The next message handled (the box is full of them) schedules it again.
            logger.debug("consumer mailbox full; the next poll is scheduled later")
        except pykka.ActorDeadError:
            return
        else:
            self._poll_scheduled = True

    def _poll_slice(self) -> None:
        if self._pauses.stopping:
            # Whatever is fetched now could not reach the state's last flush.
            return
        now = time.monotonic()
        if self._pauses.release_due(now):
            self._apply_pauses()
        if self._undelivered is not None:
            self._deliver(self._undelivered)
        if self._commit_retry_at is not None and self._commit_retry_at <= now:
            self._commit_retry_at = None
            self._commit(self._commits.uncommitted(self._assigned), asynchronous=True)
        try:
            messages = self._fetch()
        except KafkaException as exc:
            raise KafkaUnavailable(f"consuming from {self._config.topic!r} failed: {exc}") from exc
        # One clock reading per slice: a record's arrival need not be finer than a slice.
        wall_now = time.time()
        for message in messages:
            self._take(message, wall_now)
        self._send_batch()
        self._report_silence()

    def _fetch(self) -> list[Message]:
        """What the client holds now or, when it holds nothing, the first message to arrive
        within a slice and whatever came with it.

        `consume` with a timeout returns only once `poll_max_messages` arrived or the time
        is up, so on a quiet topic every message would wait out the rest of its slice.
        """
        consumer, most = self._consumer, self._config.poll_max_messages
        messages = consumer.consume(num_messages=most, timeout=0)
        if messages:
            return messages
        first = consumer.poll(timeout=self._config.poll_slice_ms / 1000)
        if first is None:
            return []
        if most == 1:
            return [first]
        departures = self._departures
        rest = consumer.consume(num_messages=most - 1, timeout=0)
        if self._departures != departures:
            # `first` was read under the assignment this consume revoked (librdkafka
            # drops such messages from its own queue, not from ours): its partition may be
            # another member's now, or it came back and is read again from the commit.
            return rest
        return [first, *rest]

    def _take(self, message: Message, wall_now: float) -> None:
        error = message.error()
        if error is not None:
            self._take_error(message, error)
            return
        raw_partition, raw_offset = message.partition(), message.offset()
        if raw_partition is None or raw_offset is None:
            raise KafkaUnavailable(
                f"the Kafka client returned a message without a position: {message}"
            )
        partition, offset = Partition(raw_partition), Offset(raw_offset)
        self._commits.read_at(partition, offset)
        if self._pauses.held(partition, offset):
            return  # fetched before the seek back to the held dead letter
        self._consumed += 1
        value = message.value() or b""
        try:
            record = decode_record(
                value,
                partition,
                offset,
                wall_now,
                max_delay_s=self._config.max_delayed_task_allowed_s,
            )
        except ActivationDecodeError as exc:
            self._decode_failed(partition, offset, value, exc.reason)
            return
        self._batch.add_record(record)
        if self._batch.full:
            self._send_batch()

    def _take_error(self, message: Message, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaUnavailable(f"the Kafka consumer hit a fatal error: {_describe(error)}")
        # librdkafka recovers from the others by itself (reconnects, refetches); a
        # message-level error carries no value to dead-letter.
        self._kafka_errors += 1
        logger.warning(
            "kafka consumer error at %s/%s/%s: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            _describe(error),
        )

    def _decode_failed(
        self, partition: Partition, offset: Offset, value: bytes, reason: str
    ) -> None:
        self._decode_failures[reason] += 1
        topic = self._config.topic
        logger.warning(
            "dead-lettering %s/%d/%d to %s: %s",
            topic,
            partition,
            offset,
            self._config.dlq_topic,
            reason,
        )
        dead_letter = OutgoingMessage(
            key_id=f"{topic}/{partition}/{offset}",
            topic=self._config.dlq_topic,
            value=value,
            headers=(
                (DECODE_ERROR_HEADER, reason.encode()),
                (SOURCE_TOPIC_HEADER, topic.encode()),
                (SOURCE_PARTITION_HEADER, str(partition).encode()),
                (SOURCE_OFFSET_HEADER, str(offset).encode()),
            ),
        )
        report = self._dead_letters.produce_many(
            [dead_letter], timeout_s=self._config.dlq_timeout_ms / 1000
        )
        if report.all_acknowledged:
            self._dead_lettered += 1
            self._batch.add_skipped(partition, offset)
            return
        self._dead_letter_failures += 1
        backoff_s = self._config.dlq_retry_backoff_ms / 1000
        logger.error(
            "dead letter of %s/%d/%d not acknowledged (%s); partition %d waits %.1f s "
            "and reads it again",
            topic,
            partition,
            offset,
            "; ".join(report.failed.values()),
            partition,
            backoff_s,
        )
        self._pauses.hold(partition, offset, time.monotonic() + backoff_s)
        try:
            self._consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            # Reading on would skip the message; a restarted consumer reads it again.
            raise KafkaUnavailable(
                f"cannot seek {topic}/{partition} back to {offset}: {exc}"
            ) from exc
        self._apply_pauses()

    def _send_batch(self) -> None:
        if self._undelivered is not None or self._batch.empty:
            return
        self._deliver(self._batch.take())

    def _deliver(self, ingest: Ingest) -> None:
        try:
            self._state.tell(ingest)
        except pykka.ActorDeadError:
            # Only at shutdown; the offsets are not committed, so nothing is lost.
            logger.info("state stopped; %d consumed records not handed over", len(ingest.records))
            self._undelivered = None
            return
        except MailboxFull:
            if self._undelivered is None:
                logger.warning("state mailbox full; consumption paused until it takes the batch")
            self._undelivered = ingest
            self._pauses.ingest_blocked = True
        else:
            self._undelivered = None
            self._pauses.ingest_blocked = False
            self._batches += 1
            self._ingested += len(ingest.records)
        self._apply_pauses()

    def _apply_pauses(self) -> None:
        wanted = self._pauses.paused(self._assigned)
        to_pause = wanted - self._paused
        to_resume = (self._paused - wanted) & self._assigned
        topic = self._config.topic
        try:
            if to_pause:
                self._consumer.pause([TopicPartition(topic, p) for p in sorted(to_pause)])
            if to_resume:
                self._consumer.resume([TopicPartition(topic, p) for p in sorted(to_resume)])
        except KafkaException as exc:
            raise KafkaUnavailable(f"pausing or resuming {topic} failed: {exc}") from exc
        self._paused = wanted

    def _commit(self, offsets: Mapping[Partition, Offset], *, asynchronous: bool) -> None:
        if not offsets:
            return
        topic = self._config.topic
        self._commits.committing(offsets)
        commit = [TopicPartition(topic, p, o + 1) for p, o in sorted(offsets.items())]
        try:
            if asynchronous:
                self._consumer.commit(offsets=commit, asynchronous=True)
            else:
                self._check_committed(self._consumer.commit(offsets=commit, asynchronous=False))
        except KafkaException as exc:
            # Not fatal: a retry, the next Persisted, a revoke or the stop commits them;
            # at worst a later owner reads these messages again.
            self._commit_failures += 1
            for partition, offset in offsets.items():
                self._commits.commit_failed(partition, offset)
            self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
            logger.warning("committing %s failed: %s", commit, exc)

    def _check_committed(self, results: list[TopicPartition] | None) -> None:
        for result in results or ():
            if result.error is not None:
                self._commit_failed(result)
            else:
                self._commit_acknowledged(result)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            logger.warning("offset commit failed: %s", _describe(error))
        for result in partitions:
            if error is not None or result.error is not None:
                self._commit_failed(result)
            else:
                self._commit_acknowledged(result)

    def _commit_acknowledged(self, result: TopicPartition) -> None:
        self._commits.acknowledged(Partition(result.partition), Offset(result.offset - 1))

    def _commit_failed(self, result: TopicPartition) -> None:
        self._commit_failures += 1
        self._commit_retry_at = time.monotonic() + _COMMIT_RETRY_S
        self._commits.commit_failed(Partition(result.partition), Offset(result.offset - 1))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assigned = {Partition(tp.partition) for tp in partitions}
        logger.info("assigned %s partitions %s", self._config.topic, sorted(assigned))
        # Assigned here rather than by the client after this callback returns, so the
        # new partitions can be paused before a first fetch while backpressure holds.
        consumer.assign(partitions)
        self._assigned |= assigned
        self._apply_pauses()
        self._first_assignment.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {Partition(tp.partition) for tp in partitions}
        logger.info("revoked %s partitions %s", self._config.topic, sorted(revoked))
        # Synchronously, async commits not yet answered included: the next owner starts
        # from what the group holds when this callback returns.
        self._commit(self._commits.unacknowledged(revoked), asynchronous=False)
        # What a revoke costs: the records the state took that no finished flush covers
        # (about one flush interval's arrivals plus the flush in flight; more while SQLite
        # is slow). Their offsets are not committed, so the next owner reads them again
        # and they run on both brokers, a duplicate the contract allows. Waiting here for
        # their Persisted cannot work: this callback runs on this actor's thread, inside
        # `consume`, and Persisted is a message in this actor's mailbox, served only after
        # the callback returns; the wait could only time out.
        self._leave(revoked)
        consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {Partition(tp.partition) for tp in partitions}
        # Another member may own them already; a commit now could rewind its progress.
        logger.warning("lost %s partitions %s", self._config.topic, sorted(lost))
        self._leave(lost)
        consumer.unassign()

    def _leave(self, partitions: set[Partition]) -> None:
        self._departures += 1
        self._commits.forget(partitions)
        self._pauses.forget(partitions)
        self._assigned -= partitions
        self._paused -= partitions
        # Read but not handed over: their offsets were never committed, so the next owner
        # reads them, and handing them over now would run them twice.
        self._batch.drop(partitions)
        if self._undelivered is not None:
            self._undelivered = without_partitions(self._undelivered, partitions)
            # Blocked only while something of ours still waits: a refused Ingest of the
            # partitions that left does not pause the next assignment.
            self._pauses.ingest_blocked = self._undelivered is not None

    def _stats(self) -> ConsumerStats:
        return ConsumerStats(
            consumed=self._consumed,
            ingested=self._ingested,
            batches=self._batches,
            decode_failures=dict(self._decode_failures),
            dead_lettered=self._dead_lettered,
            dead_letter_failures=self._dead_letter_failures,
            kafka_errors=self._kafka_errors,
            commit_failures=self._commit_failures,
            assigned=tuple(sorted(self._assigned)),
            paused=tuple(sorted(self._paused)),
            committed=self._commits.committed(),
            backpressure=self._pauses.backpressure,
            high_watermarks=self._high_watermarks(),
        )

    def _on_statistics(self, document: str) -> None:
        # librdkafka calls this from inside a poll, on this actor's thread, once a second.
        try:
            statistics = json.loads(document)
        except ValueError:
            logger.debug("unreadable librdkafka statistics: %.200s", document)
            return
        self._silence.observe(statistics)

    def _report_silence(self) -> None:
        """Log when Kafka turns silent and when it answers again. Checked every slice, not
        only when statistics arrive: a hung Kafka can hold those up too."""
        answering = self._silence.answering()
        if answering == self._answering:
            return
        self._answering = answering
        if answering:
            logger.info(
                "Kafka %s answers again; consuming resumes once it assigns the partitions",
                self._config.bootstrap_servers,
            )
        else:
            logger.warning(
                "Kafka %s has not answered for %.0f s: serving the tasks this broker holds; "
                "nothing new is consumed and no offset is committed until it answers",
                self._config.bootstrap_servers,
                self._silence.silent_s(),
            )

    def _high_watermarks(self) -> dict[Partition, int]:
        marks: dict[Partition, int] = {}
        for partition in sorted(self._assigned):
            try:
                # cached: as of the last fetch, read from the client without a round trip.
                offsets = self._consumer.get_watermark_offsets(
                    TopicPartition(self._config.topic, partition), cached=True
                )
            except KafkaException as exc:
                logger.debug("no watermark for %s/%d: %s", self._config.topic, partition, exc)
                continue
            if offsets is not None and offsets[1] >= 0:  # negative: not fetched yet
                marks[partition] = int(offsets[1])
        return marks


def _describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


def _log_client_error(bootstrap_servers: str, error: KafkaError) -> None:
    # Connection trouble shows here long before a poll fails. librdkafka's words for a Kafka
    # that is not there ("1/1 brokers are down") are rephrased for whoever started us with
    # a wrong address; _client_log's filter repeats it every 30 s, with a count.
    if error.code() == KafkaError._ALL_BROKERS_DOWN:
        _client_log.warning(
            "no Kafka answers at %s (the bootstrap servers): nothing is consumed until one does",
            bootstrap_servers,
        )
        return
    _client_log.warning("kafka consumer: %s", _describe(error))
