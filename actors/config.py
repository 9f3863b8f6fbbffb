"""The broker's configuration: one typed object, read from defaults, then a TOML file, then
`TASKBROKER_*` environment variables, then command-line flags, each overriding the last.

Key names and defaults follow taskbroker where they mean the same thing. Every key is
validated at startup; an unknown key or a bad value is a `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.errors import ConfigError
from actors.runtime import MailboxConfig, MailboxPolicy
from actors.services import BatchLimits

ENV_PREFIX = "TASKBROKER_"
ENV_NESTING = "__"
SECRET_KEYS = frozenset(
    {
        "grpc_shared_secret",
        "ops_admin_token",
        "kafka_security.sasl_password",
        "kafka_security.ssl_key_password",
    }
)
"""Keys, dotted below the top level, whose values `taskbroker config` shows as `****`."""


class StoreMode(enum.StrEnum):
    MEMORY = "memory"
    """State in memory, SQLite written in batches by one actor (the design)."""
    SQLITE_DIRECT = "sqlite-direct"
    """Every claim and result written to SQLite on the request path (for comparison)."""


class DeliveryMode(enum.StrEnum):
    PULL = "pull"
    """Workers call GetTask / FetchTasks (the default)."""
    PUSH = "push"
    """The broker calls each worker's WorkerService/PushTask (taskbroker's push mode)."""


class OpsStatusAuth(enum.StrEnum):
    OPEN = "open"
    """Anyone who reaches the ops port reads /status (the default)."""
    TOKEN = "token"
    """/status and /status.html need the admin token."""


class OffsetReset(enum.StrEnum):
    EARLIEST = "earliest"
    LATEST = "latest"


@dataclass(frozen=True, slots=True)
class MailboxSettings:
    size: int = 10_000
    policy: MailboxPolicy = MailboxPolicy.BLOCK
    push_timeout_ms: int = 1000

    def __post_init__(self) -> None:
        _at_least("size", self.size, 1)
        _at_least("push_timeout_ms", self.push_timeout_ms, 0)

    def to_runtime(self) -> MailboxConfig:
        return MailboxConfig(self.size, self.policy, self.push_timeout_ms / 1000)


@dataclass(frozen=True, slots=True)
class Mailboxes:
    """One mailbox per actor. The state actor's is the one gRPC load meets first."""

    state: MailboxSettings = field(default_factory=lambda: MailboxSettings(size=10_000))
    writer: MailboxSettings = field(default_factory=lambda: MailboxSettings(size=16))
    consumer: MailboxSettings = field(default_factory=lambda: MailboxSettings(size=1_000))
    upkeep: MailboxSettings = field(default_factory=lambda: MailboxSettings(size=100))
    frontend: MailboxSettings = field(default_factory=lambda: MailboxSettings(size=100))
    pusher: MailboxSettings = field(default_factory=lambda: MailboxSettings(size=100))
    """Push mode only. It takes only its stop: the state's answers reach its event loop
    directly."""

    def __post_init__(self) -> None:
        # A drop is silent to a teller: a dropped Ingest would let later offsets commit past
        # its activations, and a dropped Flush would never be answered. Refusing is safe.
        for name in ("state", "writer", "consumer"):
            policy = getattr(self, name).policy
            if policy in (MailboxPolicy.DROP_NEWEST, MailboxPolicy.DROP_OLDEST):
                raise ConfigError(
                    f"{name}.policy: {policy.value} could lose activations; use block or fail"
                )


@dataclass(frozen=True, slots=True)
class StoreSettings:
    debug_commit_delay_ms: int = 0
    """Fault injection: a sleep before every commit, to show the broker does not wait on it."""
    busy_timeout_ms: int = 5000
    full_vacuum_interval_sec: int = 0
    """0 disables the periodic full VACUUM; incremental vacuum runs every maintenance pass."""
    maintenance_interval_sec: int = 60

    def __post_init__(self) -> None:
        for name in ("debug_commit_delay_ms", "busy_timeout_ms", "full_vacuum_interval_sec"):
            _at_least(name, getattr(self, name), 0)
        _at_least("maintenance_interval_sec", self.maintenance_interval_sec, 1)


@dataclass(frozen=True, slots=True)
class PushSettings:
    """Push delivery (`delivery_mode = "push"`)."""

    max_in_flight: int = 256
    """PushTask calls outstanding at once, whole broker."""
    timeout_ms: int = 30_000
    """A PushTask call without an answer by then failed: the task goes back to pending."""
    lease_ms: int = 60_000
    """How long a task stays CLAIMED without its push settling before upkeep returns it to
    pending (a pusher that died, a call stuck past its timeout). Longer than timeout_ms."""
    backoff_ms: int = 200
    """The first pause for an endpoint that was busy or unreachable; doubles up to
    max_backoff_ms while it stays so."""
    max_backoff_ms: int = 5_000

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "timeout_ms", "lease_ms", "backoff_ms", "max_backoff_ms"):
            _at_least(name, getattr(self, name), 1)
        if self.lease_ms <= self.timeout_ms:
            raise ConfigError(
                f"lease_ms ({self.lease_ms}) must be longer than timeout_ms ({self.timeout_ms})"
            )
        if self.max_backoff_ms < self.backoff_ms:
            raise ConfigError("max_backoff_ms must be at least backoff_ms")


@dataclass(frozen=True, slots=True)
class FetchSettings:
    batch_length: int = 32
    """Claims per ask to the state actor in push mode (taskbroker's `fetch.batch_length`)."""

    def __post_init__(self) -> None:
        _at_least("batch_length", self.batch_length, 1)


_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How the consumer and every producer authenticate to Kafka: librdkafka's settings of
    the same name with `_` for `.`, as taskbroker's kafka cluster keys are.

    A secret may be inline (in the file, or `TASKBROKER_KAFKA_SECURITY__SASL_PASSWORD`) or
    a `_file` path read at startup, so that it need not sit in the configuration file.
    """

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (librdkafka's `sasl.mechanism(s)`)."""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    sasl_password_file: str = ""
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    ssl_key_password: str = field(default="", repr=False)
    ssl_key_password_file: str = ""

    def __post_init__(self) -> None:
        if self.security_protocol.upper() not in _SECURITY_PROTOCOLS:
            raise ConfigError(
                f"security_protocol: {self.security_protocol!r} is not one of "
                + ", ".join(_SECURITY_PROTOCOLS)
            )
        for secret in ("sasl_password", "ssl_key_password"):
            if getattr(self, secret) and getattr(self, f"{secret}_file"):
                raise ConfigError(f"{secret}: set either it or {secret}_file, not both")

    def client_settings(self) -> dict[str, str]:
        """The librdkafka settings, secrets read from their files; unset keys are left out
        so that librdkafka's defaults stay in force."""
        settings = {
            "security.protocol": self.security_protocol.upper(),
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password
            or _read_secret("kafka_security.sasl_password_file", self.sasl_password_file),
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password
            or _read_secret("kafka_security.ssl_key_password_file", self.ssl_key_password_file),
        }
        return {key: value for key, value in settings.items() if value}


def _read_secret(key: str, path: str) -> str:
    if not path:
        return ""
    try:
        # A trailing newline is the editor's or echo's, never part of the secret.
        return Path(path).read_text().rstrip("\r\n")
    except OSError as error:
        raise ConfigError(f"{key}: {error.strerror or error}") from error


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS for the gRPC port; both files empty (the default): plaintext. The files are read
    at startup and again at SIGHUP, which keeps the old certificates if the new ones are bad."""

    cert_file: str = ""
    """PEM: the server certificate, then any intermediates."""
    key_file: str = ""
    client_ca_file: str = ""
    """PEM: set, every worker must present a client certificate this CA signed (mutual TLS)."""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("cert_file and key_file: set both for TLS, or neither")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("client_ca_file: mutual TLS needs cert_file and key_file too")


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of one broker process."""

    grpc_addr: str = "0.0.0.0"
    grpc_port: int = 50051
    grpc_max_message_bytes: int = 16 * 1024 * 1024
    """Both directions. taskbroker allows 52 MB; ours is lower because one call's message is
    held in memory whole, and an activation bigger than 16 MiB is a task whose arguments
    belong in storage. A broker taking over from taskbroker with larger activations sets
    52428800 (a bigger GetTask answer is refused with RESOURCE_EXHAUSTED, not truncated)."""
    grpc_max_workers: int = 64
    """Threads that run the sqlite-direct design's transactions; the state actor needs none."""
    grpc_state_ask_timeout_ms: int = 5000
    grpc_batch_interval_ms: int = 4
    """The front end sends the state actor one batch of calls at most this often."""
    grpc_shutdown_grace_ms: int = 5000
    grpc_shared_secret: tuple[str, ...] = ()
    grpc_max_concurrent_streams: int = 1024
    """Calls in progress at once on one worker connection (a worker process puts all its
    concurrent calls on one)."""
    grpc_keepalive_min_ping_interval_ms: int = 10_000
    """Client pings closer together than this are strikes."""
    grpc_max_ping_strikes: int = 2
    """Strikes before a connection is closed; 0: unlimited."""
    tls: TlsSettings = field(default_factory=TlsSettings)
    metrics_addr: str = "0.0.0.0"
    metrics_port: int = 9090
    """0 disables the metrics and health HTTP endpoint."""
    ops_status_auth: OpsStatusAuth = OpsStatusAuth.OPEN
    ops_admin_token_file: str = ""
    """A file holding the ops port's admin token, read at startup."""
    ops_admin_token: str = field(default="", repr=False)
    """The admin token itself, from TASKBROKER_OPS_ADMIN_TOKEN; the command line refuses it
    because every local user can read a process's arguments."""

    kafka_cluster: str = ""
    """Bootstrap servers; empty starts the embedded Kafka (development only)."""
    embedded_kafka_port: int = 9092
    embedded_kafka_partitions: int = 1
    kafka_topic: str = "taskworker"
    kafka_retry_topic: str = ""
    """Empty: retries go back to `kafka_topic`."""
    kafka_deadletter_topic: str = "taskworker-dlq"
    kafka_consumer_group: str = "taskworker"
    kafka_session_timeout_ms: int = 6000
    kafka_auto_offset_reset: OffsetReset = OffsetReset.LATEST
    kafka_produce_timeout_ms: int = 10_000
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    """Applies to the embedded Kafka too, which listens in PLAINTEXT."""

    db_path: str = "./taskbroker-inflight.sqlite"
    store_mode: StoreMode = StoreMode.MEMORY
    store: StoreSettings = field(default_factory=StoreSettings)
    delivery_mode: DeliveryMode = DeliveryMode.PULL
    worker_map: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Push mode: application -> worker endpoints ("host:port"; several, or one DNS name
    with several addresses, are spread by least outstanding pushes)."""
    push: PushSettings = field(default_factory=PushSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    batch: BatchLimits = field(default_factory=BatchLimits)
    """Limits of the batched worker API (`taskbroker_actors.v1.TaskBatchService`)."""

    max_pending_count: int = 2048
    max_processing_count: int = 2048
    max_delay_count: int = 8192
    max_processing_attempts: int = 5
    processing_deadline_grace_sec: int = 3
    max_delayed_task_allowed_sec: int = 3600

    upkeep_task_interval_ms: int = 1000
    upkeep_unhealthy_interval_ms: int = 5000
    upkeep_deadline_reset_skip_after_startup_sec: int = 60

    db_insert_batch_max_len: int = 256
    db_insert_batch_max_size: int = 16_000_000
    """Bytes. With `_max_len`, the most one Ingest message to the state carries; a poll that
    reads more sends several. Durability does not wait for these: the state batches flushes."""
    db_insert_batch_max_time_ms: int = 1000
    """Accepted and validated for taskbroker compatibility, with no effect: the consumer
    hands every poll's records to the state at once instead of holding a partial batch."""

    flush_interval_ms: int = 50
    flush_max_dirty: int = 10_000
    runtime_config_path: str = ""
    """taskbroker's runtime rules file (YAML: killswitch, demoted and paused namespaces);
    empty: none. Read again when it changes and at SIGHUP (`actors.control`)."""
    runtime_config_check_interval_ms: int = 5000
    """How often the rules file's mtime is checked for a change."""
    shutdown_timeout_ms: int = 20_000
    metrics_max_task_names: int = 100
    """Distinct (namespace, taskname) label pairs per-task metrics report; later pairs are
    counted under taskname "other" (namespace "other" too if the namespace is new)."""
    log_level: str = "INFO"
    mailbox: Mailboxes = field(default_factory=Mailboxes)

    def __post_init__(self) -> None:
        for port in ("grpc_port", "metrics_port", "embedded_kafka_port"):
            value = getattr(self, port)
            if not 0 <= value <= 65535:
                raise ConfigError(f"{port}: {value} is not a TCP port (0-65535)")
        positive = (
            "grpc_max_message_bytes grpc_max_workers grpc_state_ask_timeout_ms "
            "grpc_max_concurrent_streams "
            "embedded_kafka_partitions kafka_session_timeout_ms kafka_produce_timeout_ms "
            "max_pending_count max_processing_count max_delay_count max_processing_attempts "
            "upkeep_task_interval_ms upkeep_unhealthy_interval_ms db_insert_batch_max_len "
            "db_insert_batch_max_size db_insert_batch_max_time_ms flush_interval_ms "
            "flush_max_dirty shutdown_timeout_ms metrics_max_task_names "
            "runtime_config_check_interval_ms"
        )
        for name in positive.split():
            _at_least(name, getattr(self, name), 1)
        for name in (
            "grpc_batch_interval_ms",
            "grpc_shutdown_grace_ms",
            "grpc_keepalive_min_ping_interval_ms",
            "grpc_max_ping_strikes",
            "processing_deadline_grace_sec",
            "max_delayed_task_allowed_sec",
            "upkeep_deadline_reset_skip_after_startup_sec",
        ):
            _at_least(name, getattr(self, name), 0)
        for name in ("kafka_topic", "kafka_deadletter_topic", "kafka_consumer_group", "db_path"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: must not be empty")
        self._check_push()
        if self.runtime_config_path and self.store_mode is not StoreMode.MEMORY:
            raise ConfigError("runtime_config_path: runtime rules work with store_mode memory only")
        if self.ops_admin_token and self.ops_admin_token_file:
            raise ConfigError("ops_admin_token_file: set either it or ops_admin_token, not both")
        if self.ops_status_auth is OpsStatusAuth.TOKEN and not (
            self.ops_admin_token or self.ops_admin_token_file
        ):
            raise ConfigError(
                'ops_status_auth: "token" needs an admin token: set ops_admin_token_file '
                "or TASKBROKER_OPS_ADMIN_TOKEN"
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"log_level: {self.log_level!r} is not a logging level")

    @property
    def retry_topic(self) -> str:
        return self.kafka_retry_topic or self.kafka_topic

    def _check_push(self) -> None:
        if self.delivery_mode is DeliveryMode.PUSH:
            if not self.worker_map:
                raise ConfigError(
                    "worker_map: push delivery needs at least one application -> worker endpoint"
                )
            if self.store_mode is not StoreMode.MEMORY:
                raise ConfigError("delivery_mode: push works with store_mode memory only")
        for application, endpoints in self.worker_map.items():
            if not endpoints:
                raise ConfigError(f"worker_map.{application}: no endpoint")
            for endpoint in endpoints:
                host, _, port = endpoint.rpartition(":")
                if not host or not port.isdigit():
                    raise ConfigError(f"worker_map.{application}: {endpoint!r} is not host:port")


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")


# --- loading ----------------------------------------------------------------------------------


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file < environment < `overrides` (flags), as one validated Config.

    `overrides` uses dotted keys for nesting: {"store.debug_commit_delay_ms": 200}.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        try:
            layers.append((str(path), tomllib.loads(path.read_text())))
        except OSError as error:
            raise ConfigError(f"config file {path}: {error.strerror or error}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path}: not valid TOML: {error}") from error
    if env is not None:
        layers.append(("environment", _from_env(env)))
    if overrides:
        layers.append(("command line", _from_dotted(overrides)))
    merged: dict[str, Any] = {}
    for source, layer in layers:
        _merge(merged, layer, source)
    config: Config = _build(Config, merged, prefix="")
    return config


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    dotted = {
        key[len(ENV_PREFIX) :].lower().replace(ENV_NESTING, "."): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX)
    }
    return _from_dotted(dotted)


def _from_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def _merge(into: dict[str, Any], layer: Mapping[str, Any], source: str) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping):
            existing = into.setdefault(key, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"{key}: {source} gives a table where a value was expected")
            _merge(existing, value, source)
        else:
            into[key] = value


def _build(cls: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown configuration key")
    arguments: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a table of settings")
            base = dataclasses.asdict(getattr(defaults, name))
            _merge(base, value, "defaults")
            arguments[name] = _build(kind, base, prefix=f"{key}.")
        else:
            arguments[name] = _coerce(key, kind, value)
    try:
        return cls(**arguments)
    except ConfigError as error:
        # Validation names the field; the prefix makes it the full dotted key.
        raise ConfigError(f"{prefix}{error}") from None
    except ValueError as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from error


def _coerce(key: str, kind: Any, value: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in kind)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not an integer") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    if typing.get_origin(kind) is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table of application = endpoints")
        _, item_kind = typing.get_args(kind)
        return {str(k): _coerce(f"{key}.{k}", item_kind, v) for k, v in value.items()}
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = _string_list(key, value)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return tuple(value)
    raise ConfigError(f"{key}: unsupported setting type {kind!r}")  # pragma: no cover


def _string_list(key: str, text: str) -> list[str]:
    """A list from the environment or `--set`: a TOML array, or items separated by commas.

    Read as commas alone, `["a", "b"]` would become the two items `["a"` and `"b"]`.
    """
    if not text.lstrip().startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        items: list[Any] = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{key}: {text!r} is not a TOML array: {error}") from None
    return items


# --- showing ----------------------------------------------------------------------------------


def to_toml(config: Config) -> str:
    """The effective configuration as TOML, secrets masked, for `taskbroker config`."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    _emit(config, "", lines, tables)
    while tables:
        name, value = tables.pop(0)
        lines.append(f"\n[{name}]")
        _emit(value, f"{name}.", lines, tables)
    return "\n".join(lines) + "\n"


def _emit(obj: Any, prefix: str, lines: list[str], tables: list[tuple[str, Any]]) -> None:
    if isinstance(obj, dict):
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in obj.items())
        return
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            tables.append((f"{prefix}{item.name}", value))
            continue
        if f"{prefix}{item.name}" in SECRET_KEYS and value:
            value = "****" if isinstance(value, str) else tuple("****" for _ in value)
        lines.append(f"{item.name} = {_toml_value(value)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return f'"{value.value}"'
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
