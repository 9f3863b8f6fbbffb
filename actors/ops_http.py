"""The operations HTTP endpoint: Prometheus metrics, health, readiness and status.

- `GET /metrics`: the registry in the Prometheus text format.
- `GET /healthz`: 200 while the process answers HTTP at all (liveness).
- `GET /readyz`: 200 while the broker is ready (restored, consuming, upkeep ticking:
  what gRPC health reports), 503 otherwise (readiness). The body says what is wrong: a
  silent Kafka leaves the broker ready (it serves what it holds, and pulling it out of
  service would stop that too) but is named in the body.
- `GET /status`: JSON (see `status_document`); with `Accept: text/html`, the HTML page.
- `GET /status.html`: the operator's screen (`actors.status_page`): rates, charts of the
  last 15 minutes, every actor's mailbox, the broker's settings; it loads nothing from
  anywhere and runs no script, so it renders on a host without a network.
- `GET /status/history`: JSON, the samples behind the charts (`actors.ops_history`).

Access (`OpsAccess`): the probes and the scrape are always open; /status is open or needs
the admin token (`ops_status_auth`); every method other than GET and HEAD needs the admin
token before it is routed at all, so an action added later cannot forget the check. The
token travels as `Authorization: Bearer <token>`; a refusal is 401 with
`WWW-Authenticate: Bearer` and never repeats what was presented.

Every answer is built from values read without a message to any actor (mailbox counters,
`ActorSnapshots`), so the endpoint answers while an actor is busy or stuck.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, cast

import pykka
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from actors.config import Config
from actors.errors import ConfigError
from actors.messages import ConsumerStats
from actors.metrics import ActorSnapshots, BrokerCollector, KafkaContact, Metrics
from actors.ops_history import HISTORY_INTERVAL_S, History, HistoryRecorder, Reading
from actors.runtime import mailbox_stats_of
from actors.status_page import render_html

logger = logging.getLogger(__name__)

_JSON: Final = "application/json"
_HTML: Final = "text/html; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"

_STATUS_PATHS: Final = frozenset({"/status", "/status.html", "/status/history"})
_READ_PATHS: Final = frozenset({"/metrics", "/healthz", "/readyz"}) | _STATUS_PATHS
MIN_ADMIN_TOKEN_CHARS: Final = 16
"""Shorter than this, a token is guessable by a client that may retry as often as it likes."""

StatusDocument = dict[str, Any]
Section = Callable[[], Mapping[str, Any]]
"""A provider of one more section of the status document (see `OpsEndpoint.add_section`)."""
Action = Callable[[bytes, str], tuple[HTTPStatus, bytes]]
"""An admin action (see `OpsEndpoint.add_action`): the request body and the caller's address
in, a status and a JSON body out. The admin token was checked before it is called."""


def admin_token(token: str, token_file: str) -> str | None:
    """The admin token from its value or its file (`ops_admin_token`,
    `ops_admin_token_file`), None when neither is set; surrounding whitespace is trimmed
    because an editor's final newline is not part of the token."""
    if token_file:
        try:
            token = Path(token_file).read_text()
        except OSError as error:
            raise ConfigError(
                f"ops_admin_token_file: cannot read {token_file}: {error.strerror or error}"
            ) from None
        source = f"ops_admin_token_file ({token_file})"
    else:
        source = "ops_admin_token"
    token = token.strip()
    if not token and not token_file:
        return None
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            f"{source}: the token must be at least {MIN_ADMIN_TOKEN_CHARS} characters"
        )
    return token


@dataclass(frozen=True, slots=True)
class OpsAccess:
    """Who may do what on the ops port. Without a token, /status may still be open, and
    anything but GET or HEAD is refused to everyone."""

    token: str | None = field(default=None, repr=False)
    status_needs_token: bool = False

    def __post_init__(self) -> None:
        if self.status_needs_token and self.token is None:
            raise ConfigError('ops_status_auth: "token" needs an admin token')

    def admits(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header carries the admin token."""
        if self.token is None or authorization is None:
            return False
        scheme, _, presented = authorization.partition(" ")
        # compare_digest: a comparison that stops at the first wrong byte tells a patient
        # client how much of its guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self.token.encode()
        )


@dataclass(frozen=True, slots=True)
class BrokerFacts:
    """What the status page says about the process itself; fixed for its life."""

    version: str
    started_at: float
    kafka_bootstrap: str
    kafka_topic: str
    kafka_consumer_group: str
    db_path: str
    store_mode: str
    delivery_mode: str
    mailbox_push_timeout_ms: Mapping[str, int] = field(default_factory=dict)
    """Each actor's `push_timeout_ms`: how long a sender to a full `block` mailbox waits."""

    @classmethod
    def of(
        cls, config: Config, kafka_bootstrap: str, clock: Callable[[], float] = time.time
    ) -> BrokerFacts:
        """From the configuration, and the bootstrap servers in use (the embedded Kafka's
        when none is configured)."""
        mailboxes = config.mailbox
        return cls(
            version=_version(),
            started_at=clock(),
            kafka_bootstrap=kafka_bootstrap,
            kafka_topic=config.kafka_topic,
            kafka_consumer_group=config.kafka_consumer_group,
            db_path=config.db_path,
            store_mode=config.store_mode.value,
            delivery_mode=config.delivery_mode.value,
            mailbox_push_timeout_ms={
                name: getattr(mailboxes, name).push_timeout_ms
                for name in type(mailboxes).__dataclass_fields__
            },
        )

    def to_json(self, now: float) -> dict[str, Any]:
        facts = asdict(self)
        return {
            "version": facts.pop("version"),
            "uptime_s": max(now - self.started_at, 0.0),
            **facts,
        }


def _version() -> str:
    try:
        return importlib.metadata.version("taskbroker-actors")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def kafka_lag(stats: ConsumerStats) -> int | None:
    """Messages of the assigned partitions not yet committed, over those this process has
    committed for (see `taskbroker_kafka_consumer_lag_messages`); None before any."""
    lags = [
        max(high - stats.committed[partition], 0)
        for partition, high in stats.high_watermarks.items()
        if partition in stats.committed
    ]
    return sum(lags) if lags else None


def status_document(
    actors: Sequence[tuple[str, pykka.ActorRef[Any]]],
    snapshots: ActorSnapshots,
    ready: bool,
    clock: Callable[[], float] = time.time,
    *,
    facts: BrokerFacts | None = None,
    history: History | None = None,
    sections: Mapping[str, Section] | None = None,
) -> StatusDocument:
    """What /status answers, as plain JSON-able values:

    - `ready` (bool), `generated_at` (Unix seconds);
    - `actors`: one entry per actor in start order, `{"name", "alive", "mailbox": {"name",
      "size", "policy", "depth", "high_water", "overflows"}}`;
    - `counts_by_status`: activations held by the state actor, by lowercase status name
      (empty until the state first answered);
    - `headline`: a flat mapping of the numbers an operator looks at first; a number whose
      actor has not answered yet is absent;
    - `snapshot_age_s`: how old the state, consumer and writer numbers are;
    - `broker` (with `facts`): version, uptime, Kafka and database, mailbox push timeouts;
    - `rates` (with `history`, from its second reading on): per second over the last
      interval, `ingested_per_s`, `claims_per_s`, `results_per_s`, `flushes_per_s`, and
      `flush_ms`, `kafka_lag`;
    - one more key per entry of `sections`, its provider's answer.
    """
    now = clock()
    entries: list[dict[str, Any]] = []
    for name, ref in actors:
        entry: dict[str, Any] = {"name": name, "alive": ref.is_alive()}
        try:
            stats = mailbox_stats_of(ref)
        except TypeError:
            entry["mailbox"] = None
        else:
            entry["mailbox"] = {
                "name": stats.name,
                "size": stats.size,
                "policy": stats.policy.value,
                "depth": stats.depth,
                "high_water": stats.high_water,
                "overflows": stats.overflows,
            }
        entries.append(entry)

    counts: dict[str, int] = {}
    headline: dict[str, float | int | bool] = {}
    if snapshots.state is not None:
        state = snapshots.state.value
        counts = {status.name.lower(): n for status, n in sorted(state.by_status.items())}
        oldest = state.oldest_pending_added_at
        headline["oldest_pending_age_s"] = 0.0 if oldest is None else max(now - oldest, 0.0)
        headline["dirty_records"] = state.dirty
        headline["flush_outstanding"] = state.flush_outstanding
        headline["ingest_paused"] = state.ingest_paused
        headline["held_by_pause"] = state.held_pending
        headline["killswitch_dropped"] = sum(state.killed.values())
        headline["demoted_forwarded"] = state.demoted_forwarded
        for result, n in sorted(state.claims.items()):
            headline[f"claims_{result}"] = n
        for outcome, n in sorted(state.conclusions.items()):
            headline[f"conclusions_{outcome}"] = n
    if snapshots.consumer is not None:
        consumer = snapshots.consumer.value
        headline["kafka_consumed"] = consumer.consumed
        headline["kafka_ingested"] = consumer.ingested
        headline["kafka_decode_failures"] = sum(consumer.decode_failures.values())
        headline["kafka_assigned_partitions"] = len(consumer.assigned)
        headline["kafka_paused_partitions"] = len(consumer.paused)
        lag = kafka_lag(consumer)
        if lag is not None:
            headline["kafka_lag_messages"] = lag
    if snapshots.kafka is not None:
        headline["kafka_reachable"] = snapshots.kafka.answering()
        headline["kafka_silence_s"] = snapshots.kafka.silent_s()
    if snapshots.store is not None:
        headline["store_db_bytes"] = snapshots.store.value.db_bytes
        headline["store_wal_bytes"] = snapshots.store.value.wal_bytes
    document: StatusDocument = {
        "ready": ready,
        "generated_at": now,
        "actors": entries,
        "counts_by_status": counts,
        "headline": headline,
        "snapshot_age_s": {name: round(age, 3) for name, age in snapshots.ages_s().items()},
    }
    document.update(_more_sections(now, facts, history, sections or {}))
    return document


def _more_sections(
    now: float,
    facts: BrokerFacts | None,
    history: History | None,
    sections: Mapping[str, Section],
) -> StatusDocument:
    more: StatusDocument = {}
    if facts is not None:
        more["broker"] = facts.to_json(now)
    latest = None if history is None else history.latest()
    if latest is not None:
        more["rates"] = {
            "ingested_per_s": latest.ingested_per_s,
            "claims_per_s": latest.claims_per_s,
            "results_per_s": latest.results_per_s,
            "flushes_per_s": latest.flushes_per_s,
            "flush_ms": latest.flush_ms,
            "kafka_lag": latest.kafka_lag,
        }
    for name, provide in sections.items():
        more[name] = dict(provide())
    return more


def read_counters(
    actors: Sequence[tuple[str, pykka.ActorRef[Any]]],
    snapshots: ActorSnapshots,
    metrics: Metrics,
    clock: Callable[[], float] = time.time,
) -> Reading:
    """One reading for the history: the actors' numbers asked afresh (one snapshot round,
    bounded by its ask timeout), so the rates divide by the time they were read at."""
    snapshots.refresh()
    state = None if snapshots.state is None else snapshots.state.value
    consumer = None if snapshots.consumer is None else snapshots.consumer.value
    flushes, flush_seconds = metrics.writer.flush_totals()
    depth: dict[str, int] = {}
    for name, ref in actors:
        try:
            depth[name] = mailbox_stats_of(ref).depth
        except TypeError:
            continue  # not a broker actor: it has no mailbox counters
    return Reading(
        at=clock(),
        ingested=None if consumer is None else consumer.ingested,
        claims=None if state is None else state.claims.get("hit", 0),
        results=None if state is None else sum(state.conclusions.values()),
        flushes=flushes,
        flush_seconds=flush_seconds,
        kafka_lag=None if consumer is None else kafka_lag(consumer),
        depth=depth,
        waits=metrics.mailbox.waits(),
    )


def readiness_note(kafka: KafkaContact | None) -> str:
    """What /readyz adds to "ready" or "not ready": empty while nothing is wrong."""
    if kafka is None or kafka.answering():
        return ""
    return (
        f"Kafka has not answered for {kafka.silent_s():.0f} s: serving the tasks held, "
        "consuming and committing nothing until it answers"
    )


class OpsServer:
    """The endpoint on a stdlib `ThreadingHTTPServer`, served from a daemon thread.

    The port is bound in the constructor, so a port in use fails the broker's start; port 0
    picks a free one (`port` tells which).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        status: Callable[[], StatusDocument],
        ready: Callable[[], bool],
        *,
        access: OpsAccess = OpsAccess(),
        history: History | None = None,
        note: Callable[[], str] = str,
    ) -> None:
        handler = _handler_class(registry, status, ready, access, note, history=history)
        server_class = _IPv6Server if ":" in host else _Server
        try:
            self._server = server_class((host, port), handler)
        except OSError as error:
            raise ConfigError(
                f"metrics_port: cannot listen on {host}:{port}: {error.strerror or error}"
            ) from None
        self._server.actions = {}
        self._host = host
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="ops-http"
        )
        self._thread.daemon = True

    def __repr__(self) -> str:
        state = "serving" if self._thread.is_alive() else "idle"
        return f"<OpsServer {self._host}:{self.port} {state}>"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def add_action(self, path: str, action: Action) -> None:
        if path in _READ_PATHS or path in self._server.actions:
            raise ValueError(f"the ops port has a route {path!r} already")
        self._server.actions[path] = action

    @property
    def url(self) -> str:
        """The base URL, with a loopback host when bound to every interface."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        logger.info("serving metrics and status on %s:%d", self._host, self.port)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop serving and close the socket. Requests in progress run on daemon threads
        and are not waited for beyond `timeout_s`."""
        if self._thread.is_alive():
            # shutdown() waits for serve_forever's loop, which checks every poll interval.
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            stopper.join(timeout_s)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("the ops HTTP server did not stop within %.1f s", timeout_s)
        self._server.server_close()


class OpsEndpoint:
    """Everything the supervisor wires for operations, built before the first actor so
    that /healthz answers during a long restore: the registry with every metric, the
    observers to hand to the actors, the snapshot poller, and the HTTP server.

    `port` None builds the metrics and observers but serves nothing (the configuration's
    `metrics_port = 0`); a number binds at once (0: a free port). While it serves, a thread
    reads the broker's counters every `history_interval_s` for the status page's charts.
    """

    def __init__(
        self,
        actors: Callable[[], Sequence[tuple[str, pykka.ActorRef[Any]]]],
        ready: Callable[[], bool],
        host: str,
        port: int | None,
        snapshot_interval_s: float = 1.0,
        *,
        access: OpsAccess = OpsAccess(),
        facts: BrokerFacts | None = None,
        history_interval_s: float = HISTORY_INTERVAL_S,
    ) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.snapshots = ActorSnapshots(interval_s=snapshot_interval_s)
        self.registry.register(BrokerCollector(actors, self.snapshots, ready))
        self.history = History(interval_s=history_interval_s)
        self._recorder = HistoryRecorder(
            self.history, lambda: read_counters(actors(), self.snapshots, self.metrics)
        )
        self._sections: dict[str, Section] = {}
        self.server: OpsServer | None = None
        if port is not None:
            self.server = OpsServer(
                host,
                port,
                self.registry,
                status=lambda: status_document(
                    actors(),
                    self.snapshots,
                    ready(),
                    facts=facts,
                    history=self.history,
                    sections=self._sections,
                ),
                history=self.history,
                ready=ready,
                access=access,
                note=lambda: readiness_note(self.snapshots.kafka),
            )

    def __repr__(self) -> str:
        return f"<OpsEndpoint {self.server!r}>"

    @property
    def url(self) -> str | None:
        return None if self.server is None else self.server.url

    def add_section(self, name: str, provide: Section) -> None:
        """One more section of the status document, `name`: `provide()` is called for each
        answer and must not wait on an actor. The page draws it as a table of its own."""
        if name in self._sections:
            raise ValueError(f"the status document has a section {name!r} already")
        self._sections[name] = provide

    def add_action(self, path: str, action: Action) -> None:
        """An admin action: a POST to `path` with the admin token calls `action`."""
        if self.server is not None:
            self.server.add_action(path, action)

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
            self.snapshots.start()
            self._recorder.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self._recorder.stop()
            self.snapshots.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client must not hold the process at exit
    allow_reuse_address = True  # a restart must not wait out TIME_WAIT on the port
    actions: dict[str, Action]
    """POST paths to their admin actions (`OpsEndpoint.add_action`)."""


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _handler_class(
    registry: CollectorRegistry,
    status: Callable[[], StatusDocument],
    ready: Callable[[], bool],
    access: OpsAccess,
    note: Callable[[], str],
    *,
    history: History | None,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "taskbroker-ops"
        _head = False

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in _STATUS_PATHS and access.status_needs_token and not self._admitted():
                return
            try:
                self._route(path)
            except Exception:
                logger.exception("ops endpoint %s failed", path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _TEXT, b"internal error\n")

        def do_HEAD(self) -> None:
            self._head = True
            self.do_GET()

        def __getattr__(self, name: str) -> Any:
            # The stdlib looks up `do_<METHOD>` for each request: every method but GET and
            # HEAD lands here, so none reaches a route before the token is checked.
            if name.startswith("do_"):
                return self._change_state
            raise AttributeError(name)

        def _change_state(self) -> None:
            if not self._admitted():
                return
            path = self.path.split("?", 1)[0]
            action = cast(_Server, self.server).actions.get(path)
            if action is not None and self.command == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                code, body = action(self.rfile.read(length), self.client_address[0])
                self._send(code, _JSON, body)
                return
            if path in _READ_PATHS:
                self._send(HTTPStatus.METHOD_NOT_ALLOWED, _TEXT, b"read only\n", allow="GET, HEAD")
            else:
                self._send(HTTPStatus.NOT_FOUND, _TEXT, b"not found\n")

        def _admitted(self) -> bool:
            """Whether the request carries the admin token; if not, answers 401."""
            if access.admits(self.headers.get("Authorization")):
                return True
            self._send(
                HTTPStatus.UNAUTHORIZED,
                _TEXT,
                b"the admin token is required (Authorization: Bearer <token>)\n",
                authenticate='Bearer realm="taskbroker-ops"',
            )
            return False

        def _route(self, path: str) -> None:
            if path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                self._send(HTTPStatus.OK, _TEXT, b"ok\n")
            elif path == "/readyz":
                code, word = (
                    (HTTPStatus.OK, "ready")
                    if ready()
                    else (HTTPStatus.SERVICE_UNAVAILABLE, "not ready")
                )
                text = note()
                self._send(
                    code, _TEXT, f"{word}: {text}\n".encode() if text else f"{word}\n".encode()
                )
            elif path == "/status.html" or (path == "/status" and self._wants_html()):
                samples = [] if history is None else history.samples()
                self._send(HTTPStatus.OK, _HTML, render_html(status(), samples).encode())
            elif path == "/status/history" and history is not None:
                self._send(HTTPStatus.OK, _JSON, json.dumps(history.to_json()).encode())
            elif path == "/status":
                body = json.dumps(status(), indent=2, sort_keys=False).encode()
                self._send(HTTPStatus.OK, _JSON, body)
            else:
                self._send(HTTPStatus.NOT_FOUND, _TEXT, b"not found\n")

        def _wants_html(self) -> bool:
            accept = self.headers.get("Accept", "")
            return "text/html" in accept and _JSON not in accept

        def _send(
            self,
            code: HTTPStatus,
            content_type: str,
            body: bytes,
            allow: str | None = None,
            authenticate: str | None = None,
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if allow is not None:
                self.send_header("Allow", allow)
            if authenticate is not None:
                self.send_header("WWW-Authenticate", authenticate)
            self.end_headers()
            if not self._head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes and probes arrive every few seconds: not worth a line each at INFO.
            logger.debug("%s %s", self.address_string(), format % args)

    return Handler
