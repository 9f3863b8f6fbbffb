"""GrpcFrontend: the `sentry_protos.taskbroker.v1.ConsumerService` and gRPC health, answered
from the state actor.

The server is grpc.aio, on one event loop in one thread of its own. Every handler runs on
that loop, and the state asks of one round of the loop go to the state actor as one batch
(`actors.batcher`): no thread pool, no hand-off per call. Measured with `python -m loadtest
grpc` (2 cores, 4 client processes of 64 coroutines each): see `FrontendConfig.max_batch`.

The service is registered on raw bytes (no deserializer, no serializer), for three reasons:
a malformed request is answered INVALID_ARGUMENT by our code instead of grpc's generic
error and traceback; the signature is checked over the bytes exactly as they arrived; and
a task goes out as its stored bytes framed as a response, never parsed and re-serialized.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import grpc
import pykka
from google.protobuf.message import DecodeError

from actors.activation import get_task_response_bytes
from actors.auth import SignatureCheck
from actors.batcher import StateBatcher
from actors.errors import ActorUnavailable, ConfigError, MailboxFull
from actors.messages import Claim, Conclude, ConcludeResult, SetServing
from actors.records import ActivationId, Status
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver
from actors.wire.grpc.health.v1 import health_pb2
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "sentry_protos.taskbroker.v1.ConsumerService"
GET_TASK: Final = "GetTask"
SET_TASK_STATUS: Final = "SetTaskStatus"
SET_BATCH_ACTIVATION_STATUS: Final = "SetBatchActivationStatus"

HEALTH_SERVICE_NAME: Final = "grpc.health.v1.Health"

NO_PENDING_ACTIVATIONS: Final = "No pending activations"

# The statuses a worker may report; every other value of the wire enum is refused.
_CONCLUSIONS: Final[dict[int, Status]] = {
    pb.TASK_ACTIVATION_STATUS_COMPLETE: Status.COMPLETE,
    pb.TASK_ACTIVATION_STATUS_RETRY: Status.RETRY,
    pb.TASK_ACTIVATION_STATUS_FAILURE: Status.FAILURE,
}

# Starting and stopping the loop's thread and the server on it.
_LOOP_START_TIMEOUT_S: Final = 10.0

T = TypeVar("T")


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
    """Requests per batch to the state actor. A batch of 1,024 claims takes the state actor
    about 20 ms; callers beyond it wait for the next batch."""
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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within 0..65535, got {self.port}")
        for key in ("max_workers", "max_message_bytes", "state_ask_timeout_ms", "max_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("stop_grace_s", "min_batch_interval_ms"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if isinstance(self.shared_secrets, str):
            raise ConfigError("shared_secrets must be a list of secrets, not one string")


class FrontendObserver(Protocol):
    """Receives the front end's measurements, on the front end's event loop thread."""

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One ConsumerService call answered: its method name, status code and duration."""

    def batch_sent(self, size: int) -> None:
        """One batch of `size` requests went to the state actor."""


class _SilentObserver:
    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        pass

    def batch_sent(self, size: int) -> None:
        pass


# --- Talking to the state ----------------------------------------------------------------


class StateClient(Protocol):
    """How handlers reach the state, from the event loop."""

    async def claim(self, claim: Claim) -> bytes | None: ...

    async def conclude(self, conclude: Conclude) -> ConcludeResult: ...

    async def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]: ...

    def stop(self) -> None:
        """Refuse new requests; called on the loop after the server has stopped."""


class BlockingStateClient(Protocol):
    """A state that answers in the caller's thread, taking its time (the sqlite-direct
    design's transactions)."""

    def claim(self, claim: Claim) -> bytes | None: ...

    def conclude(self, conclude: Conclude) -> ConcludeResult: ...

    def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]: ...


class ActorStateClient:
    """The state actor, asked in batches: one `WorkBatch` per round of the loop."""

    def __init__(self, batcher: StateBatcher) -> None:
        self._batcher = batcher

    def __repr__(self) -> str:
        return f"<ActorStateClient {self._batcher!r}>"

    async def claim(self, claim: Claim) -> bytes | None:
        (answer,) = await self._batcher.ask((claim,))
        return answer  # type: ignore[return-value]  # a Claim is answered with bytes or None

    async def conclude(self, conclude: Conclude) -> ConcludeResult:
        (result,) = await self._batcher.ask((conclude,))
        return result  # type: ignore[return-value]  # a Conclude gets a ConcludeResult

    async def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]:
        return await self._batcher.ask(conclusions)  # type: ignore[return-value]

    def stop(self) -> None:
        self._batcher.stop()


class ThreadedStateClient:
    """A blocking state client run on a thread pool, so that its waits never stall the loop."""

    def __init__(self, blocking: BlockingStateClient, threads: int) -> None:
        self._blocking = blocking
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-state")

    def __repr__(self) -> str:
        return f"<ThreadedStateClient {self._blocking!r}>"

    async def claim(self, claim: Claim) -> bytes | None:
        return await self._run(self._blocking.claim, claim)

    async def conclude(self, conclude: Conclude) -> ConcludeResult:
        return await self._run(self._blocking.conclude, conclude)

    async def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]:
        return await self._run(self._blocking.conclude_all, conclusions)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, call: Callable[[Any], T], argument: object) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, call, argument)


# --- ConsumerService -----------------------------------------------------------------------


class RequestRefused(Exception):
    """A request answered with a non-OK status that is the caller's doing, not the broker's."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


UnaryHandler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class ConsumerService:
    """The three ConsumerService methods on raw bytes; each answer is a serialized response.

    Status codes follow WIRE.md "Semantics". Errors reaching the state actor become
    UNAVAILABLE (no answer in time, actor stopped) or RESOURCE_EXHAUSTED (its mailbox is
    full); both are worth a retry to a worker.
    """

    def __init__(
        self,
        state: StateClient,
        signature: SignatureCheck,
        observer: FrontendObserver | None = None,
    ) -> None:
        self._state = state
        self._signature = signature
        self._observer: FrontendObserver = observer if observer is not None else _SilentObserver()

    def __repr__(self) -> str:
        return f"<ConsumerService {self._state!r} {self._signature!r}>"

    async def get_task(self, request: bytes) -> bytes:
        message = _parse(pb.GetTaskRequest, request)
        claim = Claim(application=message.application or None, namespace=message.namespace or None)
        activation = await self._state.claim(claim)
        if activation is None:
            raise RequestRefused(grpc.StatusCode.NOT_FOUND, NO_PENDING_ACTIVATIONS)
        return get_task_response_bytes(activation)

    async def set_task_status(self, request: bytes) -> bytes:
        conclude = _conclusion(_parse(pb.SetTaskStatusRequest, request), keep_fetch_next=True)
        return get_task_response_bytes((await self._state.conclude(conclude)).next_task)

    async def set_batch_activation_status(self, request: bytes) -> bytes:
        message = _parse(pb.SetBatchActivationStatusRequest, request)
        # Every update is checked before any is applied, so a refused batch changed nothing.
        conclusions = []
        for index, update in enumerate(message.updates):
            try:
                conclusions.append(_conclusion(update, keep_fetch_next=False))
            except RequestRefused as refused:
                raise RequestRefused(refused.code, f"updates[{index}]: {refused.details}") from None
        if conclusions:
            await self._state.conclude_all(tuple(conclusions))
        return b""  # SetBatchActivationStatusResponse has no fields

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The grpc method handlers, by method name, on raw bytes."""
        answers: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
            GET_TASK: self.get_task,
            SET_TASK_STATUS: self.set_task_status,
            SET_BATCH_ACTIVATION_STATUS: self.set_batch_activation_status,
        }
        return {
            name: grpc.unary_unary_rpc_method_handler(self._unary(name, answer))
            for name, answer in answers.items()
        }

    def _unary(self, method: str, answer: Callable[[bytes], Awaitable[bytes]]) -> UnaryHandler:
        path = f"/{SERVICE_NAME}/{method}"
        signature, observer = self._signature, self._observer

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                _authenticate(signature, path, request, context)
                return await answer(request)
            except RequestRefused as refused:
                code, details = refused.code, refused.details
            except MailboxFull as error:
                code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
            except ActorUnavailable as error:
                code, details = grpc.StatusCode.UNAVAILABLE, str(error)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the client went away; nobody to answer
                raise
            except Exception:
                # A bug, not a request's fault: the trace is the point of the log line.
                logger.exception("%s failed", method)
                code, details = grpc.StatusCode.INTERNAL, f"{method} failed in the broker"
            finally:
                observer.handled(method, code, time.perf_counter() - started)
            context.set_code(code)
            context.set_details(details)
            return b""

        return handle


def _authenticate(
    signature: SignatureCheck, path: str, request: bytes, context: grpc.aio.ServicerContext
) -> None:
    # Reading the metadata costs a copy per call: only when signing is on.
    if signature.enabled and not signature.verify(path, request, context.invocation_metadata()):
        raise RequestRefused(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sentry-signature")


def _parse(message_type: Any, request: bytes) -> Any:
    try:
        return message_type.FromString(request)
    except DecodeError:
        raise RequestRefused(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a {message_type.__name__}"
        ) from None


def _conclusion(update: pb.SetTaskStatusRequest, *, keep_fetch_next: bool) -> Conclude:
    if not update.id:
        raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "id is required")
    status = _CONCLUSIONS.get(update.status)
    if status is None:
        raise RequestRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"status must be COMPLETE, RETRY or FAILURE, got {_status_name(update.status)}",
        )
    fetch_next = None
    # In a batch the response has no room for a task: a claim there would strand it.
    if keep_fetch_next and update.HasField("fetch_next_task"):
        fetch = update.fetch_next_task
        fetch_next = Claim(application=fetch.application or None, namespace=fetch.namespace or None)
    return Conclude(
        id=ActivationId(update.id),
        status=status,
        max_attempts=update.max_attempts if update.HasField("max_attempts") else None,
        delay_on_retry_s=update.delay_on_retry if update.HasField("delay_on_retry") else None,
        fetch_next=fetch_next,
    )


def _status_name(value: int) -> str:
    try:
        return str(pb.TaskActivationStatus.Name(value))
    except ValueError:
        return str(value)


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


class GrpcFrontend(BrokerActor):
    """The grpc.aio server as an actor: its event loop runs in a thread of its own; the
    server is bound in __init__ (a port in use fails the start), serves from on_start, and
    stops with a grace in release. It takes one message, `SetServing`, which flips health."""

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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-frontend-loop", daemon=True
        )
        self._thread.start()
        try:
            self._served = self._on_loop(self._serve(state, state_client, observer))
        except BaseException:
            self._stop_loop()
            raise

    def __repr__(self) -> str:
        return f"<GrpcFrontend {self._config.host}:{self._served.port} {self._served.health!r}>"

    @property
    def port(self) -> int:
        """The bound port (the chosen one when the config asked for port 0)."""
        return self._served.port

    def on_start(self) -> None:
        self._on_loop(self._served.server.start())
        logger.info("serving gRPC on %s:%d", self._config.host, self._served.port)

    def handle(self, message: object) -> object:
        match message:
            case SetServing(serving):
                self._loop.call_soon_threadsafe(self._served.health.set_serving, serving)
                logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")
            case _:
                raise TypeError(f"frontend got an unknown message: {message!r}")
        return None

    def release(self) -> None:
        try:
            self._on_loop(self._shut_down(), self._config.stop_grace_s + _LOOP_START_TIMEOUT_S)
        finally:
            self._stop_loop()

    async def _serve(
        self,
        state: pykka.ActorRef[Any],
        blocking: BlockingStateClient | None,
        observer: FrontendObserver | None,
    ) -> _Served:
        config = self._config
        observer = observer if observer is not None else _SilentObserver()
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
        service = ConsumerService(client, SignatureCheck(config.shared_secrets), observer)
        server = grpc.aio.server(
            handlers=[
                grpc.method_handlers_generic_handler(SERVICE_NAME, service.method_handlers())
            ],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # grpc sets SO_REUSEPORT by default, which lets a second broker bind the
                # same port silently and steal half the calls.
                ("grpc.so_reuseport", 0),
            ],
        )
        health = HealthService()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, health.method_handlers()),)
        )
        return _Served(server, _bind(server, config.host, config.port), health, client)

    async def _shut_down(self) -> None:
        served = self._served
        # Health first, so Watch streams end and do not hold the grace period open.
        served.health.close()
        await served.server.stop(self._config.stop_grace_s)
        served.state.stop()

    def _on_loop(self, work: Awaitable[T], timeout_s: float = _LOOP_START_TIMEOUT_S) -> T:
        async def run() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_LOOP_START_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()


def _bind(server: grpc.aio.Server, host: str, port: int) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise ConfigError(f"port: cannot listen on {address} (in use?): {error}") from None
    if bound == 0:
        raise ConfigError(f"port: cannot listen on {address} (in use?)")
    return int(bound)
