"""Reading a topic back in tests, without a consumer group (Tansu delays group joins)."""

from __future__ import annotations

import logging
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

_log = logging.getLogger(__name__)

Received = tuple[bytes, list[tuple[str, str | bytes | None]]]


def read_topic(
    bootstrap: str, topic: str, count: int, partitions: int = 1, timeout_s: float = 15.0
) -> list[Received]:
    """Every message of `topic` from the start, as `(value, headers)`, until `count` arrived
    or the time is up (then the caller's assertion on the count fails with what came)."""
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
    received: list[Received] = []
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        while len(received) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            value = message.value()
            assert value is not None
            headers = message.headers() or []
            assert isinstance(headers, list)
            received.append((value, headers))
    finally:
        consumer.close()
    return received
