"""Load-test activations into Kafka: ids the run knows, so every one can be accounted for."""

from __future__ import annotations

from dataclasses import dataclass

from actors.activation import encode_activation
from actors.errors import KafkaUnavailable
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig

APPLICATION = "loadtest"
_CHUNK = 10_000
_CHUNK_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What each load-test activation looks like."""

    param_bytes: int = 512
    """Size of the msgpack kwargs padding: the payload a worker would decode."""
    processing_deadline_s: int = 600
    """Long enough that no deadline reset can duplicate a task during a run."""


def task_ids(run_id: str, count: int) -> list[str]:
    return [f"{run_id}-{index:08d}" for index in range(count)]


def produce_tasks(bootstrap: str, topic: str, ids: list[str], spec: TaskSpec) -> None:
    """Produce one activation per id and wait until Kafka acknowledged every one.

    Raises KafkaUnavailable when any produce is not acknowledged.
    """
    padding = "x" * spec.param_bytes
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=bootstrap, linger_ms=20))
    try:
        for start in range(0, len(ids), _CHUNK):
            messages = [
                OutgoingMessage(
                    activation_id,
                    topic,
                    encode_activation(
                        activation_id=activation_id,
                        application=APPLICATION,
                        namespace="default",
                        taskname="loadtest.noop",
                        kwargs={"padding": padding},
                        processing_deadline_duration_s=spec.processing_deadline_s,
                    ),
                )
                for activation_id in ids[start : start + _CHUNK]
            ]
            report = producer.produce_many(messages, _CHUNK_TIMEOUT_S)
            if report.failed:
                reason = next(iter(report.failed.values()))
                raise KafkaUnavailable(
                    f"{len(report.failed)} load-test activations not acknowledged: {reason}"
                )
    finally:
        producer.close(_CHUNK_TIMEOUT_S)
