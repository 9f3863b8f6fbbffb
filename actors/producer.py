"""Produce retries and dead letters to Kafka and learn, per message, whether Kafka has them.

The upkeep actor may only tell the state actor that a record left (was retried or
dead-lettered) once Kafka acknowledged the message that replaces it, so this producer's
one job is an honest answer: which of the messages of a batch were acknowledged by all
in-sync replicas within the time allowed, and why the others were not. It never raises a
confluent-kafka exception and never drops a failure on the floor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from actors.errors import ConfigError
from actors.logs import quiet_repeats

_log = logging.getLogger(__name__)

_POLL_SLICE_S = 0.1


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    """How to reach Kafka and how long a message may take to be acknowledged.

    `enable_idempotence` needs a broker that supports idempotent producers (Kafka 0.11+
    and Tansu do); it keeps librdkafka's internal retries from writing a message twice.
    """

    bootstrap_servers: str
    client_id: str = "taskbroker-actors"
    delivery_timeout_ms: int = 10_000
    linger_ms: int = 5
    enable_idempotence: bool = True
    security: Mapping[str, str] = field(default_factory=dict, repr=False)
    """librdkafka's security.*, sasl.* and ssl.* settings; out of repr: it holds secrets."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ConfigError("bootstrap_servers must not be empty")
        if self.delivery_timeout_ms < 1:
            raise ConfigError(
                f"delivery_timeout_ms must be positive, got {self.delivery_timeout_ms}"
            )
        if not 0 <= self.linger_ms < self.delivery_timeout_ms:
            raise ConfigError(
                f"linger_ms must be in [0, delivery_timeout_ms), got {self.linger_ms}"
            )

    def client_settings(self) -> dict[str, str | int | bool]:
        """The librdkafka settings this configuration stands for."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "acks": "all",
            "enable.idempotence": self.enable_idempotence,
            "linger.ms": self.linger_ms,
            "delivery.timeout.ms": self.delivery_timeout_ms,
            **self.security,
        }


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to produce; `key_id` names it in the report (an activation id).

    `key`, when given, is the Kafka key: messages with keys spread over the topic's
    partitions by hash, where keyless ones go to one partition per batch (librdkafka's
    sticky partitioner), which would leave all but one broker of a group idle.
    """

    key_id: str
    topic: str
    value: bytes = field(repr=False)
    headers: tuple[tuple[str, bytes], ...] = ()
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class ProduceReport:
    """What happened to each message of a batch: acknowledged, or failed with a reason."""

    acknowledged: tuple[str, ...]
    failed: Mapping[str, str]

    @property
    def all_acknowledged(self) -> bool:
        return not self.failed


class _Outcomes:
    """The delivery reports of one batch, filled in by librdkafka's callbacks."""

    def __init__(self, key_ids: Sequence[str]) -> None:
        self._waiting = set(key_ids)
        self._acknowledged: list[str] = []
        self._failed: dict[str, str] = {}
        self.fatal: KafkaError | None = None

    @property
    def complete(self) -> bool:
        return not self._waiting

    def delivered(self, key_id: str, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.acknowledge(key_id)
        else:
            if _is_fatal(error):
                self.fatal = error
            self.fail(key_id, _describe(error))

    def acknowledge(self, key_id: str) -> None:
        if key_id in self._waiting:
            self._waiting.discard(key_id)
            self._acknowledged.append(key_id)

    def fail(self, key_id: str, reason: str) -> None:
        if key_id in self._waiting:
            self._waiting.discard(key_id)
            self._failed[key_id] = reason

    def report(self, unanswered_reason: str) -> ProduceReport:
        failed = dict(self._failed)
        failed.update(dict.fromkeys(self._waiting, unanswered_reason))
        return ProduceReport(acknowledged=tuple(self._acknowledged), failed=failed)


class KafkaProducer:
    """A confluent-kafka producer that reports, per message, whether Kafka acknowledged it.

    A librdkafka producer that hit a fatal error refuses every later message: an idempotent
    one whose request timed out in flight is fenced for good by a Kafka that does not bump
    its epoch (Tansu, after a hang: every produce since failed with PRODUCER_FENCED). So
    after a batch that saw one, the client is replaced by a new one; the batch's messages
    are reported failed, and the caller's next attempt goes through the new client.
    """

    def __init__(self, config: ProducerConfig) -> None:
        self._config = config
        self._fatal: KafkaError | None = None
        try:
            self._producer = self._new_client()
        except KafkaException as exc:
            raise ConfigError(f"the Kafka producer rejected its settings: {exc}") from exc

    def _new_client(self) -> Producer:
        # librdkafka's own log, connection errors included, goes to this module's logger.
        return Producer(
            self._config.client_settings(), logger=quiet_repeats(_log), error_cb=self._on_error
        )

    def _on_error(self, error: KafkaError) -> None:
        # Called from poll/flush, on the caller's thread.
        if _is_fatal(error):
            self._fatal = error

    def __repr__(self) -> str:
        return f"KafkaProducer(bootstrap_servers={self._config.bootstrap_servers!r})"

    def produce_many(self, items: Sequence[OutgoingMessage], timeout_s: float) -> ProduceReport:
        """Produce `items` and wait up to `timeout_s` for every delivery report.

        A message without a report by then is reported failed and, if it had not left
        the local queue yet, withdrawn; one already sent may still land later, which
        costs a duplicate, never a loss.
        """
        key_ids = [item.key_id for item in items]
        if len(set(key_ids)) != len(key_ids):
            raise ValueError("every message of a batch needs its own key_id")
        deadline = time.monotonic() + timeout_s
        outcomes = _Outcomes(key_ids)
        for item in items:
            self._produce_one(item, outcomes, deadline)
        while not outcomes.complete and (remaining_s := deadline - time.monotonic()) > 0:
            self._producer.poll(min(remaining_s, _POLL_SLICE_S))
        if not outcomes.complete:
            self._producer.purge(in_queue=True, in_flight=False, blocking=False)
            # Serves the purge reports, so withdrawn messages say why they failed.
            self._producer.poll(0)
        report = outcomes.report(f"no delivery report within {timeout_s} s")
        fatal = outcomes.fatal or self._fatal
        if fatal is not None:
            self._replace_client(fatal)
        return report

    def _replace_client(self, fatal: KafkaError) -> None:
        _log.warning(
            "the Kafka producer hit a fatal error (%s); replacing it with a new one",
            _describe(fatal),
        )
        old, self._fatal = self._producer, None
        # Whatever the old client still holds failed with it; nothing waits for it.
        old.purge(in_queue=True, in_flight=True, blocking=False)
        old.flush(0)
        self._producer = self._new_client()

    def close(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for messages still on their way; returns how many were not.

        Those are withdrawn, so closing never blocks on an unreachable Kafka.
        """
        remaining = self._producer.flush(timeout_s)
        if remaining:
            _log.warning("closing the Kafka producer with %d messages undelivered", remaining)
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)
        return remaining

    def _produce_one(self, item: OutgoingMessage, outcomes: _Outcomes, deadline: float) -> None:
        while True:
            try:
                self._producer.produce(
                    item.topic,
                    value=item.value,
                    key=item.key,
                    headers=list(item.headers),
                    on_delivery=partial(outcomes.delivered, item.key_id),
                )
            except BufferError:
                # The local queue is full: serving delivery reports makes room.
                if time.monotonic() >= deadline:
                    outcomes.fail(item.key_id, "the local producer queue stayed full")
                    return
                self._producer.poll(_POLL_SLICE_S)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                reason = _describe(error) if isinstance(error, KafkaError) else str(exc)
                outcomes.fail(item.key_id, reason)
                return
            else:
                return


def _describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


def _is_fatal(error: KafkaError) -> bool:
    return bool(error.fatal()) or error.code() in (KafkaError._FATAL, KafkaError.PRODUCER_FENCED)
