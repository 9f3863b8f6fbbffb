"""The `taskbroker` command.

Each subcommand registers itself on the parser in one `_add_<name>` function and sets
`handler`, a function from the parsed arguments to the exit code.

- `taskbroker produce`: write well-formed activations to Kafka, for demos and tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from actors.activation import encode_activation
from actors.errors import ConfigError
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.records import OnAttemptsExceeded

_PRODUCE_CHUNK = 10_000
"""Activations produced and awaited per call: bounds memory for large counts."""

_ID_PREFIX_CHARS = 12

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, slots=True)
class ActivationSpec:
    """What every produced activation looks like; ids are unique per activation."""

    namespace: str
    taskname: str
    application: str | None = None
    delay_s: int | None = None
    expires_s: int | None = None
    at_most_once: bool = False
    max_attempts: int = 1
    deadletter: bool = False
    processing_deadline_s: int = 10
    param_bytes: int = 0

    def encode(self, activation_id: str) -> bytes:
        # The padding sits in kwargs, so a worker can still decode the parameters.
        kwargs = {"padding": "x" * self.param_bytes} if self.param_bytes else {}
        return encode_activation(
            activation_id=activation_id,
            namespace=self.namespace,
            taskname=self.taskname,
            application=self.application,
            kwargs=kwargs,
            processing_deadline_duration_s=self.processing_deadline_s,
            delay_s=self.delay_s,
            expires_s=self.expires_s,
            max_attempts=self.max_attempts,
            on_attempts_exceeded=(
                OnAttemptsExceeded.DEADLETTER if self.deadletter else OnAttemptsExceeded.DISCARD
            ),
            at_most_once=self.at_most_once or None,
        )


@dataclass(frozen=True, slots=True)
class ProduceOutcome:
    acknowledged: int
    failed: int
    first_failure: str | None


def produce_activations(
    producer: KafkaProducer, topic: str, spec: ActivationSpec, count: int, timeout_s: float
) -> ProduceOutcome:
    """Produce `count` activations in chunks, each awaited for up to `timeout_s`.

    Stops at the first chunk with a failure: Kafka is then unlikely to take the rest.
    """
    prefix = uuid.uuid4().hex[:_ID_PREFIX_CHARS]
    acknowledged = 0
    for start in range(0, count, _PRODUCE_CHUNK):
        ids = [f"{prefix}-{n}" for n in range(start, min(start + _PRODUCE_CHUNK, count))]
        messages = [OutgoingMessage(i, topic, spec.encode(i)) for i in ids]
        report = producer.produce_many(messages, timeout_s=timeout_s)
        acknowledged += len(report.acknowledged)
        if report.failed:
            first_failure = next(iter(report.failed.values()))
            return ProduceOutcome(acknowledged, count - acknowledged, first_failure)
    return ProduceOutcome(acknowledged, 0, None)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_produce(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "produce",
        help="write well-formed activations to Kafka",
        description="Write COUNT activations (msgpack parameters) and wait for Kafka to "
        "acknowledge them; exits non-zero if any was not acknowledged.",
    )
    parser.add_argument("--count", type=_positive_int, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--taskname", required=True)
    parser.add_argument("--application", default=None)
    parser.add_argument("--delay", type=_non_negative_int, default=None, metavar="S")
    parser.add_argument("--expires", type=_non_negative_int, default=None, metavar="S")
    parser.add_argument("--at-most-once", action="store_true")
    parser.add_argument("--max-attempts", type=_positive_int, default=1, metavar="N")
    parser.add_argument(
        "--deadletter",
        action="store_true",
        help="dead-letter the task when its attempts run out (default: discard it)",
    )
    parser.add_argument("--processing-deadline", type=_positive_int, default=10, metavar="S")
    parser.add_argument(
        "--param-bytes",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="pad the parameters with about N bytes",
    )
    parser.add_argument("--kafka", default="127.0.0.1:9092", metavar="HOST:PORT")
    parser.add_argument("--topic", default="taskworker")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="how long to wait for Kafka's acknowledgements",
    )
    parser.set_defaults(handler=_produce)


def _produce(args: argparse.Namespace) -> int:
    spec = ActivationSpec(
        namespace=args.namespace,
        taskname=args.taskname,
        application=args.application,
        delay_s=args.delay,
        expires_s=args.expires,
        at_most_once=args.at_most_once,
        max_attempts=args.max_attempts,
        deadletter=args.deadletter,
        processing_deadline_s=args.processing_deadline,
        param_bytes=args.param_bytes,
    )
    timeout_ms = round(args.timeout * 1000)
    try:
        producer = KafkaProducer(
            ProducerConfig(bootstrap_servers=args.kafka, delivery_timeout_ms=timeout_ms)
        )
    except ConfigError as exc:
        print(f"taskbroker produce: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = produce_activations(producer, args.topic, spec, args.count, args.timeout)
    finally:
        producer.close(timeout_s=args.timeout)
    print(f"{outcome.acknowledged} of {args.count} activations acknowledged on {args.topic}")
    if outcome.failed:
        print(
            f"taskbroker produce: {outcome.failed} not acknowledged: {outcome.first_failure}",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskbroker", description="An actor-model task broker.")
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_produce(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
