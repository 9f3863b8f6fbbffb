"""The worker-facing gRPC services, answered from the state on the front end's event loop:

- `ConsumerService`: `sentry_protos.taskbroker.v1`, one task per call (WIRE.md);
- `TaskBatchService`: ours, `taskbroker_actors.v1`, many tasks per message both ways.

Both are registered on raw bytes (no deserializer, no serializer), for three reasons: a
malformed request is answered INVALID_ARGUMENT by our code instead of grpc's generic error
and traceback; the signature is checked over the bytes exactly as they arrived; and a task
goes out as its stored bytes framed as a response, never parsed and re-serialized.

Status codes are WIRE.md's for both. Errors reaching the state become UNAVAILABLE (no
answer in time, actor stopped) or RESOURCE_EXHAUSTED (its mailbox is full); both are worth
a retry to a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
from google.protobuf.message import DecodeError

from actors.activation import capped_seconds, get_task_response_bytes
from actors.auth import SignatureCheck
from actors.errors import ActorUnavailable, ConfigError, MailboxFull
from actors.messages import Claim, Conclude
from actors.records import ActivationId, Status
from actors.state_client import StateClient
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.taskbroker_actors.v1 import batch_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "sentry_protos.taskbroker.v1.ConsumerService"
GET_TASK: Final = "GetTask"
SET_TASK_STATUS: Final = "SetTaskStatus"
SET_BATCH_ACTIVATION_STATUS: Final = "SetBatchActivationStatus"

BATCH_SERVICE_NAME: Final = "taskbroker_actors.v1.TaskBatchService"
FETCH_TASKS: Final = "FetchTasks"
REPORT_RESULTS: Final = "ReportResults"
REPORT_AND_FETCH: Final = "ReportAndFetch"

NO_PENDING_ACTIVATIONS: Final = "No pending activations"
PUSH_MODE_REFUSAL: Final = "Cannot call while broker is in PUSH mode"

# The statuses a worker may report; every other value of the wire enum is refused.
_CONCLUSIONS: Final[dict[int, Status]] = {
    pb.TASK_ACTIVATION_STATUS_COMPLETE: Status.COMPLETE,
    pb.TASK_ACTIVATION_STATUS_RETRY: Status.RETRY,
    pb.TASK_ACTIVATION_STATUS_FAILURE: Status.FAILURE,
}

# A fetch that found nothing asks again after these pauses, doubling: a task that arrives
# while a worker waits reaches it within the longest pause. Each recheck is one request
# in the loop's next batch to the state actor, not a round trip of its own.
_FIRST_RECHECK_S: Final = 0.005
_LONGEST_RECHECK_S: Final = 0.05


class FrontendObserver(Protocol):
    """Receives the front end's measurements, on the front end's event loop thread."""

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One call answered: its method name, status code and duration."""

    def batch_sent(self, size: int) -> None:
        """One batch of `size` requests went to the state actor."""

    def abused(self, reason: str) -> None:
        """One request refused as a client's abuse, `reason` one of `ABUSE_REASONS`."""


class SilentObserver:
    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        pass

    def batch_sent(self, size: int) -> None:
        pass

    def abused(self, reason: str) -> None:
        pass


SIGNATURE: Final = "signature"
MALFORMED: Final = "malformed"
ABUSE_REASONS: Final = (SIGNATURE, MALFORMED)
"""What no correct worker sends: a bad signature, bytes that are not the request message."""


class RequestRefused(Exception):
    """A request answered with a non-OK status that is the caller's doing, not the broker's."""

    def __init__(self, code: grpc.StatusCode, details: str, abuse: str | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.abuse = abuse
        """One of `ABUSE_REASONS` when no correct client would have sent the request."""


class AbuseStreaks:
    """Logs abusive requests once per streak, never per request: a client that retries a
    bad signature in a loop would otherwise fill the log. A streak of a reason starts with
    one line naming the peer and ends, after `quiet_s` without another, with one line
    counting its requests. Takes `now`, so it is tested without a clock."""

    def __init__(self, quiet_s: float) -> None:
        self._quiet_s = quiet_s
        # reason -> (requests in the streak, its first peer, distinct peers, the last one's time)
        self._open: dict[str, tuple[int, str, set[str], float]] = {}

    def __repr__(self) -> str:
        return f"<AbuseStreaks quiet_s={self._quiet_s} open={sorted(self._open)}>"

    def refused(self, reason: str, peer: str, now: float) -> bool:
        """Counts one refusal; True when it started a streak (and was logged)."""
        streak = self._open.get(reason)
        if streak is None:
            logger.warning(
                "refused a request from %s (%s); further refusals for this reason are "
                "counted and summarised after %.0f s without one",
                peer,
                _ABUSE_WORDS[reason],
                self._quiet_s,
            )
            self._open[reason] = (1, peer, {peer}, now)
            return True
        count, first, peers, _ = streak
        peers.add(peer)
        self._open[reason] = (count + 1, first, peers, now)
        return False

    def end_quiet(self, now: float) -> float | None:
        """Ends the streaks quiet for `quiet_s`, logging each one's count; the seconds until
        the next open one could end, or None when none is open."""
        for reason, (count, first, peers, last) in list(self._open.items()):
            if now - last >= self._quiet_s:
                del self._open[reason]
                logger.warning(
                    "refused %d requests (%s) from %d peer(s) in the streak that %s started",
                    count,
                    _ABUSE_WORDS[reason],
                    len(peers),
                    first,
                )
        if not self._open:
            return None
        return min(last for *_, last in self._open.values()) + self._quiet_s - now


_ABUSE_WORDS: Final = {SIGNATURE: "bad signature", MALFORMED: "malformed request"}


class AbuseWatch:
    """`AbuseStreaks` on the front end's event loop: counts every abusive request in the
    observer and ends streaks with a timer that runs only while one is open."""

    def __init__(self, observer: FrontendObserver, quiet_s: float) -> None:
        self._observer = observer
        self._streaks = AbuseStreaks(quiet_s)
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<AbuseWatch {self._streaks!r}>"

    def refused(self, reason: str, peer: str) -> None:
        self._observer.abused(reason)
        loop = asyncio.get_running_loop()
        if self._streaks.refused(reason, peer, loop.time()) and self._timer is None:
            # A streak just opened, so end_quiet says when the oldest open one may end.
            left_s = self._streaks.end_quiet(loop.time()) or 0.0
            self._timer = loop.call_later(left_s, self._end_quiet)

    def close(self) -> None:
        """Logs the open streaks' counts: a stop should not lose them."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._streaks.end_quiet(float("inf"))

    def _end_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        left_s = self._streaks.end_quiet(loop.time())
        self._timer = None if left_s is None else loop.call_later(left_s, self._end_quiet)


Answer = Callable[[bytes], Awaitable[bytes]]
"""Serialized request in, serialized response out; refusals raise `RequestRefused`."""


def unary_handlers(
    service: str,
    answers: dict[str, Answer],
    signature: SignatureCheck,
    observer: FrontendObserver,
    abuse: AbuseWatch,
) -> grpc.GenericRpcHandler:
    """One service's methods as grpc handlers on raw bytes: signing checked, every outcome
    mapped to its status code and observed."""
    return grpc.method_handlers_generic_handler(
        service,
        {
            method: grpc.unary_unary_rpc_method_handler(
                _handler(f"/{service}/{method}", method, answer, signature, observer, abuse=abuse)
            )
            for method, answer in answers.items()
        },
    )


def _handler(
    path: str,
    method: str,
    answer: Answer,
    signature: SignatureCheck,
    observer: FrontendObserver,
    *,
    abuse: AbuseWatch,
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            _authenticate(signature, path, request, context)
            return await answer(request)
        except RequestRefused as refused:
            code, details = refused.code, refused.details
            if refused.abuse is not None:
                abuse.refused(refused.abuse, context.peer())
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
        raise RequestRefused(
            grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sentry-signature", SIGNATURE
        )


# --- ConsumerService -----------------------------------------------------------------------


class ConsumerService:
    """The three ConsumerService methods; each answer is a serialized response.

    In push delivery (`pulls=False`) workers only report: GetTask is PERMISSION_DENIED,
    as taskbroker answers, and SetTaskStatus never hands out a task.
    """

    def __init__(self, state: StateClient, *, pulls: bool = True) -> None:
        self._state = state
        self._pulls = pulls

    def __repr__(self) -> str:
        return f"<ConsumerService {self._state!r}>"

    def answers(self) -> dict[str, Answer]:
        return {
            GET_TASK: self.get_task,
            SET_TASK_STATUS: self.set_task_status,
            SET_BATCH_ACTIVATION_STATUS: self.set_batch_activation_status,
        }

    async def get_task(self, request: bytes) -> bytes:
        _refuse_pulls_unless(self._pulls)
        message = _parse(pb.GetTaskRequest, request)
        activation = await self._state.claim(_claim(message))
        if activation is None:
            raise RequestRefused(grpc.StatusCode.NOT_FOUND, NO_PENDING_ACTIVATIONS)
        return get_task_response_bytes(activation)

    async def set_task_status(self, request: bytes) -> bytes:
        message = _parse(pb.SetTaskStatusRequest, request)
        conclude = _conclusion(message)
        if self._pulls and message.HasField("fetch_next_task"):
            conclude = _with_fetch_next(conclude, _claim(message.fetch_next_task))
        return get_task_response_bytes((await self._state.conclude(conclude)).next_task)

    async def set_batch_activation_status(self, request: bytes) -> bytes:
        message = _parse(pb.SetBatchActivationStatusRequest, request)
        # In a batch the response has no room for a task: fetch_next_task is ignored, as a
        # claim there would strand the task.
        conclusions = _conclusions(message.updates, "updates")
        if conclusions:
            await self._state.conclude_all(conclusions)
        return b""  # SetBatchActivationStatusResponse has no fields


# --- TaskBatchService ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What one call of the batch service may ask for; larger asks are capped (tasks,
    wait) or refused (results)."""

    max_fetch: int = 256
    """Tasks per fetch. A worker rarely runs more at once; a bigger batch only holds tasks
    back from other workers while they wait in this one's queue."""
    max_results: int = 1024
    max_wait_ms: int = 10_000
    """The longest a fetch waits when nothing is pending."""

    def __post_init__(self) -> None:
        for key in ("max_fetch", "max_results"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")


class TaskBatchService:
    """FetchTasks, ReportResults and ReportAndFetch; each task has the unary API's semantics.

    One call asks the state once for all its results and claims (they travel in the loop's
    next batch to the state actor with every other call's), however many tasks it moves.
    """

    def __init__(self, state: StateClient, limits: BatchLimits, *, pulls: bool = True) -> None:
        self._state = state
        self._limits = limits
        self._pulls = pulls

    def __repr__(self) -> str:
        return f"<TaskBatchService {self._state!r} {self._limits}>"

    def answers(self) -> dict[str, Answer]:
        return {
            FETCH_TASKS: self.fetch_tasks,
            REPORT_RESULTS: self.report_results,
            REPORT_AND_FETCH: self.report_and_fetch,
        }

    async def fetch_tasks(self, request: bytes) -> bytes:
        _refuse_pulls_unless(self._pulls)
        return await self._fetch((), _parse(batch_pb2.FetchTasksRequest, request))

    async def report_results(self, request: bytes) -> bytes:
        message = _parse(batch_pb2.ReportResultsRequest, request)
        conclusions = self._results(message.results)
        if conclusions:
            await self._state.conclude_all(conclusions)
        return b""  # ReportResultsResponse has no fields

    async def report_and_fetch(self, request: bytes) -> bytes:
        _refuse_pulls_unless(self._pulls)
        message = _parse(batch_pb2.ReportAndFetchRequest, request)
        return await self._fetch(self._results(message.results), message.fetch)

    def _results(self, results: Any) -> tuple[Conclude, ...]:
        if len(results) > self._limits.max_results:
            raise RequestRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {self._limits.max_results} results per call, got {len(results)}",
            )
        return _conclusions(results, "results")

    async def _fetch(
        self, conclusions: tuple[Conclude, ...], fetch: batch_pb2.FetchTasksRequest
    ) -> bytes:
        claim = _claim(fetch)
        count = min(fetch.max_tasks or 1, self._limits.max_fetch)
        tasks = await self._state.conclude_and_claim(conclusions, claim, count)
        wait_s = min(fetch.wait_ms, self._limits.max_wait_ms) / 1000
        if not tasks and wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            pause_s = _FIRST_RECHECK_S
            while not tasks and (left_s := deadline - loop.time()) > 0:
                await asyncio.sleep(min(pause_s, left_s))
                pause_s = min(2 * pause_s, _LONGEST_RECHECK_S)
                tasks = await self._state.conclude_and_claim((), claim, count)
        # FetchTasksResponse is field 1 repeated: the framed tasks, one after another.
        return b"".join(get_task_response_bytes(task) for task in tasks)


# --- Requests into messages -------------------------------------------------------------------


def _refuse_pulls_unless(pulls: bool) -> None:
    if not pulls:
        raise RequestRefused(grpc.StatusCode.PERMISSION_DENIED, PUSH_MODE_REFUSAL)


def _parse(message_type: Any, request: bytes) -> Any:
    try:
        return message_type.FromString(request)
    except DecodeError:
        raise RequestRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a {message_type.__name__}",
            MALFORMED,
        ) from None


def _claim(message: Any) -> Claim:
    """The filter of a GetTaskRequest, FetchNextTask or FetchTasksRequest."""
    return Claim(application=message.application or None, namespace=message.namespace or None)


def _conclusions(updates: Iterable[Any], field: str) -> tuple[Conclude, ...]:
    """Every update checked before any is applied, so a refused call changed nothing."""
    conclusions = []
    for index, update in enumerate(updates):
        try:
            conclusions.append(_conclusion(update))
        except RequestRefused as refused:
            raise RequestRefused(refused.code, f"{field}[{index}]: {refused.details}") from None
    return tuple(conclusions)


def _conclusion(update: Any) -> Conclude:
    """A SetTaskStatusRequest or TaskResult (the same fields) as a `Conclude`."""
    if not update.id:
        raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "id is required")
    status = _CONCLUSIONS.get(update.status)
    if status is None:
        raise RequestRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"status must be COMPLETE, RETRY or FAILURE, got {_status_name(update.status)}",
        )
    return Conclude(
        id=ActivationId(update.id),
        status=status,
        max_attempts=update.max_attempts if update.HasField("max_attempts") else None,
        delay_on_retry_s=(
            capped_seconds(update.delay_on_retry) if update.HasField("delay_on_retry") else None
        ),
    )


def _with_fetch_next(conclude: Conclude, claim: Claim) -> Conclude:
    return Conclude(
        conclude.id, conclude.status, conclude.max_attempts, conclude.delay_on_retry_s, claim
    )


def _status_name(value: int) -> str:
    try:
        return str(pb.TaskActivationStatus.Name(value))
    except ValueError:
        return str(value)
