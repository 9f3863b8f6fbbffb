"""Kafka failing under a running `taskbroker run`: what the broker promises while Kafka is
hung (SIGSTOP of the Kafka process: its sockets stay open and nothing answers), and after
it comes back (SIGCONT).

Each test has a Kafka of its own, started outside the broker, so that freezing it touches
no other test. Fault windows are a few seconds: past the consumer's session timeout
(6 s), which is when the broker calls Kafka unreachable, and past a few produce timeouts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.records import OnAttemptsExceeded, Status
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from tests.faults_support import (
    NAMESPACE,
    FaultBroker,
    Worker,
    broker_process,
    committed_offset,
    frozen,
    new_topics,
    produce,
)
from tests.kafka_support import read_messages
from tests.ops_support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SILENT = "Kafka has not answered for"
"""What /readyz says while Kafka is silent."""


@pytest.fixture
def kafka_to_freeze() -> Iterator[EmbeddedKafka]:
    """A Kafka of this test's own: the session's Kafka is never frozen."""
    with EmbeddedKafka(port=free_port()) as kafka:
        yield kafka


def test_a_hung_kafka_leaves_the_held_tasks_served_is_reported_and_consumption_resumes(
    kafka_to_freeze: EmbeddedKafka, tmp_path: Path
) -> None:
    kafka = kafka_to_freeze
    topics = new_topics(kafka)
    with broker_process(kafka, topics, tmp_path / "broker.sqlite", tmp_path) as broker:
        held = produce(kafka, topics.topic, 10, tag="held")
        wait_until(lambda: broker.held("pending") == 10, "the broker to hold the tasks")
        wait_until(lambda: committed_offset(kafka, topics) == 10, "their offsets committed")
        assert broker.readyz() == (200, "ready\n")
        assert broker.metric("taskbroker_kafka_reachable") == 1.0

        with frozen(kafka):
            wait_until(lambda: SILENT in broker.readyz()[1], "/readyz to name the silent Kafka")
            code, body = broker.readyz()
            # Still ready: pulled out of service, it could not hand out what it holds.
            assert code == 200, body
            assert broker.metric("taskbroker_kafka_reachable") == 0.0
            silence = broker.metric("taskbroker_kafka_silence_seconds")
            assert silence is not None
            assert silence >= 6.0
            headline = broker.status()["headline"]
            assert isinstance(headline, dict)
            assert headline["kafka_reachable"] is False
            # The lag needs the partition's end, which a silent Kafka does not tell.
            assert broker.metric("taskbroker_kafka_consumer_lag_messages", partition="0") is None

            with Worker(broker.grpc_target) as worker:
                wait_until(
                    lambda: worker.outcomes.completed() == set(held),
                    "the held tasks to be claimed and completed while Kafka is hung",
                )
            assert worker.outcomes.refused == []
            assert SILENT in broker.readyz()[1]

        wait_until(
            lambda: broker.metric("taskbroker_kafka_reachable") == 1.0,
            "the broker to hear from Kafka again",
        )
        # Produced after Kafka came back: only a consumer that resumed by itself gets them.
        fresh = produce(kafka, topics.topic, 5, tag="fresh")
        with Worker(broker.grpc_target) as worker:
            wait_until(
                lambda: worker.outcomes.completed() == set(fresh),
                "the tasks produced after the outage to be consumed and completed",
                timeout_s=60,
            )
        assert broker.readyz() == (200, "ready\n")
        wait_until(lambda: committed_offset(kafka, topics) == 15, "every offset committed")
        wait_until(lambda: broker.held("pending") == 0, "nothing left pending")
    log = broker.process.log
    assert f"Kafka {kafka.bootstrap} has not answered for" in log
    assert f"Kafka {kafka.bootstrap} answers again" in log


def _stored_statuses(db_path: Path) -> dict[str, Status]:
    """The broker's file read from outside (WAL: a reader does not block its writer)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT id, status FROM activations").fetchall()
    connection.close()
    return {task_id: Status(status) for task_id, status in rows}


# Each tick waits up to 3 s for Kafka's acknowledgement, three times as long as upkeep may
# go without a tick before the broker turns unready: a wait on Kafka must not count.
PRODUCE_SETTINGS = ("kafka_produce_timeout_ms=3000", "upkeep_unhealthy_interval_ms=1000")


def _concluded_while_kafka_is_hung(
    kafka: EmbeddedKafka,
    broker: FaultBroker,
    stub: pb_grpc.ConsumerServiceStub,
    db_path: Path,
    task_id: str,
    status: pb.TaskActivationStatus,
) -> None:
    """Claimed `task_id` gets `status` while Kafka is hung, so what must replace it cannot
    be produced: the record stays in memory and on disk, and the broker stays ready."""
    stays = Status(status)
    with frozen(kafka):
        stub.SetTaskStatus(pb.SetTaskStatusRequest(id=task_id, status=status), timeout=5)
        readiness: list[int] = []

        def failed_twice() -> bool:
            readiness.append(broker.readyz()[0])
            failed = broker.counter("taskbroker_upkeep_transitions", kind="produce_failed")
            return failed >= 2

        wait_until(failed_twice, "upkeep to fail to produce twice")
        assert set(readiness) == {200}, readiness
        assert broker.counter("taskbroker_upkeep_transitions", kind="produced") == 0
        # Not acknowledged, so not gone: in memory and on disk.
        wait_until(lambda: broker.held(stays.name.lower()) == 1, "the record held")
        wait_until(
            lambda: _stored_statuses(db_path) == {task_id: stays},
            f"the record stored as {stays.name}",
        )
        # The broker still answers workers (nothing pending: NOT_FOUND).
        with pytest.raises(grpc.RpcError) as nothing:
            stub.GetTask(pb.GetTaskRequest(namespace=NAMESPACE), timeout=5)
        assert nothing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_retry_kafka_does_not_acknowledge_stays_until_it_does_and_runs_once(
    kafka_to_freeze: EmbeddedKafka, tmp_path: Path
) -> None:
    kafka = kafka_to_freeze
    topics = new_topics(kafka)
    db_path = tmp_path / "broker.sqlite"
    with broker_process(kafka, topics, db_path, tmp_path, *PRODUCE_SETTINGS) as broker:
        [original] = produce(kafka, topics.topic, 1, tag="retried", max_attempts=3)
        with grpc.insecure_channel(broker.grpc_target) as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            assert _claim(stub).id == original
            _concluded_while_kafka_is_hung(
                kafka, broker, stub, db_path, original, pb.TASK_ACTIVATION_STATUS_RETRY
            )

            retry = _claim(stub, timeout_s=60)
            assert retry.id != original
            assert retry.retry_state.attempts == 1
            stub.SetTaskStatus(
                pb.SetTaskStatusRequest(id=retry.id, status=pb.TASK_ACTIVATION_STATUS_COMPLETE),
                timeout=5,
            )
            wait_until(lambda: _stored_statuses(db_path) == {}, "the original and its retry gone")
            assert broker.counter("taskbroker_upkeep_transitions", kind="produced") == 1
            # Ran once: no second copy of the retry is handed out.
            with pytest.raises(grpc.RpcError) as nothing:
                stub.GetTask(pb.GetTaskRequest(namespace=NAMESPACE), timeout=5)
            assert nothing.value.code() == grpc.StatusCode.NOT_FOUND
    copies = read_messages(kafka.bootstrap, topics.topic, 3, timeout_s=5)
    retry_copies = [m for m in copies if retry.id.encode() in (m.value() or b"")]
    # The produce that timed out while Kafka was hung can still land: Kafka read the request
    # when it woke and its answer went nowhere. That copy has the same id as the one
    # acknowledged later, and the broker ingested it only once (it ran once, above).
    assert 1 <= len(retry_copies) <= 2, f"{len(retry_copies)} copies of the retry in the topic"


def test_a_dead_letter_kafka_does_not_acknowledge_stays_until_it_does(
    kafka_to_freeze: EmbeddedKafka, tmp_path: Path
) -> None:
    kafka = kafka_to_freeze
    topics = new_topics(kafka)
    db_path = tmp_path / "broker.sqlite"
    with broker_process(kafka, topics, db_path, tmp_path, *PRODUCE_SETTINGS) as broker:
        [failed] = produce(
            kafka,
            topics.topic,
            1,
            tag="dead",
            on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER,
        )
        with grpc.insecure_channel(broker.grpc_target) as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            assert _claim(stub).id == failed
            _concluded_while_kafka_is_hung(
                kafka, broker, stub, db_path, failed, pb.TASK_ACTIVATION_STATUS_FAILURE
            )
        wait_until(
            lambda: _stored_statuses(db_path) == {},
            "the record gone once Kafka acknowledged its dead letter",
        )
        assert broker.counter("taskbroker_upkeep_transitions", kind="produced") == 1
    dead_letters = read_messages(kafka.bootstrap, topics.dlq, 2, timeout_s=5)
    # As with a retry, the produce that timed out may have landed as well.
    assert 1 <= len(dead_letters) <= 2, f"{len(dead_letters)} dead letters"
    for message in dead_letters:
        assert pb.TaskActivation.FromString(message.value() or b"").id == failed


def _claim(stub: pb_grpc.ConsumerServiceStub, timeout_s: float = 30) -> pb.TaskActivation:
    found: list[pb.TaskActivation] = []

    def claimed() -> bool:
        try:
            found.append(stub.GetTask(pb.GetTaskRequest(namespace=NAMESPACE), timeout=5).task)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    wait_until(claimed, "a task to claim", timeout_s=timeout_s)
    return found[0]


def test_the_retry_producer_acknowledges_again_after_kafka_hung_on_a_request(
    kafka_to_freeze: EmbeddedKafka,
) -> None:
    """The broker's own producer, not a new one: after a request timed out in flight, the
    idempotent librdkafka client is fenced for good, so the producer must replace it."""
    kafka = kafka_to_freeze
    topics = new_topics(kafka)
    producer = KafkaProducer(ProducerConfig(kafka.bootstrap, delivery_timeout_ms=1500))
    try:
        assert producer.produce_many(
            [OutgoingMessage("before", topics.topic, b"1")], 10
        ).acknowledged
        with frozen(kafka):
            # Past the delivery timeout, so librdkafka gives up on the request in flight.
            hung = producer.produce_many([OutgoingMessage("hung", topics.topic, b"2")], 3)
        assert hung.acknowledged == ()
        assert set(hung.failed) == {"hung"}
        acknowledged: list[str] = []

        def acknowledged_again() -> bool:
            n = len(acknowledged)
            report = producer.produce_many([OutgoingMessage(f"after-{n}", topics.topic, b"3")], 3)
            acknowledged.extend(report.acknowledged)
            return bool(report.acknowledged)

        # A batch already sent by the fenced client fails; the next goes through.
        wait_until(acknowledged_again, "a produce acknowledged after the hang", timeout_s=20)
    finally:
        producer.close(timeout_s=5)
