"""The bounded mailbox, the actor base class and the ticker, with real pykka actors.

Most tests hold the actor inside one message (`Hold`, released by a `threading.Event`) so
its mailbox fills up deterministically, then look at what each overflow policy does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pykka
import pytest
from pykka._envelope import Envelope
from pykka.messages import _ActorStop

from actors.errors import MailboxFull
from actors.runtime import (
    BoundedMailbox,
    BrokerActor,
    Essential,
    MailboxConfig,
    MailboxPolicy,
    MailboxStats,
    Ticker,
    mailbox_stats_of,
)

WAIT_S = 2.0  # upper bound for anything that should happen "promptly"
PUSH_TIMEOUT_S = 0.3


@dataclass(frozen=True, slots=True)
class Hold:
    """Keeps the actor busy until `release` is set (bounded, so a broken test cannot hang)."""

    entered: threading.Event
    release: threading.Event
    then_crash: bool = False


@dataclass(frozen=True, slots=True)
class Work:
    n: int


@dataclass(frozen=True, slots=True)
class EssentialWork(Work, Essential):
    """Work that no mailbox bound may refuse or drop."""


@dataclass(frozen=True, slots=True)
class Boom:
    """Makes `handle` raise."""


@dataclass(frozen=True, slots=True)
class Beat:
    """What the ticker sends."""


@dataclass(frozen=True, slots=True)
class CountBeats:
    """Ask: how many beats so far."""


class Recorder(BrokerActor):
    """Answers `Work` with its number and remembers the order in which it handled them."""

    def __init__(
        self,
        mailbox: MailboxConfig,
        observer: RecordingObserver | None = None,
        beats: tuple[int, threading.Event] | None = None,
        name: str = "recorder",
    ) -> None:
        super().__init__(name, mailbox, observer)
        self.handled: list[int] = []
        self.beats = 0
        self.beats_wanted, self.enough_beats = beats or (0, threading.Event())

    def handle(self, message: object) -> object:
        match message:
            case Hold(entered=entered, release=release):
                entered.set()
                release.wait(timeout=WAIT_S * 2)
                if message.then_crash:
                    raise ValueError("crashed after the hold")
                return None
            case Work(n=n):
                self.handled.append(n)
                return n
            case Boom():
                raise ValueError("boom")
            case Beat():
                self.beats += 1
                if self.beats >= self.beats_wanted:
                    self.enough_beats.set()
                return None
            case CountBeats():
                return self.beats
            case _:
                raise TypeError(f"unexpected message {message!r}")


@dataclass
class RecordingObserver:
    """Thread-safe record of every observer call."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    enqueued_depths: list[int] = field(default_factory=list)
    overflows: list[MailboxPolicy] = field(default_factory=list)
    dequeues: list[tuple[str, float, int]] = field(default_factory=list)
    handlings: list[tuple[str, float]] = field(default_factory=list)

    def enqueued(self, actor: str, depth: int) -> None:
        with self.lock:
            self.enqueued_depths.append(depth)

    def overflowed(self, actor: str, policy: MailboxPolicy) -> None:
        with self.lock:
            self.overflows.append(policy)

    def dequeued(self, actor: str, message_type: str, waited_s: float, depth: int) -> None:
        with self.lock:
            self.dequeues.append((message_type, waited_s, depth))

    def handled(self, actor: str, message_type: str, seconds: float) -> None:
        with self.lock:
            self.handlings.append((message_type, seconds))


class ActorErrors(logging.Handler):
    """Collects what pykka logs at ERROR: an actor crashed."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Harness:
    release: threading.Event
    errors: ActorErrors
    expected_errors: int = 0

    def start(self, config: MailboxConfig, **kwargs: Any) -> pykka.ActorRef[Recorder]:
        return Recorder.start(config, **kwargs)

    def hold(self, ref: pykka.ActorRef[Recorder], *, then_crash: bool = False) -> None:
        """Occupy the actor so that everything told next stays in its mailbox."""
        entered = threading.Event()
        ref.tell(Hold(entered, self.release, then_crash))
        assert entered.wait(timeout=WAIT_S)


@pytest.fixture
def harness() -> Iterator[Harness]:
    errors = ActorErrors()
    pykka_logger = logging.getLogger("pykka")
    pykka_logger.addHandler(errors)
    harness = Harness(release=threading.Event(), errors=errors)
    try:
        yield harness
    finally:
        harness.release.set()
        try:
            pykka.ActorRegistry.stop_all(timeout=WAIT_S)
        finally:
            pykka_logger.removeHandler(errors)
    messages = [record.getMessage() for record in errors.records]
    assert len(messages) == harness.expected_errors, messages


def fill(ref: pykka.ActorRef[Recorder], count: int) -> None:
    for n in range(count):
        ref.tell(Work(n))


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def wait_until_drained(ref: pykka.ActorRef[Recorder]) -> None:
    wait_until(lambda: mailbox_stats_of(ref).depth == 0)


# --- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"size": 0}, "size"),
        ({"size": -5}, "size"),
        ({"push_timeout_s": -0.1}, "push_timeout_s"),
        ({"push_timeout_s": float("inf")}, "push_timeout_s"),
        ({"push_timeout_s": float("nan")}, "push_timeout_s"),
        ({"policy": "drop_everything"}, "policy"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(
    kwargs: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(ValueError, match=field_name):
        MailboxConfig(**kwargs)


def test_config_accepts_a_policy_by_its_string_value() -> None:
    config = MailboxConfig(size=1, policy="drop_oldest", push_timeout_s=0)  # type: ignore[arg-type]
    assert config.policy is MailboxPolicy.DROP_OLDEST


def test_config_defaults() -> None:
    assert MailboxConfig() == MailboxConfig(10_000, MailboxPolicy.BLOCK, 1.0)


# --- the mailbox on its own, no thread -------------------------------------------------


def test_mailbox_is_fifo_and_measures_time_in_mailbox() -> None:
    observer = RecordingObserver()
    box = BoundedMailbox("plain", MailboxConfig(size=3), observer)
    box.put(Envelope(Work(1)))
    box.put(Envelope(Work(2)))
    time.sleep(0.05)
    assert box.get().message == Work(1)
    assert box.get().message == Work(2)
    assert box.empty()
    assert observer.enqueued_depths == [1, 2]
    assert [(kind, depth) for kind, _, depth in observer.dequeues] == [("Work", 1), ("Work", 0)]
    assert all(waited >= 0.05 for _, waited, _ in observer.dequeues)
    assert box.stats() == MailboxStats("plain", 3, MailboxPolicy.BLOCK, 0, 2, 0)


def test_drop_oldest_never_evicts_a_stop_message() -> None:
    box = BoundedMailbox("stops", MailboxConfig(size=1, policy=MailboxPolicy.DROP_OLDEST))
    stop: Envelope[Any] = Envelope(_ActorStop())
    box.put(stop)
    box.put(Envelope(Work(1)))  # only a stop to evict: the newcomer is dropped instead
    assert box.get() is stop
    assert box.empty()
    assert box.stats().overflows == 1


# --- policies, with an actor held busy ---------------------------------------------


def test_block_waits_for_room_then_delivers(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=1, push_timeout_s=WAIT_S))
    harness.hold(ref)
    fill(ref, 1)
    releaser = threading.Timer(0.1, harness.release.set)
    releaser.start()
    started = time.monotonic()
    assert ref.ask(Work(1), timeout=WAIT_S) == 1
    assert 0.05 < time.monotonic() - started < WAIT_S
    assert mailbox_stats_of(ref).overflows == 0
    releaser.join(timeout=WAIT_S)


def test_block_tell_raises_mailbox_full_after_the_push_timeout(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=2, push_timeout_s=PUSH_TIMEOUT_S), name="blocky")
    harness.hold(ref)
    fill(ref, 2)
    started = time.monotonic()
    with pytest.raises(MailboxFull, match=r"blocky.*size 2.*policy block"):
        ref.tell(Work(99))
    assert PUSH_TIMEOUT_S * 0.9 <= time.monotonic() - started < PUSH_TIMEOUT_S + 0.5
    assert mailbox_stats_of(ref).overflows == 1


def test_block_ask_with_timeout_raises_mailbox_full_within_the_push_timeout(
    harness: Harness,
) -> None:
    ref = harness.start(MailboxConfig(size=2, push_timeout_s=PUSH_TIMEOUT_S))
    harness.hold(ref)
    fill(ref, 2)
    started = time.monotonic()
    with pytest.raises(MailboxFull):
        ref.ask(Work(99), timeout=10 * WAIT_S)
    assert time.monotonic() - started < PUSH_TIMEOUT_S + 0.5


def test_fail_refuses_at_once_to_tell_and_ask(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=2, policy=MailboxPolicy.FAIL), name="failing")
    harness.hold(ref)
    fill(ref, 2)
    started = time.monotonic()
    with pytest.raises(MailboxFull, match=r"failing.*size 2.*policy fail"):
        ref.tell(Work(98))
    with pytest.raises(MailboxFull):
        ref.ask(Work(99), timeout=WAIT_S)
    assert time.monotonic() - started < 0.1
    harness.release.set()
    wait_until_drained(ref)
    assert ref.ask(Work(2), timeout=WAIT_S) == 2
    assert ref.proxy().handled.get(timeout=WAIT_S) == [0, 1, 2]
    assert mailbox_stats_of(ref).overflows == 2


@pytest.mark.parametrize("policy", [MailboxPolicy.FAIL, MailboxPolicy.DROP_NEWEST])
def test_essential_messages_bypass_a_full_mailbox(harness: Harness, policy: MailboxPolicy) -> None:
    ref = harness.start(MailboxConfig(size=2, policy=policy))
    harness.hold(ref)
    fill(ref, 2)
    ref.tell(EssentialWork(50))
    evicting = harness.start(MailboxConfig(size=1, policy=MailboxPolicy.DROP_OLDEST), name="ev")
    harness.hold(evicting)
    evicting.tell(EssentialWork(60))
    evicting.tell(Work(61))  # nothing evictable: the newcomer is dropped instead
    harness.release.set()
    wait_until_drained(ref)
    wait_until_drained(evicting)
    assert ref.proxy().handled.get(timeout=WAIT_S) == [0, 1, 50]
    assert evicting.proxy().handled.get(timeout=WAIT_S) == [60]
    assert mailbox_stats_of(ref).overflows == 0


def test_drop_newest_discards_the_newcomer_and_fails_its_ask(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=2, policy=MailboxPolicy.DROP_NEWEST))
    harness.hold(ref)
    fill(ref, 2)
    ref.tell(Work(97))  # silently dropped
    dropped = ref.ask(Work(98), block=False)
    with pytest.raises(MailboxFull, match="dropped"):
        dropped.get(timeout=0.1)  # at once, not after the asker's timeout
    harness.release.set()
    wait_until_drained(ref)
    assert ref.ask(Work(2), timeout=WAIT_S) == 2
    assert ref.proxy().handled.get(timeout=WAIT_S) == [0, 1, 2]
    assert mailbox_stats_of(ref).overflows == 2


def test_drop_oldest_evicts_the_oldest_and_fails_its_ask(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=2, policy=MailboxPolicy.DROP_OLDEST))
    harness.hold(ref)
    first = ref.ask(Work(0), block=False)
    second = ref.ask(Work(1), block=False)
    ref.tell(Work(2))
    with pytest.raises(MailboxFull, match="evicted"):
        first.get(timeout=0.1)
    last = ref.ask(Work(3), block=False)
    with pytest.raises(MailboxFull, match="evicted"):
        second.get(timeout=0.1)
    harness.release.set()
    assert last.get(timeout=WAIT_S) == 3
    assert ref.proxy().handled.get(timeout=WAIT_S) == [2, 3]
    assert mailbox_stats_of(ref).overflows == 2


def test_drop_oldest_keeps_a_stop_queued_behind_a_full_box(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=1, policy=MailboxPolicy.DROP_OLDEST))
    harness.hold(ref)
    fill(ref, 1)
    stopped = ref.stop(block=False)
    late = ref.ask(Work(1), block=False)  # evicts Work(0), never the stop
    harness.release.set()
    assert stopped.get(timeout=WAIT_S) is True
    with pytest.raises(pykka.ActorDeadError):
        late.get(timeout=WAIT_S)  # it was queued behind the stop


@pytest.mark.parametrize("policy", list(MailboxPolicy))
def test_stop_bypasses_a_full_mailbox(harness: Harness, policy: MailboxPolicy) -> None:
    ref = harness.start(MailboxConfig(size=2, policy=policy, push_timeout_s=WAIT_S))
    harness.hold(ref)
    fill(ref, 2)
    started = time.monotonic()
    stopped = ref.stop(block=False)
    assert time.monotonic() - started < 0.1
    assert mailbox_stats_of(ref).depth == 3  # the stop went in over the bound
    harness.release.set()
    assert stopped.get(timeout=WAIT_S) is True
    assert mailbox_stats_of(ref).high_water == 3
    assert mailbox_stats_of(ref).overflows == 0


def test_blocking_stop_on_a_full_mailbox_returns_once_the_actor_is_free(
    harness: Harness,
) -> None:
    ref = harness.start(MailboxConfig(size=2, push_timeout_s=WAIT_S))
    harness.hold(ref)
    fill(ref, 2)
    releaser = threading.Timer(0.1, harness.release.set)
    releaser.start()
    started = time.monotonic()
    assert ref.stop(timeout=WAIT_S) is True
    assert time.monotonic() - started < WAIT_S
    releaser.join(timeout=WAIT_S)


def test_a_sender_blocked_on_a_full_mailbox_learns_the_actor_died(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=1, push_timeout_s=10 * WAIT_S))
    harness.hold(ref, then_crash=True)
    fill(ref, 1)
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            ref.tell(Work(1))
        except (pykka.ActorDeadError, MailboxFull) as error:
            outcome.append(error)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.05)  # let the sender start waiting for room
    harness.release.set()
    sender.join(timeout=WAIT_S)
    assert not sender.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], pykka.ActorDeadError)
    harness.expected_errors = 1  # pykka logs the crash


def test_a_message_put_after_the_actor_stopped_is_refused(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=2))
    inbox = ref.actor_inbox
    assert ref.stop(timeout=WAIT_S) is True
    # Past pykka's is_alive() check, as a sender racing the stop would be.
    with pytest.raises(pykka.ActorDeadError):
        inbox.put(Envelope(Work(1)))
    future = Recorder._create_future()
    inbox.put(Envelope(Work(2), reply_to=future))
    with pytest.raises(pykka.ActorDeadError):
        future.get(timeout=0.1)


# --- counters and observer -----------------------------------------------------------


def test_counters_and_observer_calls(harness: Harness) -> None:
    observer = RecordingObserver()
    config = MailboxConfig(size=3, push_timeout_s=0.2)
    ref = harness.start(config, observer=observer, name="counted")
    harness.hold(ref)
    fill(ref, 3)
    with pytest.raises(MailboxFull):
        ref.tell(Work(3))
    assert mailbox_stats_of(ref) == MailboxStats("counted", 3, MailboxPolicy.BLOCK, 3, 3, 1)
    harness.release.set()
    wait_until_drained(ref)
    with pytest.raises(ValueError, match="boom"):
        ref.ask(Boom(), timeout=WAIT_S)  # an ask's exception reaches the asker
    assert ref.ask(Work(4), timeout=WAIT_S) == 4  # and the actor lives on

    assert mailbox_stats_of(ref) == MailboxStats("counted", 3, MailboxPolicy.BLOCK, 0, 3, 1)
    with observer.lock:
        assert observer.enqueued_depths == [1, 1, 2, 3, 1, 1]
        assert observer.overflows == [MailboxPolicy.BLOCK]
        kinds = [kind for kind, _, _ in observer.dequeues]
        assert kinds == ["Hold", "Work", "Work", "Work", "Boom", "Work"]
        assert [depth for _, _, depth in observer.dequeues][:4] == [0, 2, 1, 0]
        first_work_waited = observer.dequeues[1][1]
        assert first_work_waited >= 0.1  # it sat there while the actor was held
        handled_kinds = [kind for kind, _ in observer.handlings]
        assert handled_kinds == ["Hold", "Work", "Work", "Work", "Boom", "Work"]
        assert observer.handlings[0][1] >= 0.1


def test_a_tell_that_raises_stops_the_actor_through_on_failure(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=2))
    ref.tell(Boom())
    deadline = time.monotonic() + WAIT_S
    while ref.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        ref.tell(Work(1))
    harness.expected_errors = 1
    assert "Unhandled exception" in harness.errors.records[0].getMessage()


def test_mailbox_stats_of_rejects_an_actor_without_a_bounded_mailbox(harness: Harness) -> None:
    ref = pykka.ThreadingActor.start()
    with pytest.raises(TypeError, match="no bounded mailbox"):
        mailbox_stats_of(ref)


# --- ticker --------------------------------------------------------------------------


def test_ticker_delivers_repeatedly_until_stopped(harness: Harness) -> None:
    three_beats = threading.Event()
    ref = harness.start(MailboxConfig(size=10), beats=(3, three_beats))
    ticker = Ticker(ref, Beat(), interval_s=0.02, name="test-ticker")
    ticker.start()
    assert three_beats.wait(timeout=WAIT_S)
    ticker.stop()
    assert not ticker.is_alive()
    beats = ref.ask(CountBeats(), block=True, timeout=WAIT_S)
    assert beats >= 3
    time.sleep(0.1)
    assert ref.ask(CountBeats(), timeout=WAIT_S) == beats


def test_ticker_ends_by_itself_when_the_actor_dies(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=10))
    ticker = Ticker(ref, Beat(), interval_s=0.02, name="orphan-ticker")
    ticker.start()
    assert ref.stop(timeout=WAIT_S) is True
    wait_until(lambda: not ticker.is_alive())


def test_ticker_skips_beats_on_a_full_mailbox_and_stops_within_the_push_timeout(
    harness: Harness,
) -> None:
    ref = harness.start(MailboxConfig(size=1, push_timeout_s=PUSH_TIMEOUT_S))
    harness.hold(ref)
    fill(ref, 1)
    ticker = Ticker(ref, Beat(), interval_s=0.01, name="full-ticker")
    ticker.start()
    time.sleep(PUSH_TIMEOUT_S * 1.5)  # at least one beat refused, the next one waiting
    assert ticker.is_alive()
    assert mailbox_stats_of(ref).overflows >= 1
    started = time.monotonic()
    ticker.stop()
    assert not ticker.is_alive()
    assert time.monotonic() - started < PUSH_TIMEOUT_S + 0.5


def test_ticker_rejects_a_non_positive_interval(harness: Harness) -> None:
    ref = harness.start(MailboxConfig(size=1))
    with pytest.raises(ValueError, match="interval_s"):
        Ticker(ref, Beat(), interval_s=0, name="bad")
