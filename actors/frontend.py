"""GrpcFrontend: the worker-facing gRPC server (`actors.services`) and gRPC health.

The server is grpc.aio, on one event loop in one thread of its own. Every handler runs on
that loop, and the state asks of one round of the loop go to the state actor as one batch
(`actors.batcher`): no thread pool, no hand-off per call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import pykka

from actors.auth import SignatureCheck
from actors.batcher import StateBatcher
from actors.errors import ConfigError
from actors.messages import ReloadTls, SetServing
from actors.runtime import BrokerActor, LoopThread, MailboxConfig, MailboxObserver
from actors.services import (
    BATCH_SERVICE_NAME,
    SERVICE_NAME,
    AbuseWatch,
    BatchLimits,
    ConsumerService,
    FrontendObserver,
    SilentObserver,
    TaskBatchService,
    unary_handlers,
)
from actors.state_client import (
    ActorStateClient,
    BlockingStateClient,
    StateClient,
    ThreadedStateClient,
)
from actors.tls import ReloadableCredentials, TlsFiles
from actors.wire.grpc.health.v1 import health_pb2

logger = logging.getLogger(__name__)

HEALTH_SERVICE_NAME: Final = "grpc.health.v1.Health"

# What a stop may take beyond the calls' grace: stopping the server and its loop.
_SHUT_DOWN_MARGIN_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    host: str = "0.0.0.0"  # a broker serves workers on other hosts
    port: int = 50051
    """0 picks a free port; `GrpcFrontend.port` tells which."""
    max_workers: int = 16
    """Threads for a blocking state client (the sqlite-direct design runs its SQL on them);
    the state actor's calls need none."""
    max_message_bytes: int = 10 * 1024 * 1024
    """Both directions; workers accept activations of up to 10 MiB."""
    state_ask_timeout_ms: int = 1000
    shared_secrets: tuple[str, ...] = ()
    """Request signing keys, any of which is accepted; empty turns signing off."""
    max_batch: int = 1024
    """Requests per batch to the state actor; callers beyond it wait for the next batch. At
    the state actor's rate in `python -m loadtest actors` (about 100,000 claim+result pairs
    a second through the actor), 1,024 requests hold it for roughly 5-10 ms."""
    min_batch_interval_ms: float = 4.0
    """Batches go to the state actor at most this often; a call that finds the front end
    idle for longer goes at once. Each batch costs two thread wake-ups, so under load a
    short wait that gathers more calls saves more than it costs. Measured with 4 client
    processes of 64 worker coroutines on 2 cores (server CPU per call; a bare grpc.aio
    server: 226 us): 0 ms 382 us (2.2 calls per batch), 1 ms 330, 2 ms 299, 4 ms 258 (16
    per batch), 8 ms 232 (32 per batch). 4 ms: most of the gain, at most 4 ms added to a
    call."""
    stop_grace_s: float = 5.0
    """How long calls in progress may finish when the front end stops."""
    batch: BatchLimits = field(default_factory=BatchLimits)
    """Limits of the batched worker API (TaskBatchService)."""
    pulls: bool = True
    """False in push delivery: workers only report results; the broker hands tasks out
    by pushing them."""
    tls: TlsFiles | None = None
    """None: plaintext, for local use."""
    max_concurrent_streams: int = 1024
    """Calls in progress at once on one connection. A worker process multiplexes all its
    concurrent calls on one connection: at 100, `loadtest e2e` with 256 coroutines in one
    process got 121 tasks/s and 29,659 refused calls, against 3,630 tasks/s and none at
    1,000. 1,024 still bounds what one client can hold open."""
    keepalive_min_ping_interval_ms: int = 10_000
    """Pings closer together than this are strikes; grpc's own default (5 min) would
    strike a worker whose channel pings every 30 s or so to keep NATs open."""
    max_ping_strikes: int = 2
    """Strikes before the connection is closed (GOAWAY ENHANCE_YOUR_CALM)."""
    abuse_quiet_s: float = 60.0
    """A streak of abusive requests (`services.AbuseStreaks`) ends after this long
    without one, with a line counting it."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within 0..65535, got {self.port}")
        for key in (
            "max_workers",
            "max_message_bytes",
            "state_ask_timeout_ms",
            "max_batch",
            "max_concurrent_streams",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in (
            "stop_grace_s",
            "min_batch_interval_ms",
            "keepalive_min_ping_interval_ms",
            "max_ping_strikes",
            "abuse_quiet_s",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if isinstance(self.shared_secrets, str):
            raise ConfigError("shared_secrets must be a list of secrets, not one string")


# --- Health ----------------------------------------------------------------------------------

_ServingStatus = health_pb2.HealthCheckResponse.ServingStatus


class HealthService:
    """grpc.health.v1 for the whole server ("") and the ConsumerService, which share one
    status: NOT_SERVING until the broker says it is ready. Every method runs on the front
    end's event loop."""

    SERVICES: Final = ("", SERVICE_NAME)

    def __init__(self) -> None:
        self._serving = False
        self._closed = False
        # Replaced at every change: a Watch stream waits on the one current when it last sent.
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving" if self._serving else "not serving")
        return f"<HealthService {state}>"

    def set_serving(self, serving: bool) -> None:
        self._serving = serving
        self._announce()

    def close(self) -> None:
        """NOT_SERVING for good; every Watch stream sends that and ends."""
        self._serving = False
        self._closed = True
        self._announce()

    async def Check(  # noqa: N802 - the generated servicer's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status_of(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 - the generated servicer's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        sent: _ServingStatus | None = None
        while True:
            changed = self._changed
            status = self._status_of(request.service)
            if status != sent:
                sent = status
                yield health_pb2.HealthCheckResponse(status=status)
            if self._closed:
                return
            await changed.wait()

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.Check, request.FromString, response.SerializeToString
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.Watch, request.FromString, response.SerializeToString
            ),
        }

    def _status_of(self, service: str) -> _ServingStatus:
        if service not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self._serving:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    def _announce(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


# --- The actor ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Served:
    """What runs on the loop: built there, because grpc.aio binds to the loop it starts on."""

    server: grpc.aio.Server
    port: int
    health: HealthService
    state: StateClient
    abuse: AbuseWatch


class GrpcFrontend(BrokerActor):
    """The grpc.aio server as an actor: its event loop runs in a thread of its own; the
    server is bound in __init__ (a port in use fails the start), serves from on_start, and
    stops with a grace in release. It takes two messages: `SetServing`, which flips health,
    and `ReloadTls`, which re-reads the certificate files (the listener stays open)."""

    def __init__(
        self,
        config: FrontendConfig,
        state: pykka.ActorRef[Any],
        mailbox: MailboxConfig | None = None,
        *,
        observer: FrontendObserver | None = None,
        mailbox_observer: MailboxObserver | None = None,
        state_client: BlockingStateClient | None = None,
    ) -> None:
        """`state_client`, when given, answers instead of the state actor (the sqlite-direct
        design brings its own), on `config.max_workers` threads."""
        super().__init__("frontend", mailbox or MailboxConfig(size=100), mailbox_observer)
        self._config = config
        self._tls = None if config.tls is None else ReloadableCredentials(config.tls)
        self._loop = LoopThread("grpc-frontend-loop")
        try:
            self._served = self._loop.run(self._serve(state, state_client, observer))
        except BaseException:
            self._loop.stop()
            raise

    def __repr__(self) -> str:
        scheme = "plaintext" if self._tls is None else repr(self._tls)
        return (
            f"<GrpcFrontend {self._config.host}:{self._served.port} {scheme} "
            f"{self._served.health!r}>"
        )

    @property
    def port(self) -> int:
        """The bound port (the chosen one when the config asked for port 0)."""
        return self._served.port

    def on_start(self) -> None:
        self._loop.run(self._served.server.start())
        logger.info(
            "serving gRPC on %s:%d (%s)",
            self._config.host,
            self._served.port,
            _scheme(self._config.tls),
        )

    def handle(self, message: object) -> object:
        match message:
            case SetServing(serving):
                self._loop.call_soon(self._served.health.set_serving, serving)
                logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")
            case ReloadTls():
                if self._tls is None:
                    logger.info("TLS reload asked for, but gRPC is plaintext (no tls.cert_file)")
                else:
                    self._tls.reload()
            case _:
                raise TypeError(f"frontend got an unknown message: {message!r}")
        return None

    def release(self) -> None:
        try:
            self._loop.run(self._shut_down(), self._config.stop_grace_s + _SHUT_DOWN_MARGIN_S)
        finally:
            self._loop.stop()

    async def _serve(
        self,
        state: pykka.ActorRef[Any],
        blocking: BlockingStateClient | None,
        observer: FrontendObserver | None,
    ) -> _Served:
        config = self._config
        observer = observer if observer is not None else SilentObserver()
        client: StateClient
        if blocking is None:
            batcher = StateBatcher(
                state,
                asyncio.get_running_loop(),
                config.state_ask_timeout_ms / 1000,
                config.max_batch,
                min_interval_s=config.min_batch_interval_ms / 1000,
                on_batch=observer.batch_sent,
            )
            client = ActorStateClient(batcher)
        else:
            client = ThreadedStateClient(blocking, config.max_workers)
        signature = SignatureCheck(config.shared_secrets)
        abuse = AbuseWatch(observer, config.abuse_quiet_s)
        server = grpc.aio.server(
            handlers=[
                unary_handlers(
                    SERVICE_NAME,
                    ConsumerService(client, pulls=config.pulls).answers(),
                    signature,
                    observer,
                    abuse,
                ),
                unary_handlers(
                    BATCH_SERVICE_NAME,
                    TaskBatchService(client, config.batch, pulls=config.pulls).answers(),
                    signature,
                    observer,
                    abuse,
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # grpc sets SO_REUSEPORT by default, which lets a second broker bind the
                # same port silently and steal half the calls.
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    config.keepalive_min_ping_interval_ms,
                ),
                # Workers hold idle channels between polls; their pings then keep the
                # connection (and a NAT's mapping) alive, and are not strikes.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
            ],
        )
        health = HealthService()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, health.method_handlers()),)
        )
        port = _bind(server, config.host, config.port, self._tls)
        return _Served(server, port, health, client, abuse)

    async def _shut_down(self) -> None:
        served = self._served
        # Health first, so Watch streams end and do not hold the grace period open.
        served.health.close()
        await served.server.stop(self._config.stop_grace_s)
        served.abuse.close()
        served.state.stop()


def _scheme(tls: TlsFiles | None) -> str:
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.mutual else "TLS"


def _bind(server: grpc.aio.Server, host: str, port: int, tls: ReloadableCredentials | None) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # grpc's error says only that the bind failed (its C core logs the reason itself);
    # a port in use, by another broker most likely, is the usual one.
    problem = (
        f"grpc_port (--grpc-port): cannot listen on {address}; another taskbroker may be "
        "running there. Stop it, or choose another port with --grpc-port or grpc_port"
    )
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.credentials)
    except RuntimeError:
        raise ConfigError(problem) from None
    if bound == 0:
        raise ConfigError(problem)
    return int(bound)
