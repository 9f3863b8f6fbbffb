"""A client of our batched worker API (`taskbroker_actors.v1.TaskBatchService`), sync and
asyncio, and a worker loop on each.

Each request is serialized once and sent as those bytes, so that a signature covers exactly
what the broker receives (it checks the bytes as they arrived, `actors.auth`), and a retry
sends the same bytes with the same signature.

UNAVAILABLE and RESOURCE_EXHAUSTED are retried with a bounded exponential backoff: the
broker answers them when its state actor is slow, stopped or full (`actors.services`), and
every call is safe to repeat. A fetch repeated after a lost answer leaves the tasks of the
lost answer PROCESSING until their deadline, as a dead worker's would; a report repeated
changes nothing, since a result for a task already concluded, or unknown, is answered OK.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from actors.auth import SIGNATURE_METADATA_KEY, sign
from actors.errors import BrokerError, RecoverableError
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1.taskbroker_pb2 import TaskActivation
from actors.wire.taskbroker_actors.v1 import batch_pb2

logger = logging.getLogger(__name__)

_RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# The broker bounds what it sends (its max_message_bytes); grpc's default receive limit of
# 4 MiB would refuse a full batch of large tasks after the broker had claimed them.
_CHANNEL_OPTIONS: Final = (("grpc.max_receive_message_length", -1),)

DEFAULT_WAIT_MS: Final = 200
"""The worker loop's long poll. It also bounds how long a finished result waits to be
reported while the loop waits for tasks: results and the next fetch share one call."""


class Outcome(Enum):
    """What a worker reports for a task; the values are the wire enum's."""

    COMPLETE = pb.TASK_ACTIVATION_STATUS_COMPLETE
    RETRY = pb.TASK_ACTIVATION_STATUS_RETRY
    """A new activation goes to the retry topic while the task's attempts last."""
    FAILURE = pb.TASK_ACTIVATION_STATUS_FAILURE
    """No retry: dead-lettered or dropped, as the task's `on_attempts_exceeded` says."""


@dataclass(frozen=True, slots=True)
class Result:
    """One task's outcome; `max_attempts` and `delay_on_retry_s`, when set, replace those of
    the task's retry state (WIRE.md, RETRY)."""

    id: str
    status: Outcome
    max_attempts: int | None = None
    delay_on_retry_s: int | None = None

    def to_wire(self) -> batch_pb2.TaskResult:
        return batch_pb2.TaskResult(
            id=self.id,
            status=self.status.value,
            max_attempts=self.max_attempts,
            delay_on_retry=self.delay_on_retry_s,
        )


class CallFailed(BrokerError):
    """A call to the batch service ended with a status other than OK: at once for a
    refusal (INVALID_ARGUMENT, UNAUTHENTICATED, ...), or after its last attempt."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int) -> None:
        super().__init__(f"{method}: {code.name} after {attempts} attempt(s): {details}")
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts


class RetriesExhausted(CallFailed, RecoverableError):
    """UNAVAILABLE or RESOURCE_EXHAUSTED on every attempt: the same call may succeed later."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts per call, and the pauses between them: `base_delay_s`, doubling, at most
    `max_delay_s`. The defaults ride out about 5 s of outage (a broker restarting), then
    raise, so a worker whose broker is gone for good finds out."""

    attempts: int = 8
    """Calls in all, the first included; 1 never retries."""
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay_s < 0:
            raise ValueError(f"base_delay_s must not be negative, got {self.base_delay_s}")
        if self.max_delay_s < self.base_delay_s:
            raise ValueError(
                f"max_delay_s must be at least base_delay_s ({self.base_delay_s}), "
                f"got {self.max_delay_s}"
            )

    def delay_s(self, failed_attempts: int) -> float:
        """The pause after the `failed_attempts`-th failure."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempts - 1)))


@dataclass(frozen=True, slots=True)
class _Method:
    name: str
    path: str
    parse_response: Callable[[bytes], Any]


def _method(name: str, response: type[Message]) -> _Method:
    service = batch_pb2.DESCRIPTOR.services_by_name["TaskBatchService"]
    return _Method(name, f"/{service.full_name}/{name}", response.FromString)


_FETCH_TASKS: Final = _method("FetchTasks", batch_pb2.FetchTasksResponse)
_REPORT_RESULTS: Final = _method("ReportResults", batch_pb2.ReportResultsResponse)
_REPORT_AND_FETCH: Final = _method("ReportAndFetch", batch_pb2.FetchTasksResponse)
_METHODS: Final = (_FETCH_TASKS, _REPORT_RESULTS, _REPORT_AND_FETCH)


class _Calls:
    """What both clients share: the requests, their signatures, the retry decision."""

    def __init__(
        self, target: str, shared_secret: str | None, retry: RetryPolicy, call_timeout_s: float
    ) -> None:
        if shared_secret == "":
            raise ValueError("shared_secret is empty; an empty key signs nothing")
        if call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be positive, got {call_timeout_s}")
        self._target = target
        self._secret = shared_secret
        self.retry = retry
        self._call_timeout_s = call_timeout_s

    def __repr__(self) -> str:
        # Never the secret itself: reprs end up in logs.
        signing = "signed" if self._secret is not None else "unsigned"
        return f"{self._target} {signing} {self.retry}"

    def metadata(self, method: _Method, payload: bytes) -> tuple[tuple[str, str], ...] | None:
        if self._secret is None:
            return None
        return ((SIGNATURE_METADATA_KEY, sign(self._secret, method.path, payload)),)

    def timeout_s(self, wait_ms: int) -> float:
        # A fetch may be answered only after its wait: the deadline covers it.
        return self._call_timeout_s + wait_ms / 1000

    def failure(self, method: _Method, error: grpc.RpcError, attempt: int) -> CallFailed | None:
        """What to raise after a failed attempt, or None when the call is worth another."""
        code, details = error.code(), error.details() or ""
        if code not in _RETRYABLE:
            return CallFailed(method.name, code, details, attempt)
        if attempt >= self.retry.attempts:
            return RetriesExhausted(method.name, code, details, attempt)
        return None


def _fetch_request(
    max_tasks: int, wait_ms: int, application: str | None, namespace: str | None
) -> batch_pb2.FetchTasksRequest:
    return batch_pb2.FetchTasksRequest(
        application=application or "",
        namespace=namespace or "",
        max_tasks=max_tasks,
        wait_ms=wait_ms,
    )


def _wire_results(results: Iterable[Result]) -> list[batch_pb2.TaskResult]:
    return [result.to_wire() for result in results]


class BatchClient:
    """Blocking calls to TaskBatchService, on a channel of the caller's or on one of its own
    to `target` (closed by `close`). Safe to share between threads, as grpc channels are."""

    def __init__(
        self,
        target: grpc.Channel | str,
        *,
        shared_secret: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        call_timeout_s: float = 10.0,
    ) -> None:
        """`shared_secret` signs every request; `call_timeout_s` is each attempt's deadline,
        beyond the wait a fetch asks for."""
        self._owns_channel = isinstance(target, str)
        if isinstance(target, str):
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self._channel = target
        self._calls = _Calls(str(target), shared_secret, retry, call_timeout_s)
        # No request serializer: the bytes go out as they were signed.
        self._send = {
            method.name: self._channel.unary_unary(
                method.path, response_deserializer=method.parse_response
            )
            for method in _METHODS
        }

    def __repr__(self) -> str:
        return f"<BatchClient {self._calls!r}>"

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if the client opened it; a caller's channel stays open."""
        if self._owns_channel:
            self._channel.close()

    def fetch(
        self,
        max_tasks: int,
        wait_ms: int,
        application: str | None = None,
        namespace: str | None = None,
    ) -> list[TaskActivation]:
        """Up to `max_tasks` tasks, each now PROCESSING; none when nothing was pending
        within `wait_ms` (the broker caps both)."""
        request = _fetch_request(max_tasks, wait_ms, application, namespace)
        response: batch_pb2.FetchTasksResponse = self._call(_FETCH_TASKS, request, wait_ms)
        return list(response.tasks)

    def report(self, results: Iterable[Result]) -> None:
        """Apply every result; a refused call (INVALID_ARGUMENT) applies none of them."""
        request = batch_pb2.ReportResultsRequest(results=_wire_results(results))
        self._call(_REPORT_RESULTS, request, wait_ms=0)

    def report_and_fetch(
        self,
        results: Iterable[Result],
        max_tasks: int,
        wait_ms: int,
        application: str | None = None,
        namespace: str | None = None,
    ) -> list[TaskActivation]:
        """`report` then `fetch`, in one round trip."""
        request = batch_pb2.ReportAndFetchRequest(
            results=_wire_results(results),
            fetch=_fetch_request(max_tasks, wait_ms, application, namespace),
        )
        response: batch_pb2.FetchTasksResponse = self._call(_REPORT_AND_FETCH, request, wait_ms)
        return list(response.tasks)

    def _call(self, method: _Method, request: Message, wait_ms: int) -> Any:
        payload = request.SerializeToString()
        metadata = self._calls.metadata(method, payload)
        timeout_s = self._calls.timeout_s(wait_ms)
        attempt = 1
        while True:
            try:
                return self._send[method.name](payload, timeout=timeout_s, metadata=metadata)
            except grpc.RpcError as error:
                failure = self._calls.failure(method, error, attempt)
                if failure is not None:
                    raise failure from None
            time.sleep(self._calls.retry.delay_s(attempt))
            attempt += 1


class AsyncBatchClient:
    """`BatchClient` for asyncio, on a `grpc.aio` channel of the caller's or one of its own
    (closed by `close`). Use it from the event loop it was created on."""

    def __init__(
        self,
        target: grpc.aio.Channel | str,
        *,
        shared_secret: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        call_timeout_s: float = 10.0,
    ) -> None:
        self._owns_channel = isinstance(target, str)
        if isinstance(target, str):
            self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self._channel = target
        self._calls = _Calls(str(target), shared_secret, retry, call_timeout_s)
        self._send = {
            method.name: self._channel.unary_unary(
                method.path, response_deserializer=method.parse_response
            )
            for method in _METHODS
        }

    def __repr__(self) -> str:
        return f"<AsyncBatchClient {self._calls!r}>"

    async def __aenter__(self) -> AsyncBatchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def fetch(
        self,
        max_tasks: int,
        wait_ms: int,
        application: str | None = None,
        namespace: str | None = None,
    ) -> list[TaskActivation]:
        request = _fetch_request(max_tasks, wait_ms, application, namespace)
        response: batch_pb2.FetchTasksResponse = await self._call(_FETCH_TASKS, request, wait_ms)
        return list(response.tasks)

    async def report(self, results: Iterable[Result]) -> None:
        request = batch_pb2.ReportResultsRequest(results=_wire_results(results))
        await self._call(_REPORT_RESULTS, request, wait_ms=0)

    async def report_and_fetch(
        self,
        results: Iterable[Result],
        max_tasks: int,
        wait_ms: int,
        application: str | None = None,
        namespace: str | None = None,
    ) -> list[TaskActivation]:
        request = batch_pb2.ReportAndFetchRequest(
            results=_wire_results(results),
            fetch=_fetch_request(max_tasks, wait_ms, application, namespace),
        )
        response: batch_pb2.FetchTasksResponse = await self._call(
            _REPORT_AND_FETCH, request, wait_ms
        )
        return list(response.tasks)

    async def _call(self, method: _Method, request: Message, wait_ms: int) -> Any:
        payload = request.SerializeToString()
        metadata = self._calls.metadata(method, payload)
        timeout_s = self._calls.timeout_s(wait_ms)
        attempt = 1
        while True:
            try:
                return await self._send[method.name](payload, timeout=timeout_s, metadata=metadata)
            except grpc.RpcError as error:
                failure = self._calls.failure(method, error, attempt)
                if failure is not None:
                    raise failure from None
            await asyncio.sleep(self._calls.retry.delay_s(attempt))
            attempt += 1


# --- Worker loops ------------------------------------------------------------------------------

Handler = Callable[[TaskActivation], Outcome | Result]
AsyncHandler = Callable[[TaskActivation], Awaitable[Outcome | Result]]


def run_worker(
    client: BatchClient,
    handle: Handler,
    *,
    concurrency: int,
    stop: threading.Event,
    application: str | None = None,
    namespace: str | None = None,
    batch: int | None = None,
    wait_ms: int = DEFAULT_WAIT_MS,
) -> None:
    """Run `handle` on every task fetched, on up to `concurrency` threads, until `stop` is set.

    Tasks are fetched only for free slots (at most `batch` per call, default `concurrency`),
    so none waits here while its processing deadline runs; the results finished meanwhile
    go with the next fetch. `handle` returns an `Outcome` or a `Result`; an exception in it
    reports RETRY. Once `stop` is set (noticed within `wait_ms`), the tasks already fetched
    run to the end and their results are reported before this returns. A call that still
    fails after the client's retries raises `CallFailed`; the results not yet reported are
    lost, and their tasks come back at their processing deadline, as a dead worker's would.
    """
    most = _fetch_size(concurrency, batch)
    results: list[Result] = []
    running: set[Future[Result]] = set()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="batch-worker") as pool:
        while not stop.is_set():
            results += _finished(running)
            free = concurrency - len(running)
            if not free:
                # Set or not, `stop` waits for these tasks anyway.
                wait(running, return_when=FIRST_COMPLETED)
                continue
            tasks = client.report_and_fetch(
                results, min(free, most), wait_ms, application=application, namespace=namespace
            )
            results = []
            running.update(pool.submit(_run, handle, task) for task in tasks)
    results += _finished(running)
    if results:
        client.report(results)


async def run_worker_async(
    client: AsyncBatchClient,
    handle: AsyncHandler,
    *,
    concurrency: int,
    stop: asyncio.Event,
    application: str | None = None,
    namespace: str | None = None,
    batch: int | None = None,
    wait_ms: int = DEFAULT_WAIT_MS,
) -> None:
    """`run_worker` with coroutines: up to `concurrency` calls of `handle` at once, on the
    running event loop. Cancelling this cancels them; their tasks come back at their
    processing deadline."""
    most = _fetch_size(concurrency, batch)
    results: list[Result] = []
    running: set[asyncio.Task[Result]] = set()
    async with asyncio.TaskGroup() as group:
        while not stop.is_set():
            results += _finished(running)
            free = concurrency - len(running)
            if not free:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            tasks = await client.report_and_fetch(
                results, min(free, most), wait_ms, application=application, namespace=namespace
            )
            results = []
            running.update(group.create_task(_run_async(handle, task)) for task in tasks)
    results += _finished(running)
    if results:
        await client.report(results)


def _fetch_size(concurrency: int, batch: int | None) -> int:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return batch or concurrency


class _Running(Protocol):
    def done(self) -> bool: ...
    def result(self) -> Result: ...


R = TypeVar("R", bound=_Running)


def _finished(running: set[R]) -> list[Result]:
    """The results of the finished ones, which leave `running`."""
    done = {task for task in running if task.done()}
    running -= done
    return [task.result() for task in done]


def _run(handle: Handler, task: TaskActivation) -> Result:
    try:
        return _as_result(task, handle(task))
    except Exception:
        return _crashed(task)


async def _run_async(handle: AsyncHandler, task: TaskActivation) -> Result:
    try:
        return _as_result(task, await handle(task))
    except Exception:
        return _crashed(task)


def _as_result(task: TaskActivation, outcome: Outcome | Result) -> Result:
    return outcome if isinstance(outcome, Result) else Result(task.id, outcome)


def _crashed(task: TaskActivation) -> Result:
    """The result of a handler that raised, logged with its traceback.

    RETRY rather than FAILURE: the task's own retry state then decides (another attempt
    while its max_attempts last, then its on_attempts_exceeded), so a transient error, or a
    bug fixed by the next deploy, loses no task, and a task that always raises still ends
    dead-lettered or dropped instead of looping.
    """
    logger.exception("task %s (%s) raised; reporting RETRY", task.id, task.taskname)
    return Result(task.id, Outcome.RETRY)
