"""Which broker a simulated worker calls when there are several, as a plain object that
takes `now`.

The model is taskbroker-client 0.20.30's pull worker with several `--broker-hosts`
(`TaskbrokerClient` in `taskbroker_client/worker/client.py`): it pairs with one broker and
stays; NOT_FOUND from GetTask makes it pick another at its next call; after three
UNAVAILABLE in a row it leaves that broker for 20 s, not picking it again unless no other
is left, and requeues the results of that broker's tasks instead of sending them; a
task's result always goes to the broker the task came from (its row is in that broker's
file, and no other knows it).

Where this differs, and why:

- Worker k starts at broker k mod N and moves to the next in order, not to one picked at
  random: the workers start spread evenly, and a run is repeatable.
- One UNAVAILABLE is enough to move on, and pauses that broker for `pause_s` (1 s, not
  20 s): a SIGKILLed broker refuses connections at once, so more tries only cost time,
  and the load test wants to see a restarted broker taken up again soon.
- No move every 32 tasks (the client's `max_tasks_before_rebalance`): a worker stays while
  its broker has tasks, which keeps one call per task; with the partitions split evenly
  the brokers drain together, and a worker whose broker runs dry moves on by NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

UNAVAILABLE_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class Held:
    """Tasks a worker holds and the broker that handed them out, the one to tell their
    results to."""

    target: str
    tasks: tuple[pb.TaskActivation, ...]


class Rotation:
    """One worker's brokers: the one it asks for tasks, those paused after UNAVAILABLE, and
    the results parked for a broker that did not take them."""

    def __init__(
        self, targets: Sequence[str], start: int, *, pause_s: float = UNAVAILABLE_PAUSE_S
    ) -> None:
        if not targets:
            raise ValueError("a rotation needs at least one target")
        self._targets = tuple(targets)
        self._index = start % len(self._targets)
        self._pause_s = pause_s
        self._paused_until: dict[str, float] = {}
        self._parked: list[Held] = []

    def __repr__(self) -> str:
        return (
            f"<Rotation at {self._targets[self._index]} of {len(self._targets)}, "
            f"paused {sorted(self._paused_until)}, {len(self._parked)} parked>"
        )

    @property
    def parked(self) -> int:
        return len(self._parked)

    def next_call(self, now: float) -> tuple[str, Held | None]:
        """What to do next: send parked results to their broker once it is no longer
        paused, else ask a broker for tasks (the current one, or the next that is not
        paused; the current one when all are)."""
        for position, held in enumerate(self._parked):
            if self._available(held.target, now):
                del self._parked[position]
                return held.target, held
        for step in range(len(self._targets)):
            index = (self._index + step) % len(self._targets)
            if self._available(self._targets[index], now):
                self._index = index
                break
        return self._targets[self._index], None

    def empty(self, target: str) -> None:
        """`target` had nothing pending: ask the next broker."""
        self._move_past(target)

    def unavailable(self, target: str, now: float) -> None:
        """`target` did not answer: pause it and ask the next broker."""
        self._paused_until[target] = now + self._pause_s
        self._move_past(target)

    def park(self, held: Held) -> None:
        """Results their broker did not take, to send again when it is not paused."""
        self._parked.append(held)

    def _available(self, target: str, now: float) -> bool:
        until = self._paused_until.get(target)
        if until is not None and until <= now:
            del self._paused_until[target]
            return True
        return until is None

    def _move_past(self, target: str) -> None:
        if self._targets[self._index] == target:
            self._index = (self._index + 1) % len(self._targets)
