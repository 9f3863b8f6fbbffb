"""The actor runtime: a bounded mailbox plugged into pykka's inbox hook, the base class
every broker actor derives from, and a ticker that drives periodic work.

pykka's own inbox is an unbounded `queue.Queue`. A `queue.Queue(maxsize)` would bound it,
but then `ref.stop()` and `ref.ask(timeout=...)` hang in `put` while the box is full.
`BoundedMailbox` never does: stop messages bypass the bound, and a sender waits at most
the configured push timeout before it gets `MailboxFull`.
"""

from __future__ import annotations

import abc
import asyncio
import gc
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pykka
from pykka._envelope import Envelope
from pykka.messages import _ActorStop

from actors.errors import ActorUnavailable, MailboxFull

if TYPE_CHECKING:
    from pykka._types import OptExcInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A ticker blocked in `tell` on a full BLOCK mailbox needs up to the push timeout to
# notice it was stopped; the margin covers thread scheduling on a loaded machine.
_TICKER_JOIN_MARGIN_S = 1.0


class Essential:
    """A message that bypasses every mailbox bound, as stop messages do.

    For messages whose loss would break an invariant (a lost `FlushDone` leaves the state's
    one outstanding flush open forever; a lost resume leaves ingest paused) and whose
    senders bound their own rate. Load-driven messages never are.
    """

    __slots__ = ()


class MailboxPolicy(StrEnum):
    """What a full mailbox does with one more message."""

    BLOCK = "block"
    """The sender waits up to the push timeout for room, then gets `MailboxFull`."""
    FAIL = "fail"
    """The sender gets `MailboxFull` at once."""
    DROP_NEWEST = "drop_newest"
    """The new message is discarded; an asker gets `MailboxFull` on its future."""
    DROP_OLDEST = "drop_oldest"
    """The oldest waiting message is discarded for the new one; its asker gets `MailboxFull`."""


@dataclass(frozen=True, slots=True)
class MailboxConfig:
    """One actor's mailbox bound and overflow policy."""

    size: int = 10_000
    policy: MailboxPolicy = MailboxPolicy.BLOCK
    push_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"mailbox size must be at least 1, got {self.size}")
        # A policy read from a config file arrives as its string value.
        try:
            policy = MailboxPolicy(self.policy)
        except ValueError:
            raise ValueError(
                f"mailbox policy must be one of {[p.value for p in MailboxPolicy]}, "
                f"got {self.policy!r}"
            ) from None
        object.__setattr__(self, "policy", policy)  # the frozen dataclass's own idiom
        # An infinite timeout would bring back the hang this mailbox exists to prevent.
        if not math.isfinite(self.push_timeout_s) or self.push_timeout_s < 0:
            raise ValueError(
                f"mailbox push_timeout_s must be a finite number >= 0, got {self.push_timeout_s}"
            )


@dataclass(frozen=True, slots=True)
class MailboxStats:
    """A snapshot of one mailbox's counters, for /status and metrics.

    `depth` and `high_water` count stop messages too (they bypass the bound, so both may
    exceed `size` by the stops waiting). `overflows` counts messages refused or dropped;
    a BLOCK sender that found room within its push timeout is not an overflow.
    """

    name: str
    size: int
    policy: MailboxPolicy
    depth: int
    high_water: int
    overflows: int


class MailboxObserver(Protocol):
    """Receives every mailbox event, from the sender's and from the actor's threads alike,
    so implementations must be thread-safe. Calls are made outside the mailbox's lock.
    """

    def enqueued(self, actor: str, depth: int) -> None: ...

    def overflowed(self, actor: str, policy: MailboxPolicy) -> None: ...

    def dequeued(self, actor: str, message_type: str, waited_s: float, depth: int) -> None: ...

    def handled(self, actor: str, message_type: str, seconds: float) -> None: ...


class _SilentObserver:
    """Stands in when no observer is wired, so the hot paths need no `None` checks."""

    def enqueued(self, actor: str, depth: int) -> None:
        pass

    def overflowed(self, actor: str, policy: MailboxPolicy) -> None:
        pass

    def dequeued(self, actor: str, message_type: str, waited_s: float, depth: int) -> None:
        pass

    def handled(self, actor: str, message_type: str, seconds: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Queued:
    envelope: Envelope[Any]
    enqueued_at: float  # time.monotonic(), for the time-in-mailbox measurement


class _Admission(Enum):
    """What `put` decided under the lock; the consequences run after it is released."""

    APPENDED = "appended"
    EVICTED_OLDEST = "evicted_oldest"
    DROPPED_NEWEST = "dropped_newest"
    REFUSED = "refused"
    CLOSED = "closed"


_ADMISSION_WHEN_FULL = {
    MailboxPolicy.FAIL: _Admission.REFUSED,
    MailboxPolicy.DROP_NEWEST: _Admission.DROPPED_NEWEST,
    MailboxPolicy.DROP_OLDEST: _Admission.EVICTED_OLDEST,
}


class BoundedMailbox:
    """A pykka actor inbox with a bound and an overflow policy.

    It satisfies pykka's inbox protocol: `put(envelope)` from any sender's thread,
    `get()` (blocking) and `empty()` from the actor's thread.
    """

    def __init__(
        self, name: str, config: MailboxConfig, observer: MailboxObserver | None = None
    ) -> None:
        self._name = name
        self._config = config
        self._observer: MailboxObserver = observer if observer is not None else _SilentObserver()
        self._queue: deque[_Queued] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._high_water = 0
        self._overflows = 0
        self._closed = False

    def __repr__(self) -> str:
        stats = self.stats()
        return (
            f"<BoundedMailbox {stats.name} {stats.depth}/{stats.size} "
            f"policy={stats.policy.value} overflows={stats.overflows}>"
        )

    @property
    def config(self) -> MailboxConfig:
        return self._config

    def put(self, envelope: Envelope[Any], /) -> None:
        """Append `envelope`, or apply the overflow policy when the box is full.

        Raises `MailboxFull` (BLOCK after the push timeout, FAIL at once) and
        `pykka.ActorDeadError` for a `tell` to an actor whose mailbox is closed. Dropped
        or evicted asks, and asks to a closed mailbox, learn it through their future.
        """
        evicted: Envelope[Any] | None = None
        depth = 0
        with self._lock:
            admission = self._admit(envelope)
            if admission is _Admission.EVICTED_OLDEST:
                evicted = self._evict_oldest()
                if evicted is None:  # only stop messages queued, and those are never evicted
                    admission = _Admission.DROPPED_NEWEST
            if admission in (_Admission.APPENDED, _Admission.EVICTED_OLDEST):
                depth = self._append(envelope)
            if admission not in (_Admission.APPENDED, _Admission.CLOSED):
                self._overflows += 1

        if admission is _Admission.CLOSED:
            self._reject_closed(envelope)
            return
        if admission is not _Admission.APPENDED:
            self._observer.overflowed(self._name, self._config.policy)
        if admission is _Admission.REFUSED:
            raise self._full("refused")
        if admission is _Admission.DROPPED_NEWEST:
            self._fail_ask(envelope, "dropped")
            return
        if evicted is not None:
            self._fail_ask(evicted, "evicted to make room")
        self._observer.enqueued(self._name, depth)

    def get(self) -> Envelope[Any]:
        """Take the oldest envelope, waiting for one. Only the actor's own loop calls this,
        and it is pykka's contract that it waits as long as the actor has nothing to do.
        """
        with self._lock:
            self._not_empty.wait_for(lambda: self._queue)
            queued = self._queue.popleft()
            depth = len(self._queue)
            self._not_full.notify()
        message_type = type(queued.envelope.message).__name__
        waited_s = time.monotonic() - queued.enqueued_at
        self._observer.dequeued(self._name, message_type, waited_s, depth)
        return queued.envelope

    def empty(self) -> bool:
        with self._lock:
            return not self._queue

    def close(self) -> None:
        """Refuse every later message: the actor is gone and will never read them.

        Senders waiting for room wake up and learn the actor is dead, instead of slipping
        a message into a box that nobody drains. What is already queued stays for
        pykka's teardown, which fails the waiting asks with `ActorDeadError`.
        """
        with self._lock:
            self._closed = True
            self._not_full.notify_all()

    def stats(self) -> MailboxStats:
        with self._lock:
            return MailboxStats(
                name=self._name,
                size=self._config.size,
                policy=self._config.policy,
                depth=len(self._queue),
                high_water=self._high_water,
                overflows=self._overflows,
            )

    def _admit(self, envelope: Envelope[Any]) -> _Admission:
        """Decide the envelope's fate; called with the lock held (BLOCK waits on it)."""
        if self._closed:
            return _Admission.CLOSED
        if isinstance(envelope.message, _ActorStop | Essential) or self._has_room():
            return _Admission.APPENDED
        if self._config.policy is MailboxPolicy.BLOCK:
            self._not_full.wait_for(
                lambda: self._closed or self._has_room(), timeout=self._config.push_timeout_s
            )
            if self._closed:
                return _Admission.CLOSED
            return _Admission.APPENDED if self._has_room() else _Admission.REFUSED
        return _ADMISSION_WHEN_FULL[self._config.policy]

    def _has_room(self) -> bool:
        return len(self._queue) < self._config.size

    def _append(self, envelope: Envelope[Any]) -> int:
        self._queue.append(_Queued(envelope, time.monotonic()))
        depth = len(self._queue)
        self._high_water = max(self._high_water, depth)
        self._not_empty.notify()
        return depth

    def _evict_oldest(self) -> Envelope[Any] | None:
        for index, queued in enumerate(self._queue):
            if not isinstance(queued.envelope.message, _ActorStop | Essential):
                del self._queue[index]
                return queued.envelope
        return None

    def _full(self, what: str) -> MailboxFull:
        return MailboxFull(
            f"message {what}: mailbox of {self._name} is full "
            f"(size {self._config.size}, policy {self._config.policy.value})"
        )

    def _fail_ask(self, envelope: Envelope[Any], what: str) -> None:
        if envelope.reply_to is not None:
            error = self._full(what)
            envelope.reply_to.set_exception(exc_info=(MailboxFull, error, None))

    def _reject_closed(self, envelope: Envelope[Any]) -> None:
        error = pykka.ActorDeadError(f"{self._name} is stopped; its mailbox is closed")
        if envelope.reply_to is None:
            raise error
        envelope.reply_to.set_exception(exc_info=(pykka.ActorDeadError, error, None))


def tune_garbage_collector() -> None:
    """Collect less often, for a broker process (and benchmarks that stand for one).

    The broker keeps every in-flight record alive, and with the default thresholds the
    cyclic collector keeps re-scanning that long-lived heap: about 15 % of ingest time with
    100,000 records in flight. Records hold no cycles; what does is collected later, not
    never.
    """
    gc.set_threshold(50_000, 20, 100)


def tell_if_alive(recipient: Any, message: object) -> None:
    """Tell, unless the recipient has already stopped: at shutdown a peer may stop before
    the last answer it would have got, and that answer changes nothing after a restart."""
    try:
        recipient.tell(message)
    except pykka.ActorDeadError:
        logger.debug("%r not told: %r is stopped", message, recipient)


def ask(ref: pykka.ActorRef[Any], message: object, timeout_s: float) -> Any:
    """Ask with a timeout, translating pykka's failures into the broker's errors.

    `MailboxFull` passes through as it is: raised by the ask itself under policy `fail`,
    or by the future when the message was dropped.
    """
    try:
        return ref.ask(message, block=False).get(timeout=timeout_s)
    except pykka.Timeout:
        raise ActorUnavailable(
            f"{ref.actor_class.__name__} did not answer {type(message).__name__} "
            f"within {timeout_s * 1000:.0f} ms"
        ) from None
    except pykka.ActorDeadError:
        raise ActorUnavailable(f"{ref.actor_class.__name__} is stopped") from None


AnswerCallback = Callable[[Any, BaseException | None], None]
"""Receives an ask's answer, or the error that replaced it: `(answer, None)` or
`(None, error)`."""


class _CallbackReply(pykka.Future[Any]):
    """A reply slot that nobody waits on: the answer goes to a callback, on the thread that
    sets it (the actor's; the sender's when the mailbox refuses the message)."""

    def __init__(self, on_answer: AnswerCallback, recipient: str) -> None:
        super().__init__()
        self._on_answer = on_answer
        self._recipient = recipient

    def get(self, *, timeout: float | None = None) -> Any:
        raise NotImplementedError("this answer goes to a callback; nobody waits on it")

    def set(self, value: Any | None = None) -> None:
        self._on_answer(value, None)

    def set_exception(self, exc_info: OptExcInfo | None = None) -> None:
        error = (exc_info if exc_info is not None else sys.exc_info())[1]
        if error is None or isinstance(error, pykka.ActorDeadError):
            error = ActorUnavailable(f"{self._recipient} is stopped")
        self._on_answer(None, error)


def ask_with_callback(ref: pykka.ActorRef[Any], message: object, on_answer: AnswerCallback) -> None:
    """Ask without waiting: `on_answer` is called once, with the answer or the error.

    For callers that must not block on the answer (an event loop): the actor calls it on
    its own thread when it has handled the message. A dead actor or a full mailbox (`fail`
    policy, or `block` past its push timeout) calls it at once, in the caller's thread,
    with `ActorUnavailable` or `MailboxFull`.
    """
    recipient = ref.actor_class.__name__
    if not ref.is_alive():
        on_answer(None, ActorUnavailable(f"{recipient} is stopped"))
        return
    try:
        ref.actor_inbox.put(Envelope(message, reply_to=_CallbackReply(on_answer, recipient)))
    except MailboxFull as error:
        on_answer(None, error)


def mailbox_stats_of(ref: pykka.ActorRef[Any]) -> MailboxStats:
    """Read an actor's mailbox counters without sending it a message, so /status still
    answers while the actor is busy or its mailbox is full.
    """
    inbox = ref.actor_inbox
    if not isinstance(inbox, BoundedMailbox):
        raise TypeError(f"{ref} has no bounded mailbox")
    return inbox.stats()


class BrokerActor(pykka.ThreadingActor):
    """Base of every actor: a bounded mailbox, handling time measured per message type."""

    def __init__(
        self, name: str, mailbox: MailboxConfig, observer: MailboxObserver | None = None
    ) -> None:
        # pykka's __init__ asks for the inbox, so it must exist before super().__init__().
        self._mailbox = BoundedMailbox(name, mailbox, observer)
        self._name = name
        self._observer: MailboxObserver = observer if observer is not None else _SilentObserver()
        super().__init__()

    # pykka declares the hook a staticmethod because its inbox needs no settings; ours
    # needs the actor's name and config. pykka calls it through `self`, so an instance
    # method works at runtime; only the declared kind differs.
    def _create_actor_inbox(self) -> BoundedMailbox:  # type: ignore[override]
        return self._mailbox

    @property
    def name(self) -> str:
        return self._name

    @abc.abstractmethod
    def handle(self, message: object) -> object:
        """Handle one message; the return value answers an ask. Exceptions propagate:
        pykka hands them to the asker, or for a tell stops the actor via `on_failure`.
        """

    def on_receive(self, message: object) -> object:
        started = time.monotonic()
        try:
            return self.handle(message)
        finally:
            self._observer.handled(self._name, type(message).__name__, time.monotonic() - started)

    def release(self) -> None:
        """Give back what the actor holds (threads, connections, sockets): runs once, when
        the actor stops and also when it fails, so nothing outlives a crashed actor."""

    def on_stop(self) -> None:
        self.release()

    def on_failure(self, *_exc_info: object) -> None:
        self.release()

    def mailbox_stats(self) -> MailboxStats:
        """Thread-safe; from outside the actor prefer `mailbox_stats_of(ref)`."""
        return self._mailbox.stats()

    def _actor_loop_teardown(self) -> None:
        # Close first, so no sender slips a message in while pykka drains the rest.
        self._mailbox.close()
        super()._actor_loop_teardown()


class Ticker:
    """A daemon thread that tells `message` to `recipient` every `interval_s` until stop(); it
    ends by itself when the actor is dead (pykka.ActorDeadError) and never blocks on a full
    mailbox longer than the mailbox's push timeout (a MailboxFull just skips that beat).
    """

    def __init__(
        self, recipient: pykka.ActorRef[Any], message: object, interval_s: float, name: str
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"ticker {name}: interval_s must be positive, got {interval_s}")
        self._recipient = recipient
        self._message = message
        self._interval_s = interval_s
        self._name = name
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        inbox = recipient.actor_inbox
        push_timeout_s = inbox.config.push_timeout_s if isinstance(inbox, BoundedMailbox) else 0.0
        self._join_timeout_s = push_timeout_s + _TICKER_JOIN_MARGIN_S

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "idle"
        return f"<Ticker {self._name} every {self._interval_s}s {state}>"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._join_timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "ticker %s still running %.1fs after stop", self._name, self._join_timeout_s
            )

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self._recipient.tell(self._message)
            except pykka.ActorDeadError:
                logger.debug("ticker %s ends: %s is dead", self._name, self._recipient)
                return
            except MailboxFull as error:
                logger.debug("ticker %s skipped a beat: %s", self._name, error)


class LoopThread:
    """An asyncio event loop in a thread of its own, for an actor whose work is network I/O
    on grpc.aio (the front end, the pusher). The actor's thread hands it coroutines and
    waits for them with a bound; everything else reaches the loop by `call_soon`."""

    _WAIT_S = 10.0  # starting, building on and stopping the loop

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<LoopThread {self._thread.name} {'running' if self.loop.is_running() else 'idle'}>"

    def run(self, work: Awaitable[T], timeout_s: float = _WAIT_S) -> T:
        """Run `work` on the loop and wait for its result, at most `timeout_s`."""

        async def wrapped() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout_s)

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(callback, *args)

    def stop(self) -> None:
        """Stop the loop and its thread; the loop is closed once the thread has ended."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self._WAIT_S)
        if not self._thread.is_alive():
            self.loop.close()
