"""Load-test activations into Kafka: ids the run knows, so every one can be accounted for."""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer

from actors.activation import encode_activation
from actors.errors import KafkaUnavailable

APPLICATION = "loadtest"
_TIMEOUT_S = 60.0
_QUEUE_FULL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What each load-test activation looks like."""

    param_bytes: int = 512
    """Size of the msgpack kwargs padding: the payload a worker would decode."""
    processing_deadline_s: int = 600
    """Long enough that no deadline reset can duplicate a task during a run."""
    max_attempts: int = 1
    """More than 1 lets a worker's RETRY produce a retry (`UnaryWorkers.retry_per_mille`)."""
    delay_s: int | None = None
    """Held back by the broker this long after it is produced."""


def task_ids(run_id: str, count: int) -> list[str]:
    return [f"{run_id}-{index:08d}" for index in range(count)]


def produce_tasks(bootstrap: str, topic: str, ids: list[str], spec: TaskSpec) -> None:
    """Produce one activation per id, keyed by it, and wait until Kafka acknowledged every
    one.

    Keyed, and so not through `actors.producer.KafkaProducer`, which sends no key: without
    one librdkafka's sticky partitioner puts each batch, thousands of activations, on one
    partition, and a run of several brokers left all of a 2,000-task phase on one of two.
    The hash of the ids spreads them evenly over the partitions.

    Raises KafkaUnavailable when any produce is not acknowledged within a minute.
    """
    padding = "x" * spec.param_bytes
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 20,
            "delivery.timeout.ms": int(_TIMEOUT_S * 1000),
        }
    )
    deadline = time.monotonic() + _TIMEOUT_S
    for activation_id in ids:
        value = encode_activation(
            activation_id=activation_id,
            application=APPLICATION,
            namespace="default",
            taskname="loadtest.noop",
            kwargs={"padding": padding},
            processing_deadline_duration_s=spec.processing_deadline_s,
            max_attempts=spec.max_attempts,
            delay_s=spec.delay_s,
        )
        while True:
            try:
                producer.produce(topic, value=value, key=activation_id, on_delivery=delivered)
                break
            except BufferError:
                # The local queue is full: serving delivery reports makes room.
                if time.monotonic() > deadline:
                    raise KafkaUnavailable("the load-test producer's queue stayed full") from None
                producer.poll(_QUEUE_FULL_POLL_S)
    unanswered = producer.flush(max(deadline - time.monotonic(), 1.0))
    if failures or unanswered:
        reason = failures[0] if failures else "no delivery report in time"
        raise KafkaUnavailable(
            f"{len(failures) + unanswered} load-test activations not acknowledged: {reason}"
        )
