"""Fixtures shared by the test suite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Protocol

import pytest

from actors.embedded_kafka import EmbeddedKafka, TopicSpec, free_port
from tests.grpc_support import StartBroker, broker_starter


class TopicFactory(Protocol):
    """Creates a fresh topic and its dead-letter topic; returns `(topic, dlq_topic)`."""

    def __call__(self, partitions: int = 1) -> tuple[str, str]: ...


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka]:
    """One embedded Kafka for the whole session; a missing binary fails, never skips."""
    with EmbeddedKafka(port=free_port()) as broker:
        yield broker


@pytest.fixture
def kafka_topics(kafka: EmbeddedKafka) -> TopicFactory:
    """Topics with unique names, so no test sees another test's messages."""

    def create(partitions: int = 1) -> tuple[str, str]:
        topic = f"test-{uuid.uuid4().hex[:12]}"
        dlq_topic = f"{topic}-dlq"
        kafka.create_topics([TopicSpec(topic, partitions), TopicSpec(dlq_topic, partitions)])
        return topic, dlq_topic

    return create


@pytest.fixture
def start_broker() -> Iterator[StartBroker]:
    """Start a state actor behind a gRPC front end on 127.0.0.1; all stopped afterwards."""
    yield from broker_starter()
