"""Coalescing of concurrent requests into batches, so that one actor round trip serves many
gRPC calls.

One ask to the state actor costs about as much as the state actor's work for dozens of
requests, so one ask per call caps the broker at the round-trip rate. Here handler threads
enqueue their request and wait on a slot; one dispatcher thread takes everything queued
(up to `max_batch`), sends it in one call, and completes each slot. There is no timer:
when the dispatcher is idle a lone request goes at once, and while a batch is in flight
the next one gathers by itself, so batches grow with load and latency does not.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from actors.errors import ActorUnavailable

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

SendBatch = Callable[[tuple[ItemT, ...], float], Sequence[ResultT]]
"""Sends a batch, waiting at most the given seconds; one result per item, in order."""


class _Slot(Generic[ItemT, ResultT]):
    """One waiting request: its item, its deadline, and where its answer lands.

    A lock acquired at birth and released on completion is the cheapest one-shot event
    CPython has (`threading.Event` adds a Condition around it).
    """

    __slots__ = ("_done", "deadline", "error", "item", "result")

    def __init__(self, item: ItemT, deadline: float) -> None:
        self.item = item
        self.deadline = deadline
        self.result: ResultT | None = None
        self.error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()

    def complete(self, result: ResultT) -> None:
        self.result = result
        self._done.release()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._done.release()

    def wait(self, timeout_s: float) -> bool:
        return self._done.acquire(timeout=max(timeout_s, 0.0))


class _Stop:
    """Queued by stop(): the dispatcher ends when it takes it."""


_STOP = _Stop()


class Coalescer(Generic[ItemT, ResultT]):
    """Batches items submitted from many threads into calls of `send` from one thread."""

    def __init__(
        self,
        name: str,
        send: SendBatch[ItemT, ResultT],
        max_batch: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"coalescer {name}: max_batch must be at least 1, got {max_batch}")
        self._name = name
        self._send = send
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Slot[ItemT, ResultT] | _Stop] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"coalescer-{name}", daemon=True)
        self._on_batch = on_batch
        self._stopped = False

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "idle"
        return f"<Coalescer {self._name} max_batch={self._max_batch} {state}>"

    @property
    def queued(self) -> int:
        """Requests waiting for the next batch (approximate while threads submit)."""
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """End the dispatcher; items still queued fail with `ActorUnavailable`."""
        self._stopped = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("coalescer %s still sending %.1fs after stop", self._name, timeout_s)
        self._fail_queued(ActorUnavailable(f"{self._name}: the front end is stopping"))

    def submit(self, item: ItemT, timeout_s: float) -> ResultT:
        """Send `item` with the next batch and wait for its result, at most `timeout_s`.

        Raises what `send` raised for the batch, or `ActorUnavailable` when no answer came
        in time (the item may still be sent and applied after that, as with a timed-out ask).
        """
        if self._stopped:
            raise ActorUnavailable(f"{self._name}: the front end is stopping")
        slot: _Slot[ItemT, ResultT] = _Slot(item, time.monotonic() + timeout_s)
        self._queue.put(slot)
        if not slot.wait(timeout_s):
            raise ActorUnavailable(f"{self._name}: no answer within {timeout_s * 1000:.0f} ms")
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set whenever error is None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch = [first]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    queued = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(queued, _Stop):
                    stop_after = True
                    break
                batch.append(queued)
            self._dispatch(batch)
            if stop_after:
                return

    def _dispatch(self, batch: list[_Slot[ItemT, ResultT]]) -> None:
        now = time.monotonic()
        # A caller that gave up is not sent: for a claim that would hand a task to nobody.
        live = [slot for slot in batch if slot.deadline > now]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        timeout_s = max(slot.deadline for slot in live) - now
        try:
            results = self._send(tuple(slot.item for slot in live), timeout_s)
        except Exception as error:  # every waiter gets the batch's error
            for slot in live:
                slot.fail(error)
            return
        if len(results) != len(live):
            mismatch = RuntimeError(
                f"{self._name}: {len(results)} results for a batch of {len(live)}"
            )
            for slot in live:
                slot.fail(mismatch)
            return
        for slot, result in zip(live, results, strict=True):
            slot.complete(result)

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                return
            if not isinstance(queued, _Stop):
                queued.fail(error)
