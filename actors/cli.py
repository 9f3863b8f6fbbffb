"""The `taskbroker` command.

Each subcommand registers itself on the parser in one `_add_<name>` function and sets
`handler`, a function from the parsed arguments to the exit code.

- `taskbroker run`: the broker (with an embedded Kafka when no Kafka is configured).
- `taskbroker config`: the effective configuration, secrets masked.
- `taskbroker produce`: write well-formed activations to Kafka, for demos and tests.
- `taskbroker status`: a running broker's mailboxes and counts, as a table.
- `taskbroker control`: incident controls (kill, demote, pause, resume) on a running broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from actors import config as configuration
from actors import control_cli, status
from actors.activation import encode_activation
from actors.config import Config
from actors.embedded_kafka import EMBEDDED_KAFKA_HOST
from actors.errors import ConfigError
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.records import OnAttemptsExceeded
from actors.runtime import tune_garbage_collector

_PRODUCE_CHUNK = 10_000
"""Activations produced and awaited per call: bounds memory for large counts."""

_ID_PREFIX_CHARS = 12

_KAFKA_PROBE_S = 5.0
"""How long `produce` waits for Kafka to answer at all before saying that none does, instead
of waiting out --timeout for acknowledgements that cannot come."""
_PROBE_SLICE_S = 0.5

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
        messages = [OutgoingMessage(i, topic, spec.encode(i), key=i.encode()) for i in ids]
        report = producer.produce_many(messages, timeout_s=timeout_s)
        acknowledged += len(report.acknowledged)
        if report.failed:
            first_failure = next(iter(report.failed.values()))
            return ProduceOutcome(acknowledged, count - acknowledged, first_failure)
    return ProduceOutcome(acknowledged, 0, None)


def kafka_answers(
    bootstrap_servers: str, timeout_s: float, security: Mapping[str, str] | None = None
) -> bool:
    """Whether a Kafka at `bootstrap_servers` answers a metadata request within `timeout_s`.

    Gives up early once librdkafka finds every bootstrap server down (connection refused),
    which it reports within milliseconds, instead of waiting out `timeout_s`.
    """
    all_down = threading.Event()

    def on_error(error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            all_down.set()

    # log_level 0: the caller says what a failed probe means; librdkafka's lines would not.
    admin = AdminClient(
        {"bootstrap.servers": bootstrap_servers, "log_level": 0, **(security or {})},
        error_cb=on_error,
    )
    deadline = time.monotonic() + timeout_s
    while (remaining_s := deadline - time.monotonic()) > 0:
        try:
            admin.list_topics(timeout=min(remaining_s, _PROBE_SLICE_S))
        except KafkaException:
            admin.poll(0)  # serves on_error
            if all_down.is_set():
                return False
        else:
            return True
    return False


def _local_kafka() -> str:
    """Where `taskbroker run` starts its embedded Kafka by default."""
    return f"{EMBEDDED_KAFKA_HOST}:{Config().embedded_kafka_port}"


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
    parser.add_argument(
        "--count",
        type=_positive_int,
        required=True,
        metavar="N",
        help="activations to write (required)",
    )
    parser.add_argument("--namespace", required=True, help="the activations' namespace (required)")
    parser.add_argument(
        "--taskname", required=True, help="the task a worker runs for them (required)"
    )
    parser.add_argument(
        "--application",
        default=None,
        help="the application they belong to, for workers that filter on it (default: none)",
    )
    parser.add_argument(
        "--delay",
        type=_non_negative_int,
        default=None,
        metavar="S",
        help="hold each activation back for S seconds before a worker may get it "
        "(default: no delay)",
    )
    parser.add_argument(
        "--expires",
        type=_non_negative_int,
        default=None,
        metavar="S",
        help="discard an activation not yet handed out S seconds after it arrives (default: never)",
    )
    parser.add_argument(
        "--at-most-once",
        action="store_true",
        help="never hand an activation out twice, even after a worker is lost (default: off)",
    )
    parser.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=1,
        metavar="N",
        help="attempts per activation, the first included (default: %(default)s)",
    )
    parser.add_argument(
        "--deadletter",
        action="store_true",
        help="dead-letter an activation when its attempts run out (default: off, discard it)",
    )
    parser.add_argument(
        "--processing-deadline",
        type=_positive_int,
        default=10,
        metavar="S",
        help="seconds a worker has for one attempt before it is handed out again "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--param-bytes",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="pad the parameters with about N bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--kafka",
        default=_local_kafka(),
        metavar="HOST:PORT",
        help="Kafka bootstrap servers; `taskbroker run` without --kafka starts one here "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--topic", default="taskworker", help="the topic to write to (default: %(default)s)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="a TOML file whose [kafka_security] (and TASKBROKER_KAFKA_SECURITY__* in the "
        "environment) says how to authenticate to Kafka (default: none: PLAINTEXT)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="how long to wait for Kafka's acknowledgements (default: %(default)s)",
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
    try:
        security = configuration.load(args.config, os.environ).kafka_security.client_settings()
    except ConfigError as exc:
        print(f"taskbroker produce: {exc}", file=sys.stderr)
        return 2
    if not kafka_answers(args.kafka, min(args.timeout, _KAFKA_PROBE_S), security):
        print(
            f"taskbroker produce: no Kafka answers at {args.kafka} (--kafka). "
            f"`taskbroker run` without --kafka starts one at {_local_kafka()}; "
            "or name a running Kafka with --kafka HOST:PORT.",
            file=sys.stderr,
        )
        return 1
    timeout_ms = round(args.timeout * 1000)
    try:
        producer = KafkaProducer(
            ProducerConfig(
                bootstrap_servers=args.kafka, delivery_timeout_ms=timeout_ms, security=security
            )
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


_CONFIG_EPILOG = (
    "Defaults shown are the built-in ones: a --config file and TASKBROKER_* environment "
    "variables change them, and these flags override both. `taskbroker config` prints every key."
)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by `run` and `config`: a file, the common keys, and any key by name.

    The flags default to None, meaning "not given" (the file and the environment decide),
    so their help states the built-in default instead of argparse's None.
    """
    defaults = Config()
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="a TOML file of configuration keys (default: none)",
    )
    parser.add_argument(
        "--kafka",
        default=None,
        metavar="HOST:PORT",
        help="Kafka bootstrap servers, key kafka_cluster (default: none: start the embedded "
        "Kafka, for development)",
    )
    parser.add_argument(
        "--embedded-kafka-port",
        type=int,
        default=None,
        metavar="N",
        help=f"the embedded Kafka's port on {EMBEDDED_KAFKA_HOST}, key embedded_kafka_port "
        f"(default: {defaults.embedded_kafka_port})",
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="PATH",
        help=f"the SQLite file, key db_path (default: {defaults.db_path})",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="N",
        help="the workers' gRPC port, key grpc_port; 0 picks a free one "
        f"(default: {defaults.grpc_port})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="N",
        help="the port of /metrics, /readyz and /status, key metrics_port; 0 turns it off "
        f"(default: {defaults.metrics_port})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any configuration key, dotted for nesting (mailbox.state.size=500); repeatable "
        "(default: none)",
    )


_FLAG_KEYS = {
    "kafka": "kafka_cluster",
    "embedded_kafka_port": "embedded_kafka_port",
    "db": "db_path",
    "grpc_port": "grpc_port",
    "metrics_port": "metrics_port",
}


_NOT_ON_THE_COMMAND_LINE = {
    "ops_admin_token": "TASKBROKER_OPS_ADMIN_TOKEN or ops_admin_token_file",
}


def load_config(args: argparse.Namespace) -> Config:
    """Defaults < --config file < TASKBROKER_* environment < flags."""
    overrides: dict[str, object] = {
        key: getattr(args, flag)
        for flag, key in _FLAG_KEYS.items()
        if getattr(args, flag) is not None
    }
    for assignment in args.set:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
        if key.strip() in _NOT_ON_THE_COMMAND_LINE:
            # Any local user can read a process's arguments (ps, /proc/<pid>/cmdline).
            raise ConfigError(
                f"--set {key.strip()}: not accepted on the command line, where other users "
                f"can read it; use {_NOT_ON_THE_COMMAND_LINE[key.strip()]}"
            )
        overrides[key.strip()] = value.strip()
    return configuration.load(args.config, os.environ, overrides)


def _add_run(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the broker",
        description="Run the broker until SIGTERM or SIGINT. Without --kafka (or kafka_cluster "
        "in the configuration) it starts an embedded Kafka for development.",
        epilog=_CONFIG_EPILOG,
    )
    _add_config_arguments(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from actors.supervisor import EXIT_STARTUP_FAILED, Supervisor  # noqa: PLC0415 - heavy, run only

    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"taskbroker run: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    logging.getLogger().setLevel(config.log_level.upper())
    tune_garbage_collector()
    return Supervisor(config).run()


def _add_config(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the effective configuration",
        description="Print the configuration `run` would use with the same flags and "
        "environment, as TOML, secrets masked.",
        epilog=_CONFIG_EPILOG,
    )
    _add_config_arguments(parser)
    parser.set_defaults(handler=_config)


def _config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"taskbroker config: {exc}", file=sys.stderr)
        return 2
    print(configuration.to_toml(config), end="")
    return 0


def _add_status(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a running broker's mailboxes and counts",
        description="Fetch /status from a running broker's metrics port and print it.",
    )
    status.add_arguments(parser)
    parser.set_defaults(handler=status.run)


def _add_control(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "control",
        help="incident controls on a running broker: kill, demote, pause, resume, show",
        description="Change a running broker's runtime rules through its admin endpoint "
        "(the ops port, with the admin token); the actions persist across restarts.",
    )
    control_cli.add_arguments(parser)
    parser.set_defaults(handler=control_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskbroker", description="An actor-model task broker.")
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_run(subparsers)
    _add_config(subparsers)
    _add_produce(subparsers)
    _add_status(subparsers)
    _add_control(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
