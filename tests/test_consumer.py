"""The Kafka consumer: its plain logic without threads, then the actor against the
embedded Kafka with the real state actor and, where durability is the point, the real
SQLite writer.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pykka
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from actors.activation import encode_activation
from actors.consumer import (
    DECODE_ERROR_HEADER,
    SOURCE_OFFSET_HEADER,
    BatchLimits,
    CommitTracker,
    ConsumerConfig,
    IngestBatch,
    KafkaConsumer,
    PauseState,
    without_partitions,
)
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import ConfigError, MailboxFull
from actors.messages import (
    Claim,
    Connect,
    ConsumerStats,
    ConsumerStatsQuery,
    Flush,
    FlushDone,
    FlushFailed,
    Ingest,
    IngestBackpressure,
    Persisted,
    StateStats,
    Stats,
    WorkBatch,
)
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.records import KafkaOffset, Offset, Partition, Status
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.statemachine import Limits
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.writer import SqliteWriter, WriterConfig
from tests.factories import make_record
from tests.kafka_support import read_messages, read_values
from tests.recipients import Collector

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

_log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
# A group join takes half the session timeout on Tansu before the first fetch.
JOIN_TIMEOUT_S = 20.0
# For the rebalance tests: a join then waits 0.5 s. At 300 ms sessions timed out between
# heartbeats on this machine and members kept rejoining.
SHORT_SESSION_MS = 1_000


# --- Plain logic, no threads ---------------------------------------------------------


def test_batch_is_full_by_count_or_bytes_and_take_starts_it_over() -> None:
    batch = IngestBatch(BatchLimits(max_len=3, max_bytes=100))
    assert batch.empty
    batch.add_record(make_record("a", partition=Partition(0), offset=Offset(7)))
    batch.add_record(make_record("b", partition=Partition(0), offset=Offset(8)))
    assert not batch.full
    batch.add_record(make_record("c", partition=Partition(1), offset=Offset(3)))
    assert batch.full

    ingest = batch.take()
    assert [r.id for r in ingest.records] == ["a", "b", "c"]
    assert ingest.offsets == (
        KafkaOffset(Partition(0), Offset(8)),
        KafkaOffset(Partition(1), Offset(3)),
    )
    assert batch.empty
    assert not batch.full

    batch.add_record(make_record("big", activation=b"x" * 100))
    assert batch.full


def test_batch_carries_the_offsets_of_skipped_messages() -> None:
    batch = IngestBatch(BatchLimits())
    batch.add_skipped(Partition(3), Offset(0))
    assert not batch.empty  # a batch of skipped messages alone still goes
    batch.add_record(make_record("a", partition=Partition(2), offset=Offset(4)))
    batch.add_skipped(Partition(2), Offset(5))
    ingest = batch.take()
    assert [r.id for r in ingest.records] == ["a"]
    assert ingest.offsets == (
        KafkaOffset(Partition(2), Offset(5)),
        KafkaOffset(Partition(3), Offset(0)),
    )
    assert batch.empty


def test_commit_tracker_offers_durable_offsets_once_and_again_after_a_failure() -> None:
    tracker = CommitTracker()
    p0, p1 = Partition(0), Partition(1)
    tracker.read_at(p0, Offset(0))
    tracker.read_at(p1, Offset(0))
    assert tracker.uncommitted([p0, p1]) == {}
    tracker.persisted([KafkaOffset(p0, Offset(9)), KafkaOffset(p1, Offset(4))])
    tracker.persisted([KafkaOffset(p0, Offset(7))])  # an older report never moves back
    assert tracker.uncommitted([p0]) == {p0: 9}  # only the partitions asked about

    tracker.committing({p0: Offset(9), p1: Offset(4)})
    assert tracker.uncommitted([p0, p1]) == {}
    assert tracker.committed() == {p0: 10, p1: 5}  # Kafka counts the next offset

    tracker.commit_failed(p1, Offset(4))
    assert tracker.uncommitted([p0, p1]) == {p1: 4}
    tracker.persisted([KafkaOffset(p0, Offset(12))])
    tracker.committing({p0: Offset(12)})
    tracker.commit_failed(p0, Offset(9))  # superseded by the later commit
    assert tracker.uncommitted([p0]) == {}

    tracker.forget([p0, p1])
    assert tracker.uncommitted([p0, p1]) == {}
    assert tracker.committed() == {}


def test_commit_tracker_leaves_to_the_next_owner_what_an_earlier_ownership_reports() -> None:
    tracker = CommitTracker()
    p0 = Partition(0)
    tracker.read_at(p0, Offset(10))
    tracker.read_at(p0, Offset(30))  # ownership starts at the first read, not the latest
    tracker.persisted([KafkaOffset(p0, Offset(20))])
    tracker.committing({p0: Offset(20)})
    # Sent but unanswered: a revoke must commit it again, synchronously.
    assert tracker.uncommitted([p0]) == {}
    assert tracker.unacknowledged([p0]) == {p0: 20}
    tracker.acknowledged(p0, Offset(20))
    assert tracker.unacknowledged([p0]) == {}

    tracker.forget([p0])
    # Revoked: a flush that ends late, or Kafka's answer to an old commit, is not ours.
    tracker.persisted([KafkaOffset(p0, Offset(25))])
    tracker.acknowledged(p0, Offset(25))
    assert tracker.uncommitted([p0]) == {}
    # Assigned again after another member read on to 40: an older report would rewind it.
    tracker.read_at(p0, Offset(41))
    tracker.persisted([KafkaOffset(p0, Offset(25))])
    assert tracker.unacknowledged([p0]) == {}
    tracker.persisted([KafkaOffset(p0, Offset(41))])
    assert tracker.unacknowledged([p0]) == {p0: 41}


def test_what_was_read_of_a_partition_that_left_is_dropped_before_the_state_has_it() -> None:
    batch = IngestBatch(BatchLimits(max_len=2))
    batch.add_record(make_record("a", partition=Partition(0), offset=Offset(1)))
    batch.add_record(make_record("b", partition=Partition(1), offset=Offset(1)))
    batch.add_skipped(Partition(1), Offset(2))
    assert batch.full
    batch.drop({Partition(1)})
    assert not batch.full
    ingest = batch.take()
    assert [r.id for r in ingest.records] == ["a"]
    assert ingest.offsets == (KafkaOffset(Partition(0), Offset(1)),)

    assert without_partitions(ingest, {Partition(1)}) == ingest
    assert without_partitions(ingest, {Partition(0)}) is None
    skipped_only = Ingest((), (KafkaOffset(Partition(2), Offset(5)),))
    assert without_partitions(skipped_only, {Partition(0)}) == skipped_only


def test_pause_state_pauses_all_under_backpressure_and_one_partition_on_hold() -> None:
    pauses = PauseState()
    assigned = [Partition(0), Partition(1), Partition(2)]
    assert pauses.paused(assigned) == set()

    pauses.hold(Partition(1), Offset(40), retry_at=100.0)
    assert pauses.paused(assigned) == {1}
    assert pauses.held(Partition(1), Offset(40))
    assert pauses.held(Partition(1), Offset(41))
    assert not pauses.held(Partition(1), Offset(39))
    assert not pauses.held(Partition(0), Offset(40))

    pauses.backpressure = True
    assert pauses.paused(assigned) == {0, 1, 2}
    pauses.backpressure = False
    pauses.ingest_blocked = True
    assert pauses.paused(assigned) == {0, 1, 2}
    pauses.ingest_blocked = False

    assert pauses.release_due(now=99.0) == []
    assert pauses.release_due(now=100.0) == [1]
    assert pauses.paused(assigned) == set()


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"bootstrap_servers": ""}, "consumer.bootstrap_servers"),
        ({"dlq_topic": "taskworker"}, "consumer.dlq_topic"),
        ({"poll_slice_ms": 0}, "consumer.poll_slice_ms"),
        ({"auto_offset_reset": "newest"}, "consumer.auto_offset_reset"),
        ({"max_delayed_task_allowed_s": -1}, "consumer.max_delayed_task_allowed_s"),
    ],
)
def test_config_names_the_invalid_key(fields: dict[str, Any], key: str) -> None:
    values: dict[str, Any] = {"bootstrap_servers": "127.0.0.1:9092", **fields}
    with pytest.raises(ConfigError, match=re.escape(key)):
        ConsumerConfig(**values)
    with pytest.raises(ConfigError, match=r"consumer\.batch\.max_len"):
        BatchLimits(max_len=0)


def test_client_settings_leave_every_commit_to_the_consumer() -> None:
    settings = ConsumerConfig(bootstrap_servers="127.0.0.1:9092").client_settings()
    assert settings["enable.auto.commit"] is False
    assert settings["enable.auto.offset.store"] is False
    assert settings["session.timeout.ms"] == 6000
    assert settings["auto.offset.reset"] == "latest"
    assert settings["fetch.wait.max.ms"] == 50
    assert "cooperative" not in str(settings["partition.assignment.strategy"])


# --- The actor against the embedded Kafka ---------------------------------------------


@dataclass
class Pipeline:
    """The actors of one test, built as the supervisor would wire them."""

    kafka: EmbeddedKafka
    topic: str
    dlq_topic: str
    group: str
    tmp_path: Path
    state: pykka.ActorRef[StateActor] | None = None

    def start_state(self, limits: Limits | None = None) -> pykka.ActorRef[StateActor]:
        config = StateConfig(limits=limits or Limits(), flush_interval_ms=20)
        self.state = StateActor.start(config, MailboxConfig(size=1000))
        return self.state

    def start_consumer(
        self,
        dead_letters: KafkaProducer | None = None,
        state: Collector | None = None,
        **fields: Any,
    ) -> pykka.ActorRef[KafkaConsumer]:
        """A consumer of this pipeline's state actor, or of `state` standing in for it."""
        values: dict[str, Any] = {
            "bootstrap_servers": self.kafka.bootstrap,
            "topic": self.topic,
            "dlq_topic": self.dlq_topic,
            "group_id": self.group,
            "auto_offset_reset": "earliest",
            "batch": BatchLimits(max_len=64),
            **fields,
        }
        if dead_letters is None:
            dead_letters = KafkaProducer(ProducerConfig(bootstrap_servers=self.kafka.bootstrap))
        target = state if state is not None else self.state
        assert target is not None
        consumer = KafkaConsumer.start(
            ConsumerConfig(**values), target, dead_letters, mailbox=MailboxConfig(size=1000)
        )
        if isinstance(target, pykka.ActorRef):
            target.tell(Connect(consumer=consumer))
        return consumer

    def start_writer(self, consumer: pykka.ActorRef[KafkaConsumer]) -> None:
        assert self.state is not None
        writer = SqliteWriter.start(
            WriterConfig(db_path=self.tmp_path / "broker.sqlite"),
            self.state,
            mailbox=MailboxConfig(size=1000),
            persisted_listener=consumer,
        )
        self.state.tell(Connect(writer=writer))


@pytest.fixture
def pipeline(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> Iterator[Callable[[int], Pipeline]]:
    def create(partitions: int) -> Pipeline:
        topic, dlq_topic = kafka_topics(partitions)
        return Pipeline(kafka, topic, dlq_topic, f"group-{uuid.uuid4().hex[:8]}", tmp_path)

    yield create
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


def produce(kafka: EmbeddedKafka, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    try:
        messages = [OutgoingMessage(str(i), topic, value) for i, value in enumerate(values)]
        report = producer.produce_many(messages, timeout_s=TIMEOUT_S)
    finally:
        producer.close(timeout_s=TIMEOUT_S)
    assert report.all_acknowledged, report.failed


def activations(count: int, prefix: str) -> tuple[list[str], list[bytes]]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    return ids, [encode_activation(activation_id=i, namespace="ns", args=[i]) for i in ids]


def ask(actor: pykka.ActorRef[Any], message: object) -> Any:
    return actor.ask(message, block=True, timeout=TIMEOUT_S)


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float = TIMEOUT_S,
    describe: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in time: {describe()}"
        time.sleep(0.05)


def pending(state: pykka.ActorRef[StateActor]) -> int:
    stats: StateStats = ask(state, Stats())
    return stats.by_status.get(Status.PENDING, 0)


def consumer_stats(consumer: pykka.ActorRef[KafkaConsumer]) -> ConsumerStats:
    stats: ConsumerStats = ask(consumer, ConsumerStatsQuery())
    return stats


def group_offsets(kafka: EmbeddedKafka, group: str, topic: str, partitions: int) -> list[int]:
    """What the group committed per partition, read by a client outside it (-1001: none)."""
    reader = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group}, logger=_log)
    try:
        found = reader.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=TIMEOUT_S
        )
    finally:
        reader.close()
    return [tp.offset for tp in sorted(found, key=lambda tp: tp.partition)]


def end_offsets(kafka: EmbeddedKafka, topic: str, partitions: int, count: int) -> list[int]:
    """Each partition's last offset + 1, found by reading all `count` messages of `topic`:
    Tansu's high watermark counts record batches, not records."""
    ends = [0] * partitions
    for message in read_messages(kafka.bootstrap, topic, count, partitions):
        partition, offset = message.partition(), message.offset()
        assert partition is not None
        assert offset is not None
        ends[partition] = max(ends[partition], offset + 1)
    return ends


@pytest.mark.kafka
def test_offsets_are_committed_only_after_persistence_and_redelivery_is_deduplicated(
    pipeline: Callable[[int], Pipeline],
) -> None:
    pipe = pipeline(3)
    ids, values = activations(300, "a")
    produce(pipe.kafka, pipe.topic, values)
    state = pipe.start_state()
    never_answers = Collector()
    state.tell(Connect(writer=never_answers))
    first = pipe.start_consumer()

    wait_until(lambda: consumer_stats(first).ingested == 300, JOIN_TIMEOUT_S)
    assert pending(state) == 300
    flush: Flush = never_answers.wait_for(Flush)[0]
    time.sleep(0.3)  # room for a wrong commit to show
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 3) == [-1001] * 3

    # Killed before the flush: the group's next consumer reads everything again and the
    # state keeps one record per id.
    first.stop(timeout=TIMEOUT_S)
    second = pipe.start_consumer()
    wait_until(lambda: consumer_stats(second).ingested == 300, JOIN_TIMEOUT_S)
    assert pending(state) == 300
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 3) == [-1001] * 3

    # The real writer makes the batch durable; then, and only then, the offsets go.
    pipe.start_writer(second)
    state.tell(FlushFailed(flush.seq, "the collector never wrote it"))
    ends = end_offsets(pipe.kafka, pipe.topic, 3, 300)
    assert sum(ends) == 300
    # A partition the producer left empty has nothing to commit (-1001: no offset).
    expected = [end or -1001 for end in ends]
    wait_until(
        lambda: group_offsets(pipe.kafka, pipe.group, pipe.topic, 3) == expected,
        describe=lambda: (
            group_offsets(pipe.kafka, pipe.group, pipe.topic, 3),
            ends,
            consumer_stats(second),
            ask(state, Stats()),
        ),
    )
    assert consumer_stats(second).committed == {p: end for p, end in enumerate(ends) if end}

    claimed = [ask(state, Claim()) for _ in range(301)]
    assert claimed[-1] is None
    assert sorted(claimed[:-1]) == sorted(values)
    assert len(set(ids)) == 300


@pytest.mark.kafka
def test_a_poll_that_reads_past_the_limits_sends_several_ingests_at_once(
    pipeline: Callable[[int], Pipeline],
) -> None:
    pipe = pipeline(1)
    ids, values = activations(10, "s")
    produce(pipe.kafka, pipe.topic, values)
    state = Collector()
    consumer = KafkaConsumer.start(
        ConsumerConfig(
            bootstrap_servers=pipe.kafka.bootstrap,
            topic=pipe.topic,
            dlq_topic=pipe.dlq_topic,
            group_id=pipe.group,
            auto_offset_reset="earliest",
            batch=BatchLimits(max_len=4),
        ),
        state,
        KafkaProducer(ProducerConfig(bootstrap_servers=pipe.kafka.bootstrap)),
        mailbox=MailboxConfig(size=1000),
    )
    wait_until(lambda: consumer_stats(consumer).ingested == 10, JOIN_TIMEOUT_S)
    ingests: list[Ingest] = [m for m in state.messages if isinstance(m, Ingest)]
    sizes = [len(ingest.records) for ingest in ingests]
    # One produce, one fetch: the slice that reads it splits it rather than holding any.
    assert sizes == [4, 4, 2]
    assert [r.id for ingest in ingests for r in ingest.records] == ids
    assert [ingest.offsets for ingest in ingests] == [
        (KafkaOffset(Partition(0), Offset(3)),),
        (KafkaOffset(Partition(0), Offset(7)),),
        (KafkaOffset(Partition(0), Offset(9)),),
    ]
    assert consumer_stats(consumer).batches == 3


@pytest.mark.kafka
def test_undecodable_messages_are_dead_lettered_and_do_not_block_the_rest(
    pipeline: Callable[[int], Pipeline],
) -> None:
    pipe = pipeline(1)
    garbage = os.urandom(64) + b"\xff\xff\xff"
    no_namespace = encode_activation(activation_id="nameless", namespace="")
    good_ids, good = activations(3, "g")
    produce(pipe.kafka, pipe.topic, [good[0], garbage, no_namespace, good[1], good[2]])
    state = pipe.start_state()
    consumer = pipe.start_consumer()
    pipe.start_writer(consumer)

    wait_until(lambda: consumer_stats(consumer).ingested == 3, JOIN_TIMEOUT_S)
    assert pending(state) == 3
    stats = consumer_stats(consumer)
    assert stats.consumed == 5
    assert stats.dead_lettered == 2
    assert stats.decode_failures == {"not a TaskActivation": 1, "missing namespace": 1}

    dead = read_values(pipe.kafka.bootstrap, pipe.dlq_topic, 2)
    assert [value for value, _ in dead] == [garbage, no_namespace]
    headers = [dict(h) for _, h in dead]
    assert [h[DECODE_ERROR_HEADER] for h in headers] == [
        b"not a TaskActivation",
        b"missing namespace",
    ]
    assert [h[SOURCE_OFFSET_HEADER] for h in headers] == [b"1", b"2"]
    # Dead letters are committed with the batch around them.
    wait_until(lambda: group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [5])
    assert sorted(ask(state, Claim()) for _ in range(3)) == sorted(good)
    assert len(good_ids) == 3


@pytest.mark.kafka
def test_a_dead_letter_kafka_did_not_take_holds_its_partition(
    pipeline: Callable[[int], Pipeline],
) -> None:
    pipe = pipeline(1)
    _, good = activations(2, "h")
    produce(pipe.kafka, pipe.topic, [good[0], b"\xff not an activation", good[1]])
    state = pipe.start_state()
    nowhere = KafkaProducer(
        ProducerConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", delivery_timeout_ms=200)
    )
    consumer = pipe.start_consumer(
        dead_letters=nowhere, dlq_timeout_ms=200, dlq_retry_backoff_ms=300
    )
    pipe.start_writer(consumer)

    wait_until(lambda: consumer_stats(consumer).dead_letter_failures >= 3, JOIN_TIMEOUT_S)
    stats = consumer_stats(consumer)
    assert stats.ingested == 1  # the message behind the dead letter waits with it
    assert pending(state) == 1
    # Only the offset before the dead letter is ever committed.
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1]


@pytest.mark.kafka
def test_consumption_pauses_at_the_pending_limit_and_resumes_after_claims(
    pipeline: Callable[[int], Pipeline],
) -> None:
    pipe = pipeline(1)
    first, later, limit = 600, 200, 100
    _, values = activations(first, "p")
    produce(pipe.kafka, pipe.topic, values)
    state = pipe.start_state(Limits(max_pending_count=limit))
    consumer = pipe.start_consumer(batch=BatchLimits(max_len=5), poll_max_messages=5)
    pipe.start_writer(consumer)

    wait_until(lambda: consumer_stats(consumer).paused == (0,), JOIN_TIMEOUT_S)
    # Batches read before the pause reached the consumer still arrive, so the count
    # overshoots the limit (how far depends on thread scheduling); then it must stay put,
    # even with new messages waiting on the paused partition.
    _, more = activations(later, "q")
    produce(pipe.kafka, pipe.topic, more)
    held_back = pending(state)
    time.sleep(0.5)  # a consumer that ignored the pause would read the new ones meanwhile
    assert pending(state) == held_back
    assert limit <= held_back <= first
    assert consumer_stats(consumer).backpressure

    total = first + later
    claimed = 0
    deadline = time.monotonic() + JOIN_TIMEOUT_S  # each resume waits for a new fetch
    while claimed < total:
        assert time.monotonic() < deadline, f"only {claimed} of {total} claimed"
        answers = ask(state, WorkBatch((Claim(),) * 50))
        claimed += sum(answer is not None for answer in answers)
        time.sleep(0.01)
    wait_until(lambda: consumer_stats(consumer).paused == ())
    assert consumer_stats(consumer).ingested == total


@pytest.mark.kafka
def test_a_rebalance_rereads_nothing_durable_and_records_stay_with_their_broker(
    pipeline: Callable[[int], Pipeline], tmp_path: Path
) -> None:
    first = pipeline(2)
    (tmp_path / "second").mkdir()
    second = Pipeline(first.kafka, first.topic, first.dlq_topic, first.group, tmp_path / "second")
    old_ids, old_values = activations(100, "old")
    produce(first.kafka, first.topic, old_values)
    first_state = first.start_state()
    first_consumer = first.start_consumer(session_timeout_ms=SHORT_SESSION_MS)
    first.start_writer(first_consumer)
    ends = end_offsets(first.kafka, first.topic, 2, 100)
    wait_until(
        lambda: consumer_stats(first_consumer).committed == dict(enumerate(ends)), JOIN_TIMEOUT_S
    )

    # A second broker joins the group: each ends with one partition, and the first one's
    # records stay with it (its SQLite file is its own).
    second_state = second.start_state()
    second_consumer = second.start_consumer(session_timeout_ms=SHORT_SESSION_MS)
    second.start_writer(second_consumer)
    wait_until(
        lambda: (
            len(consumer_stats(first_consumer).assigned) == 1
            and len(consumer_stats(second_consumer).assigned) == 1
        ),
        JOIN_TIMEOUT_S * 2,
        describe=lambda: (consumer_stats(first_consumer), consumer_stats(second_consumer)),
    )
    new_ids, new_values = activations(100, "new")
    produce(first.kafka, first.topic, new_values)

    def ids_in(state: pykka.ActorRef[StateActor]) -> list[str]:
        claimed = []
        while (value := ask(state, Claim())) is not None:
            claimed.append(pb.TaskActivation.FromString(value).id)
        return claimed

    wait_until(
        lambda: (
            consumer_stats(first_consumer).ingested + consumer_stats(second_consumer).ingested
            >= 200
        ),
        JOIN_TIMEOUT_S,
    )
    first_ids, second_ids = ids_in(first_state), ids_in(second_state)
    assert set(old_ids) <= set(first_ids), "records left with their partition"
    assert not set(second_ids) & set(old_ids), "a durable, committed activation was read again"
    assert sorted(first_ids + second_ids) == sorted(old_ids + new_ids)
    assert second_ids, "the new member got no partition"


# --- Revokes: a second member of the group takes the partition ----------------------


class NewOwner:
    """A second member of a pipeline's group: a plain client the test polls. Its client id
    sorts before the broker's, and member ids start with the client id, so the range
    assignor gives it partition 0."""

    def __init__(self, pipe: Pipeline) -> None:
        self.assigned: list[int] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": pipe.kafka.bootstrap,
                "group.id": pipe.group,
                "client.id": "a-new-owner",
                "session.timeout.ms": SHORT_SESSION_MS,
                "heartbeat.interval.ms": SHORT_SESSION_MS // 3,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "partition.assignment.strategy": "range,roundrobin",
            },
            logger=_log,
        )
        self._consumer.subscribe([pipe.topic], on_assign=self._on_assign)
        self._read: list[Message] = []

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = [tp.partition for tp in partitions]

    def join(self) -> None:
        """Poll until the group gave this member partition 0: the broker's revoke, and its
        commit, are done by then (eager assignors revoke before they assign)."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while self.assigned != [0]:
            assert time.monotonic() < deadline, "the new owner got no partition"
            self._poll()

    def read(self, count: int) -> list[Message]:
        """The first `count` messages this member read, from where the group committed."""
        deadline = time.monotonic() + TIMEOUT_S
        while len(self._read) < count:
            assert time.monotonic() < deadline, f"read only {len(self._read)} of {count}"
            self._poll()
        return self._read[:count]

    def close(self) -> None:
        """Leave the group, so partition 0 goes back to the broker."""
        self._consumer.close()

    def _poll(self) -> None:
        message = self._consumer.poll(0.05)
        if message is not None:
            assert message.error() is None, message.error()
            self._read.append(message)


@pytest.fixture
def new_owner() -> Iterator[Callable[[Pipeline], NewOwner]]:
    owners: list[NewOwner] = []

    def create(pipe: Pipeline) -> NewOwner:
        owners.append(NewOwner(pipe))
        return owners[-1]

    yield create
    for owner in owners:
        owner.close()


class RefusingState(Collector):
    """A state whose mailbox is full for `Ingest` while `refusing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = False

    def tell(self, message: object) -> None:
        if self.refusing and isinstance(message, Ingest):
            raise MailboxFull("the test's state refuses ingests")
        super().tell(message)

    def ingested_ids(self) -> list[str]:
        return [r.id for m in self.messages if isinstance(m, Ingest) for r in m.records]


def positions(messages: list[Message]) -> list[int | None]:
    return [message.offset() for message in messages]


def complete(
    flush: Flush, state: pykka.ActorRef[StateActor], consumer: pykka.ActorRef[KafkaConsumer]
) -> None:
    """Answer `flush` as the writer does once it is durable."""
    consumer.tell(Persisted(flush.offsets))
    state.tell(FlushDone(flush.seq))


@pytest.mark.kafka
def test_a_revoke_during_a_flush_commits_what_is_durable_and_nothing_after(
    pipeline: Callable[[int], Pipeline], new_owner: Callable[[Pipeline], NewOwner]
) -> None:
    pipe = pipeline(1)
    state = pipe.start_state()
    writer = Collector()  # answers only when the test says so
    state.tell(Connect(writer=writer))
    consumer = pipe.start_consumer(session_timeout_ms=SHORT_SESSION_MS)
    ids, values = activations(15, "r")
    produce(pipe.kafka, pipe.topic, values[:1])
    wait_until(lambda: consumer_stats(consumer).ingested == 1, JOIN_TIMEOUT_S)
    complete(writer.wait_for(Flush)[0], state, consumer)
    wait_until(lambda: group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1])

    produce(pipe.kafka, pipe.topic, values[1:10])
    wait_until(lambda: consumer_stats(consumer).ingested == 10)
    in_flight: Flush = writer.wait_for(Flush, 2)[1]
    owner = new_owner(pipe)
    owner.join()

    # The revoke committed what was durable and not the flush still in flight.
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1]
    stats = consumer_stats(consumer)
    assert (stats.assigned, stats.paused, stats.committed) == ((), (), {})
    # The flush ends after the revoke: its offsets are the new owner's to commit.
    complete(in_flight, state, consumer)
    assert consumer_stats(consumer).committed == {}
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1]

    # The new owner starts at the commit and reads the records in flight again (they
    # run twice: the cost of a revoke); the broker reads nothing more and keeps its own.
    produce(pipe.kafka, pipe.topic, values[10:])
    read = owner.read(14)
    assert positions(read) == list(range(1, 15))
    assert [m.value() for m in read] == values[1:]
    assert consumer_stats(consumer).ingested == 10
    assert pending(state) == 10
    assert len(ids) == 15


@pytest.mark.kafka
def test_a_revoke_drops_a_refused_ingest_and_its_pause(
    pipeline: Callable[[int], Pipeline], new_owner: Callable[[Pipeline], NewOwner]
) -> None:
    pipe = pipeline(1)
    state = RefusingState()
    consumer = pipe.start_consumer(state=state, session_timeout_ms=SHORT_SESSION_MS)
    ids, values = activations(5, "b")
    produce(pipe.kafka, pipe.topic, values[:1])
    wait_until(lambda: consumer_stats(consumer).ingested == 1, JOIN_TIMEOUT_S)
    consumer.tell(Persisted((KafkaOffset(Partition(0), Offset(0)),)))
    wait_until(lambda: group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1])

    state.refusing = True
    produce(pipe.kafka, pipe.topic, values[1:])
    wait_until(lambda: consumer_stats(consumer).paused == (0,))
    assert consumer_stats(consumer).consumed == 5
    owner = new_owner(pipe)
    owner.join()
    stats = consumer_stats(consumer)
    assert (stats.assigned, stats.paused) == ((), ())
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1]
    assert positions(owner.read(4)) == [1, 2, 3, 4]

    # The refused Ingest is not handed over once the state takes ingests again: its
    # partition is the new owner's. Backpressure, though, is the state's and outlasts it.
    state.refusing = False
    consumer.tell(IngestBackpressure(pause=True))
    time.sleep(0.3)  # room for a stale Ingest to arrive
    assert state.ingested_ids() == ids[:1]

    # Back with the broker, the partition is paused for the backpressure only: once the
    # state resumes, the broker reads it from the commit and hands each record over once.
    owner.close()
    wait_until(lambda: consumer_stats(consumer).assigned == (0,), JOIN_TIMEOUT_S)
    assert consumer_stats(consumer).paused == (0,)
    consumer.tell(IngestBackpressure(pause=False))
    wait_until(lambda: consumer_stats(consumer).ingested == 5)
    assert consumer_stats(consumer).paused == ()
    assert state.ingested_ids() == ids


@pytest.mark.kafka
def test_a_revoke_drops_the_hold_of_an_undelivered_dead_letter_and_commits_before_it(
    pipeline: Callable[[int], Pipeline], new_owner: Callable[[Pipeline], NewOwner]
) -> None:
    pipe = pipeline(1)
    _, good = activations(2, "d")
    bad = b"\xff not an activation"
    produce(pipe.kafka, pipe.topic, [good[0], bad, good[1]])
    pipe.start_state()
    nowhere = KafkaProducer(
        ProducerConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", delivery_timeout_ms=200)
    )
    consumer = pipe.start_consumer(
        dead_letters=nowhere,
        dlq_timeout_ms=200,
        dlq_retry_backoff_ms=60_000,
        session_timeout_ms=SHORT_SESSION_MS,
    )
    pipe.start_writer(consumer)
    wait_until(lambda: consumer_stats(consumer).dead_letter_failures == 1, JOIN_TIMEOUT_S)
    wait_until(lambda: group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1])
    assert consumer_stats(consumer).paused == (0,)

    owner = new_owner(pipe)
    owner.join()
    stats = consumer_stats(consumer)
    assert (stats.assigned, stats.paused, stats.ingested) == ((), (), 1)
    assert group_offsets(pipe.kafka, pipe.group, pipe.topic, 1) == [1]
    # The new owner reads the message whose dead letter Kafka never took, and what it held.
    read = owner.read(2)
    assert positions(read) == [1, 2]
    assert [m.value() for m in read] == [bad, good[1]]
    assert consumer_stats(consumer).dead_letter_failures == 1
