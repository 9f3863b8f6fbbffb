from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import ConfigError
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig, ProduceReport
from tests.kafka_support import read_messages, read_values

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

_log = logging.getLogger(__name__)


@pytest.fixture
def producer(kafka: EmbeddedKafka) -> Iterator[KafkaProducer]:
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    yield producer
    producer.close(timeout_s=5)


@pytest.fixture
def unreachable_bootstrap() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.mark.kafka
def test_every_message_is_acknowledged_and_lands_on_its_topic(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, producer: KafkaProducer
) -> None:
    topic, dlq_topic = kafka_topics(partitions=3)
    retries = [
        OutgoingMessage(f"retry-{i}", topic, f"activation {i}".encode(), (("n", str(i).encode()),))
        for i in range(20)
    ]
    dead_letter = OutgoingMessage("dead-1", dlq_topic, b"dead letter")

    report = producer.produce_many([*retries, dead_letter], timeout_s=10)

    assert report.all_acknowledged
    assert sorted(report.acknowledged) == sorted([m.key_id for m in retries] + ["dead-1"])
    received = read_values(kafka.bootstrap, topic, count=20, partitions=3)
    assert sorted(received) == sorted((m.value, list(m.headers)) for m in retries)
    assert read_values(kafka.bootstrap, dlq_topic, count=1, partitions=3) == [(b"dead letter", [])]


@pytest.mark.kafka
def test_keyed_messages_spread_over_the_partitions_by_key(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, producer: KafkaProducer
) -> None:
    topic, _ = kafka_topics(partitions=4)
    keyed = [OutgoingMessage(f"id-{i}", topic, b"v", key=f"id-{i}".encode()) for i in range(40)]
    assert producer.produce_many(keyed, timeout_s=10).all_acknowledged
    received = read_messages(kafka.bootstrap, topic, count=40, partitions=4)
    by_key: dict[bytes | None, set[int | None]] = {}
    for message in received:
        by_key.setdefault(message.key(), set()).add(message.partition())
    assert set(by_key) == {m.key for m in keyed}
    assert all(len(partitions) == 1 for partitions in by_key.values()), "a key moved"
    assert len(set().union(*by_key.values())) > 1, "every message on one partition"


@pytest.mark.kafka
def test_an_empty_batch_reports_nothing(producer: KafkaProducer) -> None:
    assert producer.produce_many([], timeout_s=1) == ProduceReport(acknowledged=(), failed={})


@pytest.mark.kafka
def test_a_message_kafka_refuses_is_reported_failed_beside_the_acknowledged(
    kafka_topics: TopicFactory, producer: KafkaProducer
) -> None:
    topic, _ = kafka_topics()
    too_large = OutgoingMessage("too-large", topic, b"x" * 2_000_000)

    report = producer.produce_many([OutgoingMessage("fine", topic, b"ok"), too_large], timeout_s=10)

    assert report.acknowledged == ("fine",)
    assert report.failed.keys() == {"too-large"}
    assert "MSG_SIZE_TOO_LARGE" in report.failed["too-large"]


def test_a_dead_broker_fails_every_message_at_the_delivery_timeout(
    unreachable_bootstrap: str,
) -> None:
    producer = KafkaProducer(
        ProducerConfig(bootstrap_servers=unreachable_bootstrap, delivery_timeout_ms=1000)
    )
    items = [OutgoingMessage(f"id-{i}", "taskworker", b"v") for i in range(5)]

    started = time.monotonic()
    report = producer.produce_many(items, timeout_s=5)
    elapsed_s = time.monotonic() - started

    assert report.acknowledged == ()
    assert set(report.failed) == {f"id-{i}" for i in range(5)}
    assert all("MSG_TIMED_OUT" in reason for reason in report.failed.values())
    assert 0.9 < elapsed_s < 3
    assert producer.close(timeout_s=1) == 0


def test_a_dead_broker_fails_every_message_within_the_call_timeout(
    unreachable_bootstrap: str,
) -> None:
    producer = KafkaProducer(
        ProducerConfig(bootstrap_servers=unreachable_bootstrap, delivery_timeout_ms=60_000)
    )
    items = [OutgoingMessage(f"id-{i}", "taskworker", b"v") for i in range(5)]

    started = time.monotonic()
    report = producer.produce_many(items, timeout_s=0.5)
    elapsed_s = time.monotonic() - started

    assert report.acknowledged == ()
    assert set(report.failed) == {f"id-{i}" for i in range(5)}
    # Still queued locally, so withdrawn: they cannot land after being reported failed.
    assert all("PURGE_QUEUE" in reason for reason in report.failed.values())
    assert elapsed_s < 1.5
    started = time.monotonic()
    assert producer.close(timeout_s=0.2) == 0
    assert time.monotonic() - started < 1


def test_key_ids_must_be_unique_within_a_batch(unreachable_bootstrap: str) -> None:
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=unreachable_bootstrap))
    twice = OutgoingMessage("same", "taskworker", b"v")

    with pytest.raises(ValueError, match="key_id"):
        producer.produce_many([twice, twice], timeout_s=1)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"bootstrap_servers": ""}, "bootstrap_servers"),
        ({"bootstrap_servers": "k:9092", "delivery_timeout_ms": 0}, "delivery_timeout_ms"),
        ({"bootstrap_servers": "k:9092", "linger_ms": -1}, "linger_ms"),
        (
            {"bootstrap_servers": "k:9092", "linger_ms": 500, "delivery_timeout_ms": 500},
            "linger_ms",
        ),
    ],
)
def test_invalid_settings_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ProducerConfig(**settings)


def test_settings_ask_for_acknowledgement_by_all_replicas() -> None:
    settings = ProducerConfig(bootstrap_servers="k:9092").client_settings()

    assert settings["acks"] == "all"
    assert settings["enable.idempotence"] is True
