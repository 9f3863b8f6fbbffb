"""The supervisor: builds every actor from the configuration, starts them in dependency order,
watches them, and stops them in reverse order on SIGTERM/SIGINT.

Start: the database and the ports checked → (embedded Kafka) → state → writer → restore →
upkeep → (pusher, in push mode) → consumer → gRPC → started; ready once Kafka assigns the
consumer its partitions.
Stop: not ready → pusher (its unacknowledged tasks back to pending) → gRPC (with a grace) →
upkeep → consumer stops consuming → the state's last flush, committed by the writer →
consumer commits the durable offsets → state → writer.

An actor that dies on its own is logged with its error and the process exits non-zero: a
half-alive broker is worse than a restart, and the durability contract makes a restart safe.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pykka
import pykka.debug
from prometheus_client import CollectorRegistry

from actors.config import Config, DeliveryMode, OpsStatusAuth, StoreMode
from actors.consumer import BatchLimits, ConsumerConfig, KafkaConsumer, KafkaSilence
from actors.control import CONTROL_PATH, Controls
from actors.direct import DirectStore, SqliteDirectState, SqliteDirectStateClient
from actors.embedded_kafka import (
    EMBEDDED_KAFKA_HOST,
    EmbeddedKafka,
    TopicSpec,
    pid_file_beside,
    stop_orphan,
)
from actors.errors import ActorUnavailable, BrokerError, ConfigError, StoreError
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import (
    ApplyRules,
    Connect,
    Drain,
    LoadAndRestore,
    ReloadTls,
    StopConsuming,
)
from actors.metrics import FirstClaimMetrics, RuntimeRuleMetrics
from actors.ops_http import BrokerFacts, OpsAccess, OpsEndpoint, admin_token
from actors.producer import KafkaProducer, ProducerConfig
from actors.pusher import Pusher, PusherConfig
from actors.runtime import ask, tell_if_alive
from actors.runtime_rules import RuntimeRules
from actors.state import StateActor, StateConfig
from actors.state_client import BlockingStateClient
from actors.statemachine import Limits
from actors.store import DatabaseLock
from actors.tls import TlsFiles
from actors.upkeep import HealthMonitor, Heartbeat, Upkeep, UpkeepConfig
from actors.writer import SqliteWriter, WriterConfig

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ACTOR_DIED = 1
EXIT_STARTUP_FAILED = 2

_RESTORE_TIMEOUT_S = 300.0
_WATCH_INTERVAL_S = 0.25
# A broker that never gets ready would otherwise be silent about it (librdkafka says
# nothing of a host that drops packets until its 30 s connection timeout).
_NOT_READY_FIRST_S = 10.0
_NOT_READY_EVERY_S = 60.0


class _Relay:
    """Forwards to a recipient that exists only later: the writer is built before the
    consumer (restore must finish before consuming starts), yet tells it `Persisted`."""

    def __init__(self) -> None:
        self.target: pykka.ActorRef[Any] | None = None

    def tell(self, message: object) -> None:
        if self.target is not None:
            self.target.tell(message)

    def apply_rules(self, rules: RuntimeRules) -> None:
        self.tell(ApplyRules(rules))


@dataclass
class Broker:
    """The running actors, in start order, and where they can be reached."""

    config: Config
    kafka_bootstrap: str
    grpc_port: int
    actors: list[tuple[str, pykka.ActorRef[Any]]] = field(default_factory=list)
    health: HealthMonitor | None = None
    consuming: threading.Event = field(default_factory=threading.Event)
    """Set at the consumer's first partition assignment; readiness waits for it."""
    embedded_kafka: EmbeddedKafka | None = None
    ops: OpsEndpoint | None = None
    controls: Controls | None = None
    """The incident controls (memory store mode only)."""

    def ref(self, name: str) -> pykka.ActorRef[Any]:
        return dict(self.actors)[name]

    def is_ready(self) -> bool:
        """Restored, consuming, and upkeep ticking: what /readyz and gRPC health say."""
        return self.health is not None and self.health.serving


class ReadinessLog:
    """Logs "ready" the first time the broker is ready (what /readyz says), and until then,
    after `first_s` and every `every_s`, what it is still waiting for."""

    def __init__(
        self,
        broker: Broker,
        started_at: float,
        first_s: float = _NOT_READY_FIRST_S,
        every_s: float = _NOT_READY_EVERY_S,
    ) -> None:
        self._broker = broker
        self._started_at = started_at
        self._every_s = every_s
        self._next_report_at: float | None = started_at + first_s

    def observe(self, ready: bool, now: float) -> None:
        if self._next_report_at is None:
            return
        broker = self._broker
        config = broker.config
        if ready:
            self._next_report_at = None
            logger.info(
                "taskbroker ready: consuming %s from Kafka %s, serving gRPC on %s:%d",
                config.kafka_topic,
                broker.kafka_bootstrap,
                config.grpc_addr,
                broker.grpc_port,
            )
        elif now >= self._next_report_at:
            self._next_report_at = now + self._every_s
            if broker.consuming.is_set():
                logger.warning(
                    "taskbroker not ready after %.0f s: consuming, but upkeep has not "
                    "completed a tick lately (see /status)",
                    now - self._started_at,
                )
                return
            logger.warning(
                "taskbroker not ready after %.0f s: Kafka %s has not assigned consumer "
                "group %s its partitions of %s yet (is Kafka reachable?)",
                now - self._started_at,
                broker.kafka_bootstrap,
                config.kafka_consumer_group,
                config.kafka_topic,
            )


class Supervisor:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._stop_requested = threading.Event()
        self._broker: Broker | None = None

    def request_stop(self) -> None:
        self._stop_requested.set()

    def reload_tls(self) -> None:
        """Has the front end re-read its certificate files (what SIGHUP does)."""
        broker = self._broker
        frontend = None if broker is None else dict(broker.actors).get("frontend")
        if frontend is not None:
            tell_if_alive(frontend, ReloadTls())

    def reload_rules(self) -> None:
        """Has the incident controls re-read the runtime rules file (what SIGHUP does too)."""
        broker = self._broker
        if broker is not None and broker.controls is not None:
            broker.controls.reload("SIGHUP")

    @property
    def broker(self) -> Broker | None:
        return self._broker

    def run(self, on_ready: Callable[[Broker], None] | None = None) -> int:
        """Start, serve until a stop is requested or an actor dies, stop; the exit code."""
        try:
            with self._signals():
                broker = self._broker = self.start()
                try:
                    if on_ready is not None:
                        on_ready(broker)
                    died = self._watch(broker)
                finally:
                    self.stop(broker)
        except BrokerError as error:
            logger.error("broker failed to start: %s", error)  # noqa: TRY400 - the message is the diagnosis
            return EXIT_STARTUP_FAILED
        return EXIT_ACTOR_DIED if died else EXIT_OK

    # --- start -------------------------------------------------------------------------------

    def start(self) -> Broker:
        config = self._config
        # Before Kafka and the ops port: a database the broker cannot have is the likelier
        # mistake (a second broker from the same directory), and the one to report.
        check_database(Path(config.db_path))
        if not config.kafka_cluster:
            # After the database check, which proves the broker that started it is gone;
            # before the port check, since the orphan holds the port.
            stop_orphan(pid_file_beside(Path(config.db_path)))
        check_ports(config)
        # Before anything starts, like the checks above: an unreadable secret file.
        kafka_security = config.kafka_security.client_settings()
        embedded = None
        bootstrap = config.kafka_cluster
        if not bootstrap:
            embedded = self._start_embedded_kafka()
            bootstrap = embedded.bootstrap
        broker = Broker(config, bootstrap, grpc_port=0, embedded_kafka=embedded)
        try:
            self._start_actors(broker, kafka_security)
        except BaseException:
            self.stop(broker)
            raise
        return broker

    def _start_embedded_kafka(self) -> EmbeddedKafka:
        config = self._config
        topics = {config.kafka_topic, config.retry_topic, config.kafka_deadletter_topic}
        kafka = EmbeddedKafka(
            port=config.embedded_kafka_port,
            topics=[TopicSpec(name) for name in sorted(topics)],
            partitions=config.embedded_kafka_partitions,
            pid_file=pid_file_beside(Path(config.db_path)),
        )
        kafka.start()
        logger.info(
            "no kafka_cluster configured: started the embedded Kafka on %s (development only)",
            kafka.bootstrap,
        )
        return kafka

    def _start_actors(self, broker: Broker, kafka_security: Mapping[str, str]) -> None:
        config = self._config
        mailboxes = config.mailbox
        # First, so that liveness answers during a long restore; readiness waits for the end.
        ops = broker.ops = OpsEndpoint(
            lambda: list(broker.actors),
            broker.is_ready,
            config.metrics_addr,
            config.metrics_port or None,
            access=OpsAccess(
                admin_token(config.ops_admin_token, config.ops_admin_token_file),
                status_needs_token=config.ops_status_auth is OpsStatusAuth.TOKEN,
            ),
            facts=BrokerFacts.of(config, broker.kafka_bootstrap),
        )
        ops.start()
        metrics = ops.metrics
        limits = Limits(
            max_pending_count=config.max_pending_count,
            max_processing_count=config.max_processing_count,
            max_delay_count=config.max_delay_count,
            max_processing_attempts=config.max_processing_attempts,
            processing_deadline_grace_s=config.processing_deadline_grace_sec,
            max_delayed_task_allowed_s=config.max_delayed_task_allowed_sec,
        )
        state: pykka.ActorRef[Any]
        writer: pykka.ActorRef[Any]
        state_client: BlockingStateClient | None = None
        persisted = _Relay()
        if config.store_mode is StoreMode.SQLITE_DIRECT:
            # The comparison design: the file is the state, written on the request path.
            store = DirectStore(
                Path(config.db_path),
                limits,
                lock_timeout_s=config.grpc_state_ask_timeout_ms / 1000,
                busy_timeout_ms=config.store.busy_timeout_ms,
                debug_commit_delay_ms=config.store.debug_commit_delay_ms,
            )
            state = writer = SqliteDirectState.start(
                store, mailboxes.state.to_runtime(), observer=metrics.mailbox
            )
            broker.actors.append(("state", state))
            ops.snapshots.watch(state=state, writer=writer)
            state_client = SqliteDirectStateClient(store)
        else:
            controls, rules_to_state, rule_metrics = _build_controls(config, metrics.registry)
            state = StateActor.start(
                StateConfig(
                    limits=limits,
                    flush_interval_ms=config.flush_interval_ms,
                    flush_max_dirty=config.flush_max_dirty,
                ),
                mailboxes.state.to_runtime(),
                observer=metrics.mailbox,
                claim_observer=FirstClaimMetrics(metrics.registry, config.metrics_max_task_names),
                rules=controls.rules,
                rule_observer=rule_metrics,
            )
            broker.actors.append(("state", state))
            ops.snapshots.watch(state=state)
            _serve_controls(broker, ops, controls, rules_to_state, state)

            writer = SqliteWriter.start(
                WriterConfig(
                    db_path=Path(config.db_path),
                    busy_timeout_ms=config.store.busy_timeout_ms,
                    debug_commit_delay_ms=config.store.debug_commit_delay_ms,
                ),
                state,
                mailbox=mailboxes.writer.to_runtime(),
                persisted_listener=persisted,
                observer=metrics.mailbox,
                flush_observer=metrics.writer,
                name="writer",
            )
            broker.actors.append(("writer", writer))
            ops.snapshots.watch(writer=writer)
            restored = ask(writer, LoadAndRestore(), _RESTORE_TIMEOUT_S)
            logger.info("restored %d activations from %s", restored, config.db_path)
            state.tell(Connect(writer=writer))

        produce_timeout_ms = config.kafka_produce_timeout_ms
        producer = KafkaProducer(
            ProducerConfig(
                bootstrap_servers=broker.kafka_bootstrap,
                delivery_timeout_ms=produce_timeout_ms,
                security=kafka_security,
            )
        )
        heartbeat = Heartbeat()
        upkeep_actor = Upkeep.start(
            UpkeepConfig(
                retry_topic=config.retry_topic,
                deadletter_topic=config.kafka_deadletter_topic,
                interval_ms=config.upkeep_task_interval_ms,
                deadline_reset_skip_after_startup_s=config.upkeep_deadline_reset_skip_after_startup_sec,
                unhealthy_interval_ms=config.upkeep_unhealthy_interval_ms,
                produce_timeout_ms=produce_timeout_ms,
                state_ask_timeout_ms=config.grpc_state_ask_timeout_ms,
                maintenance_interval_s=config.store.maintenance_interval_sec,
                full_vacuum_interval_s=config.store.full_vacuum_interval_sec,
            ),
            state=state,
            producer=producer,
            writer=writer,
            mailbox=mailboxes.upkeep.to_runtime(),
            heartbeat=heartbeat,
            observer=metrics.upkeep,
            mailbox_observer=metrics.mailbox,
        )
        broker.actors.append(("upkeep", upkeep_actor))

        if config.delivery_mode is DeliveryMode.PUSH:
            # Before the consumer: restored pending tasks are pushed while ingest starts.
            pusher = Pusher.start(
                PusherConfig(
                    worker_map=config.worker_map,
                    max_in_flight=config.push.max_in_flight,
                    batch_length=config.fetch.batch_length,
                    timeout_ms=config.push.timeout_ms,
                    lease_ms=config.push.lease_ms,
                    backoff_ms=config.push.backoff_ms,
                    max_backoff_ms=config.push.max_backoff_ms,
                    shared_secrets=config.grpc_shared_secret,
                ),
                state,
                mailboxes.pusher.to_runtime(),
                observer=metrics.pusher,
                mailbox_observer=metrics.mailbox,
            )
            broker.actors.append(("pusher", pusher))

        kafka_silence = KafkaSilence(config.kafka_session_timeout_ms / 1000)
        consumer = KafkaConsumer.start(
            ConsumerConfig(
                bootstrap_servers=broker.kafka_bootstrap,
                topic=config.kafka_topic,
                group_id=config.kafka_consumer_group,
                dlq_topic=config.kafka_deadletter_topic,
                session_timeout_ms=config.kafka_session_timeout_ms,
                # An embedded Kafka is born with this process: nothing on it is old enough
                # to skip, and "latest" would lose what was produced before the group join.
                auto_offset_reset=(
                    "earliest" if broker.embedded_kafka else config.kafka_auto_offset_reset.value
                ),
                batch=BatchLimits(
                    max_len=config.db_insert_batch_max_len,
                    max_bytes=config.db_insert_batch_max_size,
                ),
                max_delayed_task_allowed_s=config.max_delayed_task_allowed_sec,
                security=kafka_security,
            ),
            state,
            KafkaProducer(
                ProducerConfig(
                    broker.kafka_bootstrap,
                    delivery_timeout_ms=produce_timeout_ms,
                    security=kafka_security,
                )
            ),
            mailbox=mailboxes.consumer.to_runtime(),
            observer=metrics.mailbox,
            assigned=broker.consuming,
            silence=kafka_silence,
            name="consumer",
        )
        broker.actors.append(("consumer", consumer))
        ops.snapshots.watch(consumer=consumer)
        ops.snapshots.kafka = kafka_silence
        persisted.target = consumer
        state.tell(Connect(consumer=consumer))

        frontend = GrpcFrontend.start(
            FrontendConfig(
                host=config.grpc_addr,
                port=config.grpc_port,
                max_workers=config.grpc_max_workers,
                max_message_bytes=config.grpc_max_message_bytes,
                state_ask_timeout_ms=config.grpc_state_ask_timeout_ms,
                min_batch_interval_ms=config.grpc_batch_interval_ms,
                batch=config.batch,
                pulls=config.delivery_mode is DeliveryMode.PULL,
                shared_secrets=config.grpc_shared_secret,
                stop_grace_s=config.grpc_shutdown_grace_ms / 1000,
                tls=_tls_files(config),
                max_concurrent_streams=config.grpc_max_concurrent_streams,
                keepalive_min_ping_interval_ms=config.grpc_keepalive_min_ping_interval_ms,
                max_ping_strikes=config.grpc_max_ping_strikes,
            ),
            state,
            mailboxes.frontend.to_runtime(),
            observer=metrics.frontend,
            mailbox_observer=metrics.mailbox,
            state_client=state_client,
        )
        broker.actors.append(("frontend", frontend))
        broker.grpc_port = frontend.proxy().port.get(timeout=10)

        broker.health = HealthMonitor(
            heartbeat,
            frontend,
            unhealthy_after_s=config.upkeep_unhealthy_interval_ms / 1000,
            consuming=broker.consuming,
        )
        broker.health.start()
        broker.health.set_ready(True)
        logger.info(
            "taskbroker started: gRPC %s:%d, Kafka %s (topic %s), SQLite %s, metrics %s; "
            "ready once Kafka assigns the consumer its partitions",
            config.grpc_addr,
            broker.grpc_port,
            broker.kafka_bootstrap,
            config.kafka_topic,
            config.db_path,
            "off" if ops.server is None else f"{config.metrics_addr}:{ops.server.port}",
        )

    # --- watch and stop --------------------------------------------------------------------

    def _watch(self, broker: Broker) -> bool:
        """Wait for a stop request; True when it was an actor dying instead."""
        readiness = ReadinessLog(broker, started_at=time.monotonic())
        while not self._stop_requested.wait(_WATCH_INTERVAL_S):
            dead = [name for name, ref in broker.actors if not ref.is_alive()]
            if dead:
                logger.error(
                    "actor %s stopped unexpectedly (its error is logged above); "
                    "stopping the broker so that it is restarted",
                    ", ".join(dead),
                )
                return True
            readiness.observe(broker.is_ready(), time.monotonic())
        logger.info("stop requested: shutting down")
        return False

    def stop(self, broker: Broker) -> None:
        """Stop in reverse order; every step bounded, every step attempted."""
        deadline = time.monotonic() + self._config.shutdown_timeout_ms / 1000
        if broker.controls is not None:
            broker.controls.stop()
        if broker.health is not None:
            broker.health.set_ready(False)
            broker.health.stop()
        refs = dict(broker.actors)
        # The pusher first: it stops claiming and tells the state which pushes were never
        # acknowledged, while the front end still takes the results of those that were.
        for name in ("pusher", "frontend", "upkeep"):
            _stop_actor(name, refs.get(name), deadline)
        if "consumer" in refs:
            _best_effort(
                "stop consuming", lambda: ask(refs["consumer"], StopConsuming(), _left(deadline))
            )
        # sqlite-direct has no writer: its state commits each ingest itself.
        direct = self._config.store_mode is StoreMode.SQLITE_DIRECT
        if "state" in refs and ("writer" in refs or direct):
            _best_effort("final flush", lambda: _drain(refs["state"], deadline))
        for name in ("consumer", "state", "writer"):
            _stop_actor(name, refs.get(name), deadline)
        if broker.embedded_kafka is not None:
            broker.embedded_kafka.stop()
        # Last: liveness must keep answering while the shutdown runs.
        if broker.ops is not None:
            broker.ops.stop()
        logger.info("taskbroker stopped")

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # tests run the supervisor on a thread; they stop it with request_stop()
            return

        def stop(signum: int, _frame: FrameType | None) -> None:
            logger.info("%s received", signal.Signals(signum).name)
            self.request_stop()

        def dump_stacks(_signum: int, _frame: FrameType | None) -> None:
            pykka.debug.log_thread_tracebacks()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            logger.info("SIGHUP received: reloading the gRPC TLS certificates and runtime rules")
            self.reload_tls()
            self.reload_rules()

        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
            signal.SIGINT: signal.signal(signal.SIGINT, stop),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, dump_stacks),
            signal.SIGHUP: signal.signal(signal.SIGHUP, reload),
        }
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _build_controls(
    config: Config, registry: CollectorRegistry
) -> tuple[Controls, _Relay, RuntimeRuleMetrics]:
    """The incident controls, their metrics, and the relay that tells the state their
    changes once it exists."""
    rule_metrics = RuntimeRuleMetrics(registry)
    rules_to_state = _Relay()
    controls = Controls.of(config, apply=rules_to_state.apply_rules, observer=rule_metrics)
    return controls, rules_to_state, rule_metrics


def _serve_controls(
    broker: Broker, ops: OpsEndpoint, controls: Controls, rules_to_state: _Relay, state: Any
) -> None:
    """Open the incident controls once the state is there: no change of the rules can fall
    between the rules the state started with and the state being there to tell."""
    rules_to_state.target = state
    broker.controls = controls
    ops.add_section("runtime_rules", controls.document)
    ops.add_action(CONTROL_PATH, controls.handle_post)
    controls.start()


def _tls_files(config: Config) -> TlsFiles | None:
    tls = config.tls
    if not tls.cert_file:
        return None
    return TlsFiles(tls.cert_file, tls.key_file, tls.client_ca_file)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


def _drain(state: pykka.ActorRef[Any], deadline: float) -> None:
    while not ask(state, Drain(), _left(deadline)):
        if time.monotonic() > deadline:
            raise ActorUnavailable("the last changes were not flushed before the deadline")
        time.sleep(0.02)


def _best_effort(what: str, step: Callable[[], object]) -> None:
    try:
        step()
    except (BrokerError, pykka.ActorDeadError) as error:
        logger.warning("shutdown: %s failed: %s", what, error)


def _stop_actor(name: str, ref: pykka.ActorRef[Any] | None, deadline: float) -> None:
    if ref is None or not ref.is_alive():
        return
    try:
        ref.stop(timeout=_left(deadline))
    except pykka.Timeout:
        logger.warning("shutdown: %s did not stop in time", name)


def check_database(db_path: Path) -> None:
    """Refuse a database that the writer could not open or lock, naming why: its directory
    is missing, or another broker holds it. The writer takes the lock for good later."""
    if not db_path.parent.is_dir():
        raise StoreError(
            f"db_path: the directory {db_path.parent} of the SQLite store does not exist"
        )
    DatabaseLock(db_path).release()


def check_ports(config: Config) -> None:
    """Refuse a port the broker could not listen on before anything starts, naming its key
    and flag: the likeliest cause is another broker, and the front end's own bind would
    fail later, after the embedded Kafka started, and with grpc's C core printing its own
    error lines first (those still appear if another process takes the port in between)."""
    wanted = {"grpc_port": (config.grpc_addr, config.grpc_port)}
    if config.metrics_port:  # 0 turns the endpoint off
        wanted["metrics_port"] = (config.metrics_addr, config.metrics_port)
    if not config.kafka_cluster:
        wanted["embedded_kafka_port"] = (EMBEDDED_KAFKA_HOST, config.embedded_kafka_port)
    taken: dict[int, str] = {}
    for key, (host, port) in wanted.items():
        if port == 0:  # a free port is picked
            continue
        if port in taken:
            raise ConfigError(f"{taken[port]} and {key} are both {port}; give each its own port")
        taken[port] = key
        _check_port(key, host, port)


def _check_port(key: str, host: str, port: int) -> None:
    flag = "--" + key.replace("_", "-")  # as `taskbroker run` names it
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({key}): {error.strerror}") from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as sock:
        # As the servers themselves do: a port whose last connections linger is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{key} ({flag}): port {port} on {host} is already in use; another "
                    f"taskbroker may be running. Stop it, or choose another port with {flag} "
                    f"or {key}"
                ) from None
            raise ConfigError(
                f"{key} ({flag}): cannot listen on {host}:{port}: {error.strerror}; choose "
                f"another port with {flag} or {key}"
            ) from None
