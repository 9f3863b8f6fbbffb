"""The front end's way to the state actor: the state asks of every gRPC call that arrives in
one round of the event loop go as one `WorkBatch`, and its answer comes back as one
callback onto the loop.

Every handler of the front end runs on one asyncio loop. A handler queues its requests here
and awaits a future. While no batch is in flight, the first request schedules a send for
the end of the loop's current round, so every call of that round joins it; while a batch is
in flight, later requests wait for its answer and go together in the next one. Per batch
that is one wake-up of the state actor and one of the loop (`call_soon_threadsafe`),
whatever the number of calls: grpcio's thread pool, the coalescer's per-call slots and
pykka's per-ask futures, each a thread switch per call, are gone.

One batch in flight at a time, not one per round: while the state actor works, the next
batch grows instead of queueing behind it in the mailbox, so the state actor's mailbox
holds at most one message from the front end, whatever the load.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.errors import ActorUnavailable
from actors.messages import Claim, Conclude, WorkAnswer, WorkBatch
from actors.runtime import ask_with_callback

logger = logging.getLogger(__name__)

Request = Claim | Conclude


@dataclass(slots=True)
class _Waiting:
    """One caller's requests and the future its handler awaits."""

    requests: tuple[Request, ...]
    future: asyncio.Future[Sequence[WorkAnswer]]
    deadline: float  # loop time


@dataclass(slots=True)
class _Flight:
    """A batch sent to the state actor and not yet answered."""

    callers: list[_Waiting]
    timer: asyncio.TimerHandle | None = field(default=None)


class StateBatcher:
    """Sends the requests of concurrent handlers to the state actor in `WorkBatch`es, one
    batch in flight at a time. Every method runs on the loop's thread."""

    def __init__(
        self,
        state: pykka.ActorRef[Any],
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        max_batch: int,
        *,
        min_interval_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must not be negative, got {min_interval_s}")
        self._state = state
        self._loop = loop
        self._timeout_s = timeout_s
        self._max_batch = max_batch
        self._min_interval_s = min_interval_s
        self._on_batch = on_batch
        self._last_sent = -math.inf
        self._queue: deque[_Waiting] = deque()
        self._in_flight: _Flight | None = None
        self._send_scheduled = False
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("in flight" if self._in_flight else "idle")
        return f"<StateBatcher {state}, {len(self._queue)} waiting, max_batch={self._max_batch}>"

    @property
    def waiting(self) -> int:
        """Callers queued for the next batch."""
        return len(self._queue)

    async def ask(self, requests: tuple[Request, ...]) -> Sequence[WorkAnswer]:
        """The state actor's answers to `requests`, in order.

        Raises `ActorUnavailable` when no answer came within the timeout (the requests may
        still be applied after that, as with a timed-out ask), `MailboxFull` when the state
        actor's mailbox refused the batch, or what the state actor raised for it.
        """
        if self._stopped:
            raise ActorUnavailable("the front end is stopping")
        future: asyncio.Future[Sequence[WorkAnswer]] = self._loop.create_future()
        self._queue.append(_Waiting(requests, future, self._loop.time() + self._timeout_s))
        self._schedule_send()
        return await future

    def stop(self) -> None:
        """Refuse new requests; callers still queued get `ActorUnavailable`. A batch in
        flight is still answered."""
        self._stopped = True
        error = ActorUnavailable("the front end is stopping")
        while self._queue:
            _fail(self._queue.popleft(), error)

    def _schedule_send(self) -> None:
        """Send what waits at the end of this round, or once `min_interval_s` has passed
        since the last batch went."""
        if self._in_flight is not None or self._send_scheduled or not self._queue:
            return
        self._send_scheduled = True
        wait_s = self._last_sent + self._min_interval_s - self._loop.time()
        if wait_s > 0:
            self._loop.call_later(wait_s, self._send_next)
        else:
            self._loop.call_soon(self._send_next)

    def _send_next(self) -> None:
        self._send_scheduled = False
        if self._in_flight is not None or not self._queue:
            return
        now = self._loop.time()
        self._last_sent = now
        callers: list[_Waiting] = []
        size = 0
        while self._queue and (
            not callers or size + len(self._queue[0].requests) <= self._max_batch
        ):
            waiting = self._queue.popleft()
            if waiting.future.done():  # the call was cancelled: its client went away
                continue
            if waiting.deadline <= now:
                # Not sent: a claim now would hand a task to a caller that has given up.
                _fail(waiting, ActorUnavailable("the state actor's answer came too late"))
                continue
            callers.append(waiting)
            size += len(waiting.requests)
        if not callers:
            return
        flight = _Flight(callers)
        self._in_flight = flight
        latest = max(waiting.deadline for waiting in callers)
        flight.timer = self._loop.call_later(latest - now, self._timed_out, flight)
        if self._on_batch is not None:
            self._on_batch(size)
        requests = tuple(request for waiting in callers for request in waiting.requests)
        ask_with_callback(self._state, WorkBatch(requests), self._answer_from(flight))

    def _answer_from(self, flight: _Flight) -> Callable[[Any, BaseException | None], None]:
        loop = self._loop

        def on_answer(answers: Any, error: BaseException | None) -> None:
            # On the state actor's thread, or on the loop's when the mailbox refused.
            try:
                loop.call_soon_threadsafe(self._answered, flight, answers, error)
            except RuntimeError:  # the loop is closed: the front end has stopped
                logger.debug("a state answer arrived after the front end stopped")

        return on_answer

    def _answered(
        self, flight: _Flight, answers: Sequence[WorkAnswer] | None, error: BaseException | None
    ) -> None:
        if flight.timer is not None:
            flight.timer.cancel()
        if answers is not None and len(answers) != sum(len(w.requests) for w in flight.callers):
            error = RuntimeError(f"{len(answers)} answers for a batch of another size")
        if error is not None:
            for waiting in flight.callers:
                _fail(waiting, error)
        elif answers is not None:
            start = 0
            for waiting in flight.callers:
                end = start + len(waiting.requests)
                if not waiting.future.done():
                    waiting.future.set_result(answers[start:end])
                start = end
        if self._in_flight is flight:
            self._in_flight = None
            self._schedule_send()

    def _timed_out(self, flight: _Flight) -> None:
        error = ActorUnavailable(
            f"the state actor did not answer within {self._timeout_s * 1000:.0f} ms"
        )
        for waiting in flight.callers:
            _fail(waiting, error)
        if self._in_flight is flight:
            # A stuck state actor gets the next batch: the mailbox bounds what piles up.
            self._in_flight = None
            self._schedule_send()


def _fail(waiting: _Waiting, error: BaseException) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(error)
