"""The front end's batcher against a real pykka actor: what one loop round gathers, what
waits for the batch in flight, the bounds, and every way an answer can fail to come."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pykka
import pytest

from actors.batcher import Request, StateBatcher
from actors.errors import ActorUnavailable, MailboxFull
from actors.messages import Claim, Conclude, ConcludeOutcome, ConcludeResult, WorkBatch
from actors.records import ActivationId, Status
from actors.runtime import BrokerActor, MailboxConfig, MailboxPolicy

TIMEOUT_S = 5.0


class ScriptedState(BrokerActor):
    """Answers a claim with its application's name and a result with APPLIED; holds each
    batch until `gate` is open, and records the size of every batch it handled."""

    def __init__(self, gate: threading.Event, mailbox: MailboxConfig | None = None) -> None:
        super().__init__("state", mailbox or MailboxConfig(size=100))
        self.gate = gate
        self.entered = threading.Event()
        self.batches: list[int] = []

    def handle(self, message: object) -> object:
        if not isinstance(message, WorkBatch):
            raise TypeError(f"unexpected {message!r}")
        self.entered.set()
        self.gate.wait(TIMEOUT_S)
        if any(isinstance(r, Claim) and r.application == "boom" for r in message.requests):
            raise ValueError("the state actor failed this batch")
        self.batches.append(len(message.requests))
        return tuple(_answer(request) for request in message.requests)


def _answer(request: Request) -> bytes | ConcludeResult | None:
    if isinstance(request, Claim):
        return request.application.encode() if request.application else None
    return ConcludeResult(ConcludeOutcome.APPLIED)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    opened = threading.Event()
    opened.set()
    yield opened
    opened.set()  # a test that closed it must not leave the actor stuck at teardown
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


def start_state(gate: threading.Event, **mailbox: Any) -> pykka.ActorRef[ScriptedState]:
    return ScriptedState.start(gate, MailboxConfig(**mailbox) if mailbox else None)


def batches_of(state: pykka.ActorRef[ScriptedState]) -> list[int]:
    batches: list[int] = state.proxy().batches.get(timeout=TIMEOUT_S)
    return batches


def run(
    state: pykka.ActorRef[Any],
    scenario: Callable[[StateBatcher], Coroutine[Any, Any, Any]],
    *,
    timeout_s: float = TIMEOUT_S,
    max_batch: int = 100,
    min_interval_s: float = 0.0,
    sizes: list[int] | None = None,
) -> Any:
    async def main() -> Any:
        on_batch = sizes.append if sizes is not None else None
        loop = asyncio.get_running_loop()
        batcher = StateBatcher(
            state, loop, timeout_s, max_batch, min_interval_s=min_interval_s, on_batch=on_batch
        )
        return await scenario(batcher)

    return asyncio.run(main())


def claim(name: str) -> tuple[Request, ...]:
    return (Claim(application=name),)


async def held_by_the_state(
    batcher: StateBatcher, state: pykka.ActorRef[ScriptedState], name: str
) -> asyncio.Future[Any]:
    """A claim sent in a batch that the state actor holds until its gate opens."""
    sent = asyncio.ensure_future(batcher.ask(claim(name)))
    entered = state.proxy().entered.get(timeout=TIMEOUT_S)
    await asyncio.to_thread(entered.wait, TIMEOUT_S)
    return sent


def test_the_calls_of_one_loop_round_go_as_one_batch(gate: threading.Event) -> None:
    state = start_state(gate)
    sizes: list[int] = []

    async def scenario(batcher: StateBatcher) -> Any:
        return await asyncio.gather(*(batcher.ask(claim(f"app-{i}")) for i in range(10)))

    answers = run(state, scenario, sizes=sizes)
    assert [answer for (answer,) in answers] == [f"app-{i}".encode() for i in range(10)]
    assert batches_of(state) == [10]
    assert sizes == [10]


def test_calls_made_while_a_batch_is_in_flight_go_together_in_the_next(
    gate: threading.Event,
) -> None:
    state = start_state(gate)
    gate.clear()

    async def scenario(batcher: StateBatcher) -> Any:
        first = await held_by_the_state(batcher, state, "first")
        later = [asyncio.ensure_future(batcher.ask(claim(f"later-{i}"))) for i in range(5)]
        await asyncio.sleep(0.05)  # several loop rounds: still one batch in flight
        assert batcher.waiting == 5
        gate.set()
        return await first, await asyncio.gather(*later)

    first, later = run(state, scenario)
    assert first == (b"first",)
    assert [answer for (answer,) in later] == [f"later-{i}".encode() for i in range(5)]
    assert batches_of(state) == [1, 5]


def test_a_lone_call_goes_at_once_and_calls_soon_after_wait_for_the_interval(
    gate: threading.Event,
) -> None:
    state = start_state(gate)

    async def scenario(batcher: StateBatcher) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.ask(claim("lone"))
        lone_s = loop.time() - started
        await asyncio.gather(*(batcher.ask(claim(f"soon-{i}")) for i in range(3)))
        return lone_s, loop.time() - started

    lone_s, all_s = run(state, scenario, min_interval_s=0.2)
    assert lone_s < 0.15  # an idle front end does not wait out the interval
    assert all_s >= 0.2
    assert batches_of(state) == [1, 3]


def test_a_batch_holds_at_most_max_batch_requests_and_a_big_caller_goes_alone(
    gate: threading.Event,
) -> None:
    state = start_state(gate)
    conclusions = tuple(Conclude(ActivationId(f"id-{i}"), Status.COMPLETE) for i in range(7))

    async def scenario(batcher: StateBatcher) -> Any:
        small = [batcher.ask(claim(f"app-{i}")) for i in range(10)]
        return await asyncio.gather(*small, batcher.ask(conclusions))

    answers = run(state, scenario, max_batch=4)
    assert answers[-1] == (ConcludeResult(ConcludeOutcome.APPLIED),) * 7
    assert batches_of(state) == [4, 4, 2, 7]


def test_no_answer_in_time_is_unavailable_and_the_next_batch_still_goes(
    gate: threading.Event,
) -> None:
    state = start_state(gate)
    gate.clear()

    async def scenario(batcher: StateBatcher) -> Any:
        with pytest.raises(ActorUnavailable, match="did not answer within 100 ms"):
            await batcher.ask(claim("stuck"))
        following = asyncio.ensure_future(batcher.ask(claim("following")))
        await asyncio.sleep(0.01)
        gate.set()
        return await following

    assert run(state, scenario, timeout_s=0.1) == (b"following",)
    assert batches_of(state) == [1, 1]  # the late batch was applied, as a late ask is


def test_an_error_in_the_state_actor_reaches_every_caller_of_the_batch(
    gate: threading.Event,
) -> None:
    state = start_state(gate)

    async def scenario(batcher: StateBatcher) -> Any:
        calls = [batcher.ask(claim("boom")), batcher.ask(claim("innocent"))]
        return await asyncio.gather(*calls, return_exceptions=True)

    errors = run(state, scenario)
    assert [type(error) for error in errors] == [ValueError, ValueError]
    assert state.is_alive()  # an ask's error goes to the asker, not to the actor


def test_a_stopped_actor_is_unavailable(gate: threading.Event) -> None:
    state = start_state(gate)
    state.stop(timeout=TIMEOUT_S)

    async def scenario(batcher: StateBatcher) -> Any:
        return await batcher.ask(claim("anyone"))

    with pytest.raises(ActorUnavailable, match="is stopped"):
        run(state, scenario)


def test_a_full_mailbox_refuses_the_batch(gate: threading.Event) -> None:
    state = start_state(gate, size=1, policy=MailboxPolicy.FAIL)
    gate.clear()

    async def scenario(batcher: StateBatcher) -> Any:
        held = await held_by_the_state(batcher, state, "held")
        state.tell(WorkBatch(()))  # fills the one place in the mailbox
        # The batcher's own batch is in flight; a second batcher stands for a second loop.
        other = StateBatcher(state, asyncio.get_running_loop(), TIMEOUT_S, 10)
        with pytest.raises(MailboxFull, match="mailbox of state is full"):
            await other.ask(claim("refused"))
        gate.set()
        return await held

    assert run(state, scenario) == (b"held",)


def test_a_cancelled_call_is_not_sent(gate: threading.Event) -> None:
    state = start_state(gate)
    gate.clear()

    async def scenario(batcher: StateBatcher) -> Any:
        first = await held_by_the_state(batcher, state, "first")
        gone = asyncio.ensure_future(batcher.ask(claim("gone")))
        kept = asyncio.ensure_future(batcher.ask(claim("kept")))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        return await first, await kept

    assert run(state, scenario) == ((b"first",), (b"kept",))
    assert batches_of(state) == [1, 1]


def test_stop_fails_the_waiting_and_refuses_new_calls(gate: threading.Event) -> None:
    state = start_state(gate)
    gate.clear()

    async def scenario(batcher: StateBatcher) -> Any:
        first = await held_by_the_state(batcher, state, "first")
        waiting = asyncio.ensure_future(batcher.ask(claim("waiting")))
        await asyncio.sleep(0)
        batcher.stop()
        with pytest.raises(ActorUnavailable, match="stopping"):
            await waiting
        with pytest.raises(ActorUnavailable, match="stopping"):
            await batcher.ask(claim("late"))
        gate.set()
        return await first  # the batch in flight is still answered

    assert run(state, scenario) == (b"first",)
