"""Reading a topic back in tests, without a consumer group (Tansu delays group joins)."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from actors import config

_log = logging.getLogger(__name__)


def read_messages(
    bootstrap: str, topic: str, count: int, partitions: int = 1, timeout_s: float = 15.0
) -> list[Message]:
    """Every message of `topic` from the start until `count` arrived or the time is up (then
    the caller's assertion on what came fails). A Kafka error on a message fails at once."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        },
        logger=_log,
    )
    received: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        while len(received) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            received.append(message)
    finally:
        consumer.close()
    return received


Header = tuple[str, str | bytes | None]


def read_values(
    bootstrap: str, topic: str, count: int, partitions: int = 1
) -> list[tuple[bytes, list[Header]]]:
    """`(value, headers)` of every message, as `read_messages` finds them."""
    found: list[tuple[bytes, list[Header]]] = []
    for message in read_messages(bootstrap, topic, count, partitions):
        value, headers = message.value(), message.headers() or []
        assert value is not None, "a message without a value"
        assert isinstance(headers, list)
        found.append((value, headers))
    return found


def broker_config(
    bootstrap: str, topic: str, dlq: str, db: Path, **overrides: Any
) -> config.Config:
    """A broker on 127.0.0.1 with free ports, consuming `topic` in a group of its own."""
    return config.load(
        overrides={
            "kafka_cluster": bootstrap,
            "kafka_topic": topic,
            "kafka_deadletter_topic": dlq,
            "kafka_consumer_group": f"group-{topic}",
            "grpc_addr": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "db_path": str(db),
            **overrides,
        }
    )
