"""GrpcFrontend: the `sentry_protos.taskbroker.v1.ConsumerService` and gRPC health, answered
from the state actor.

The service is registered on raw bytes (no deserializer, no serializer), for three reasons:
a malformed request is answered INVALID_ARGUMENT by our code instead of grpc's generic
error and traceback; the signature is checked over the bytes exactly as they arrived; and
a task goes out as its stored bytes framed as a response, never parsed and re-serialized.

The server is grpcio's synchronous one with a thread pool: on this machine it served
about half again as many unary calls per second as grpc.aio with the same client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
import pykka
from google.protobuf.message import DecodeError

from actors.activation import get_task_response_bytes
from actors.auth import SignatureCheck
from actors.coalescer import Coalescer
from actors.errors import ActorUnavailable, ConfigError, MailboxFull
from actors.messages import Claim, ClaimBatch, Conclude, ConcludeBatch, ConcludeResult, SetServing
from actors.records import ActivationId, Status
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver, ask
from actors.wire.grpc.health.v1 import health_pb2, health_pb2_grpc
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "sentry_protos.taskbroker.v1.ConsumerService"
GET_TASK: Final = "GetTask"
SET_TASK_STATUS: Final = "SetTaskStatus"
SET_BATCH_ACTIVATION_STATUS: Final = "SetBatchActivationStatus"

NO_PENDING_ACTIVATIONS: Final = "No pending activations"

# The statuses a worker may report; every other value of the wire enum is refused.
_CONCLUSIONS: Final[dict[int, Status]] = {
    pb.TASK_ACTIVATION_STATUS_COMPLETE: Status.COMPLETE,
    pb.TASK_ACTIVATION_STATUS_RETRY: Status.RETRY,
    pb.TASK_ACTIVATION_STATUS_FAILURE: Status.FAILURE,
}

# A Watch stream re-checks that its client is still there at least this often, in case
# grpc's termination callback was missed.
_WATCH_RECHECK_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    host: str = "0.0.0.0"  # a broker serves workers on other hosts
    port: int = 50051
    """0 picks a free port; `GrpcFrontend.port` tells which."""
    max_workers: int = 16
    """Handler threads. More threads mean more GIL contention: on 2 cores a bare grpcio
    server answered more calls with 8 threads than with 32. Each health Watch stream holds
    one thread while it is open."""
    max_message_bytes: int = 10 * 1024 * 1024
    """Both directions; workers accept activations of up to 10 MiB."""
    state_ask_timeout_ms: int = 1000
    shared_secrets: tuple[str, ...] = ()
    """Request signing keys, any of which is accepted; empty turns signing off."""
    coalesce: bool = True
    """Send concurrent claims and conclusions to the state actor in batches. Measured with
    `python -m loadtest grpc` on 2 cores, 16 handler threads: 1,504 cycles/s against 1,147
    with one ask per call (medians of 5 rounds; it won 7 rounds of 8). With 32 threads it
    lost (982 against 1,083): more threads contend for the GIL around one sender."""
    coalesce_max_batch: int = 256
    stop_grace_s: float = 5.0
    """How long calls in progress may finish when the front end stops."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within 0..65535, got {self.port}")
        for key in ("max_workers", "max_message_bytes", "state_ask_timeout_ms"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.coalesce_max_batch < 1:
            raise ConfigError(
                f"coalesce_max_batch must be at least 1, got {self.coalesce_max_batch}"
            )
        if self.stop_grace_s < 0:
            raise ConfigError(f"stop_grace_s must not be negative, got {self.stop_grace_s}")
        if isinstance(self.shared_secrets, str):
            raise ConfigError("shared_secrets must be a list of secrets, not one string")


class FrontendObserver(Protocol):
    """Receives the front end's measurements; called from handler and dispatcher threads,
    so implementations must be thread-safe."""

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One ConsumerService call answered: its method name, status code and duration."""

    def batch_sent(self, kind: str, size: int) -> None:
        """One coalesced ask went to the state actor: "claim" or "conclude", and its size."""


class _SilentObserver:
    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        pass

    def batch_sent(self, kind: str, size: int) -> None:
        pass


# --- Talking to the state actor ----------------------------------------------------------


class StateClient(Protocol):
    """How handlers reach the state actor: one ask per call, or coalesced."""

    def claim(self, claim: Claim) -> bytes | None: ...

    def conclude(self, conclude: Conclude) -> ConcludeResult: ...

    def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class DirectStateClient:
    """One ask per call."""

    def __init__(self, state: pykka.ActorRef[Any], timeout_s: float) -> None:
        self._state = state
        self._timeout_s = timeout_s

    def claim(self, claim: Claim) -> bytes | None:
        answer: bytes | None = ask(self._state, claim, self._timeout_s)
        return answer

    def conclude(self, conclude: Conclude) -> ConcludeResult:
        result: ConcludeResult = ask(self._state, conclude, self._timeout_s)
        return result

    def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]:
        results: Sequence[ConcludeResult] = ask(
            self._state, ConcludeBatch(conclusions), self._timeout_s
        )
        return results

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class CoalescingStateClient(DirectStateClient):
    """Claims and single conclusions from concurrent calls go to the state actor in
    batches; a batch request is already one and goes as it is."""

    def __init__(
        self,
        state: pykka.ActorRef[Any],
        timeout_s: float,
        max_batch: int,
        observer: FrontendObserver,
    ) -> None:
        super().__init__(state, timeout_s)
        self._claims: Coalescer[Claim, bytes | None] = Coalescer(
            "claim",
            self._send_claims,
            max_batch,
            on_batch=lambda size: observer.batch_sent("claim", size),
        )
        self._conclusions: Coalescer[Conclude, ConcludeResult] = Coalescer(
            "conclude",
            self._send_conclusions,
            max_batch,
            on_batch=lambda size: observer.batch_sent("conclude", size),
        )

    def claim(self, claim: Claim) -> bytes | None:
        return self._claims.submit(claim, self._timeout_s)

    def conclude(self, conclude: Conclude) -> ConcludeResult:
        return self._conclusions.submit(conclude, self._timeout_s)

    def stop(self) -> None:
        self._claims.stop()
        self._conclusions.stop()

    def _send_claims(self, claims: tuple[Claim, ...], timeout_s: float) -> Sequence[bytes | None]:
        if len(claims) == 1:
            return (ask(self._state, claims[0], timeout_s),)
        answers: Sequence[bytes | None] = ask(self._state, ClaimBatch(claims), timeout_s)
        return answers

    def _send_conclusions(
        self, conclusions: tuple[Conclude, ...], timeout_s: float
    ) -> Sequence[ConcludeResult]:
        if len(conclusions) == 1:
            return (ask(self._state, conclusions[0], timeout_s),)
        results: Sequence[ConcludeResult] = ask(self._state, ConcludeBatch(conclusions), timeout_s)
        return results


# --- ConsumerService -----------------------------------------------------------------------


class RequestRefused(Exception):
    """A request answered with a non-OK status that is the caller's doing, not the broker's."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


UnaryHandler = Callable[[bytes, grpc.ServicerContext], bytes]


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
        return f"<ConsumerService {type(self._state).__name__} {self._signature!r}>"

    def get_task(self, request: bytes) -> bytes:
        message = _parse(pb.GetTaskRequest, request)
        claim = Claim(application=message.application or None, namespace=message.namespace or None)
        activation = self._state.claim(claim)
        if activation is None:
            raise RequestRefused(grpc.StatusCode.NOT_FOUND, NO_PENDING_ACTIVATIONS)
        return get_task_response_bytes(activation)

    def set_task_status(self, request: bytes) -> bytes:
        conclude = _conclusion(_parse(pb.SetTaskStatusRequest, request), keep_fetch_next=True)
        return get_task_response_bytes(self._state.conclude(conclude).next_task)

    def set_batch_activation_status(self, request: bytes) -> bytes:
        message = _parse(pb.SetBatchActivationStatusRequest, request)
        # Every update is checked before any is applied, so a refused batch changed nothing.
        conclusions = []
        for index, update in enumerate(message.updates):
            try:
                conclusions.append(_conclusion(update, keep_fetch_next=False))
            except RequestRefused as refused:
                raise RequestRefused(refused.code, f"updates[{index}]: {refused.details}") from None
        if conclusions:
            self._state.conclude_all(tuple(conclusions))
        return b""  # SetBatchActivationStatusResponse has no fields

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The grpc method handlers, by method name, on raw bytes."""
        answers: dict[str, Callable[[bytes], bytes]] = {
            GET_TASK: self.get_task,
            SET_TASK_STATUS: self.set_task_status,
            SET_BATCH_ACTIVATION_STATUS: self.set_batch_activation_status,
        }
        return {
            name: grpc.unary_unary_rpc_method_handler(self._unary(name, answer))
            for name, answer in answers.items()
        }

    def _unary(self, method: str, answer: Callable[[bytes], bytes]) -> UnaryHandler:
        path = f"/{SERVICE_NAME}/{method}"
        signature, observer = self._signature, self._observer

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                _authenticate(signature, path, request, context)
                return answer(request)
            except RequestRefused as refused:
                code, details = refused.code, refused.details
            except MailboxFull as error:
                code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
            except ActorUnavailable as error:
                code, details = grpc.StatusCode.UNAVAILABLE, str(error)
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
    signature: SignatureCheck, path: str, request: bytes, context: grpc.ServicerContext
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


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 for the whole server ("") and the ConsumerService, which share one
    status: NOT_SERVING until the broker says it is ready."""

    SERVICES: Final = ("", SERVICE_NAME)

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._serving = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving" if self._serving else "not serving")
        return f"<HealthService {state}>"

    def set_serving(self, serving: bool) -> None:
        with self._changed:
            self._serving = serving
            self._changed.notify_all()

    def close(self) -> None:
        """NOT_SERVING for good; every Watch stream sends that and ends."""
        with self._changed:
            self._serving = False
            self._closed = True
            self._changed.notify_all()

    def Check(  # noqa: N802 - the generated servicer's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status_of(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(  # noqa: N802 - the generated servicer's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        context.add_callback(self._wake_watchers)
        sent: _ServingStatus | None = None
        while context.is_active():
            with self._changed:
                status = self._status_of(request.service)
                if status == sent and not self._closed:
                    self._changed.wait(_WATCH_RECHECK_S)
                    continue
                closed = self._closed
            if status != sent:
                sent = status
                yield health_pb2.HealthCheckResponse(status=status)
            if closed:
                return

    def _status_of(self, service: str) -> _ServingStatus:
        if service not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self._serving:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    def _wake_watchers(self) -> None:
        with self._changed:
            self._changed.notify_all()


# --- The actor ------------------------------------------------------------------------------


class GrpcFrontend(BrokerActor):
    """The grpcio server as an actor: bound in __init__ (a port in use fails the start),
    serving from on_start, stopped with a grace in on_stop. It takes one message,
    `SetServing`, which flips health."""

    def __init__(
        self,
        config: FrontendConfig,
        state: pykka.ActorRef[Any],
        mailbox: MailboxConfig | None = None,
        *,
        observer: FrontendObserver | None = None,
        mailbox_observer: MailboxObserver | None = None,
        state_client: StateClient | None = None,
    ) -> None:
        """`state_client`, when given, replaces the client built from `state` and
        `config.coalesce` (the sqlite-direct design brings its own)."""
        super().__init__("frontend", mailbox or MailboxConfig(size=100), mailbox_observer)
        self._config = config
        observer = observer if observer is not None else _SilentObserver()
        timeout_s = config.state_ask_timeout_ms / 1000
        if state_client is None:
            state_client = (
                CoalescingStateClient(state, timeout_s, config.coalesce_max_batch, observer)
                if config.coalesce
                else DirectStateClient(state, timeout_s)
            )
        self._state_client: StateClient = state_client
        self._health = HealthService()
        service = ConsumerService(
            self._state_client, SignatureCheck(config.shared_secrets), observer
        )
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
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
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._port = self._bind(config.host, config.port)

    def __repr__(self) -> str:
        return f"<GrpcFrontend {self._config.host}:{self._port} {self._health!r}>"

    @property
    def port(self) -> int:
        """The bound port (the chosen one when the config asked for port 0)."""
        return self._port

    def on_start(self) -> None:
        self._state_client.start()
        self._server.start()
        logger.info("serving gRPC on %s:%d", self._config.host, self._port)

    def handle(self, message: object) -> object:
        match message:
            case SetServing(serving):
                self._health.set_serving(serving)
                logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")
            case _:
                raise TypeError(f"frontend got an unknown message: {message!r}")
        return None

    def _bind(self, host: str, port: int) -> int:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise ConfigError(f"port: cannot listen on {address} (in use?): {error}") from None
        if bound == 0:
            raise ConfigError(f"port: cannot listen on {address} (in use?)")
        return int(bound)

    def release(self) -> None:
        # Health first, so Watch streams end and do not hold the grace period open.
        self._health.close()
        self._server.stop(self._config.stop_grace_s).wait(self._config.stop_grace_s + 1.0)
        self._state_client.stop()
