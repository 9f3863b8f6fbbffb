"""How the worker-facing services reach the state, from the front end's event loop: the
state actor through the batcher, or a blocking state (the sqlite-direct design's
transactions) on a thread pool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from actors.batcher import StateBatcher
from actors.messages import Claim, Conclude, ConcludeResult

T = TypeVar("T")


class StateClient(Protocol):
    """Every method is called on the event loop and never blocks it."""

    async def claim(self, claim: Claim) -> bytes | None: ...

    async def conclude(self, conclude: Conclude) -> ConcludeResult: ...

    async def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]: ...

    async def conclude_and_claim(
        self, conclusions: tuple[Conclude, ...], claim: Claim, count: int
    ) -> list[bytes]:
        """Apply `conclusions`, then claim up to `count` tasks within `claim`'s filter;
        the tasks claimed, oldest first."""
        ...

    def stop(self) -> None:
        """Refuse new requests; called on the loop after the server has stopped."""


class BlockingStateClient(Protocol):
    """A state that answers in the caller's thread, taking its time."""

    def claim(self, claim: Claim) -> bytes | None: ...

    def conclude(self, conclude: Conclude) -> ConcludeResult: ...

    def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]: ...


class ActorStateClient:
    """The state actor, asked in batches: one `WorkBatch` per round of the loop, whatever
    the number of calls and of tasks in them."""

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

    async def conclude_and_claim(
        self, conclusions: tuple[Conclude, ...], claim: Claim, count: int
    ) -> list[bytes]:
        answers = await self._batcher.ask(conclusions + (claim,) * count)
        # Claims past the last pending task answer None; a Claim's answer is never a result.
        return [a for a in answers[len(conclusions) :] if a is not None]  # type: ignore[misc]

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

    async def conclude_and_claim(
        self, conclusions: tuple[Conclude, ...], claim: Claim, count: int
    ) -> list[bytes]:
        def run(_: object) -> list[bytes]:
            if conclusions:
                self._blocking.conclude_all(conclusions)
            tasks: list[bytes] = []
            while len(tasks) < count and (task := self._blocking.claim(claim)) is not None:
                tasks.append(task)
            return tasks

        return await self._run(run, None)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, call: Callable[[Any], T], argument: object) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, call, argument)
