"""`taskbroker produce` against the embedded Kafka: what it writes is what the broker reads."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgpack
import pytest

from actors.activation import decode_record
from actors.cli import ActivationSpec, kafka_answers, main, produce_activations
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.producer import KafkaProducer, ProducerConfig
from actors.records import OnAttemptsExceeded, Status
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from tests.kafka_support import read_messages

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

_log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


def read_values(kafka: EmbeddedKafka, topic: str, partitions: int, count: int) -> list[bytes]:
    found = read_messages(kafka.bootstrap, topic, count + 1, partitions, timeout_s=TIMEOUT_S)
    assert len(found) <= count, "more messages than produced"
    return [value for message in found if (value := message.value()) is not None]


@pytest.mark.kafka
def test_produce_writes_readable_activations(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    topic, _ = kafka_topics(partitions=2)
    exit_code = main(
        [
            "produce",
            "--count", "40",
            "--namespace", "demo",
            "--taskname", "demo.add",
            "--application", "myapp",
            "--delay", "30",
            "--expires", "600",
            "--at-most-once",
            "--max-attempts", "4",
            "--deadletter",
            "--processing-deadline", "20",
            "--param-bytes", "300",
            "--kafka", kafka.bootstrap,
            "--topic", topic,
        ]
    )  # fmt: skip
    assert exit_code == 0
    assert "40 of 40 activations acknowledged" in capsys.readouterr().out

    values = read_values(kafka, topic, partitions=2, count=40)
    assert len(values) == 40
    now = time.time()
    records = [decode_record(v, 0, n, now, max_delay_s=3600) for n, v in enumerate(values)]
    assert len({r.id for r in records}) == 40
    record = records[0]
    assert (record.application, record.namespace, record.taskname) == ("myapp", "demo", "demo.add")
    assert record.status is Status.DELAY
    assert record.delay_until is not None
    assert record.delay_until - record.received_at == pytest.approx(30)
    assert record.expires_at is not None
    assert record.expires_at - record.received_at == pytest.approx(600)
    assert record.at_most_once
    assert record.max_attempts == 4
    assert record.on_attempts_exceeded is OnAttemptsExceeded.DEADLETTER
    assert record.processing_deadline_duration_s == 20
    parameters = msgpack.unpackb(pb.TaskActivation.FromString(values[0]).parameters_bytes)
    assert parameters["args"] == []
    assert len(parameters["kwargs"]["padding"]) == 300


@pytest.mark.kafka
def test_produce_defaults_make_a_plain_pending_activation(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory
) -> None:
    topic, _ = kafka_topics(partitions=1)
    argv = ["produce", "--count", "3", "--namespace", "n", "--taskname", "t"]
    assert main([*argv, "--kafka", kafka.bootstrap, "--topic", topic]) == 0
    values = read_values(kafka, topic, partitions=1, count=3)
    record = decode_record(values[0], 0, 0, time.time(), max_delay_s=3600)
    assert record.status is Status.PENDING
    assert (record.expires_at, record.at_most_once, record.max_attempts) == (None, False, 1)
    assert record.on_attempts_exceeded is OnAttemptsExceeded.DISCARD


def test_produce_with_no_kafka_says_so_at_once_and_where_run_starts_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    argv = ["produce", "--count", "5", "--namespace", "n", "--taskname", "t"]
    started = time.monotonic()
    assert main([*argv, "--kafka", nowhere]) == 1
    assert time.monotonic() - started < 5.0  # not the 30 s of --timeout
    captured = capsys.readouterr()
    assert f"no Kafka answers at {nowhere}" in captured.err
    assert "`taskbroker run` without --kafka starts one at 127.0.0.1:9092" in captured.err
    assert "Purged" not in captured.err
    assert captured.out == ""


@pytest.mark.kafka
def test_kafka_answers_only_where_a_kafka_listens(kafka: EmbeddedKafka) -> None:
    assert kafka_answers(kafka.bootstrap, timeout_s=5.0)
    assert not kafka_answers(f"127.0.0.1:{free_port()}", timeout_s=5.0)


def test_produce_activations_reports_what_kafka_did_not_acknowledge() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=nowhere, delivery_timeout_ms=500))
    try:
        outcome = produce_activations(producer, "t", ActivationSpec("n", "t"), 5, timeout_s=0.5)
    finally:
        producer.close(timeout_s=0.5)
    assert (outcome.acknowledged, outcome.failed) == (0, 5)
    assert outcome.first_failure is not None


def test_produce_rejects_invalid_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["produce", "--count", "0", "--namespace", "n", "--taskname", "t"])
    assert exited.value.code == 2
    assert "--count: must be at least 1" in capsys.readouterr().err
