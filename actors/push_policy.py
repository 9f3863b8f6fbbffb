"""The pusher's decisions as a plain object: when to ask the state for claims and for how
many, which endpoint takes each push, and how long a busy or unreachable endpoint rests.

Every method takes `now` (monotonic seconds) and nothing here touches a thread, a socket or
an actor, so tests drive it with numbers (the actor in `actors.pusher` is its shell).

The rules, and why:

- Room is whole-broker: pushes in flight plus the tasks an outstanding `ClaimForPush` may
  still bring never exceed `max_in_flight`.
- One ask outstanding per application, and a new ask only once room for a fair batch has
  freed up (`min_ask`): finishing pushes one by one must not turn into one ask per task.
- An ask that comes back empty rests its application for an idle pause that doubles while
  nothing is pending, so an idle broker asks a few dozen times a second, not in a loop.
- An endpoint that failed a push rests (`backoff_s`, doubling to `max_backoff_s`), then
  takes one push at a time (a probe) until one succeeds; an application whose endpoints are
  all resting or probing is asked for one task at a time, or not at all. A worker that is
  down therefore costs a claim and an unclaim per backoff, never a spin.
- Among endpoints that may take a push, the one with the fewest outstanding wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class EndpointState:
    """One worker endpoint's pushes in flight and its rest after a failure."""

    target: str
    outstanding: int = 0
    backoff_s: float = 0.0
    """The last rest given; 0 while the endpoint is healthy (its last push succeeded, or it
    never failed)."""
    resting_until: float = -math.inf

    @property
    def healthy(self) -> bool:
        return self.backoff_s == 0.0

    def usable(self, now: float) -> bool:
        """May take one more push: rested, and if it failed last, nothing else in flight."""
        return now >= self.resting_until and (self.healthy or self.outstanding == 0)


@dataclass(slots=True)
class _Application:
    name: str
    endpoints: tuple[EndpointState, ...]
    asked: int = 0
    """Tasks the outstanding ask may bring; 0 when none is outstanding."""
    idle_pause_s: float = 0.0
    next_ask_at: float = -math.inf


@dataclass(frozen=True, slots=True)
class Ask:
    """Tell the state `ClaimForPush(application, count)`."""

    application: str
    count: int


@dataclass(frozen=True, slots=True)
class PushLimits:
    max_in_flight: int = 256
    batch_length: int = 32
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    idle_pause_s: float = 0.02
    max_idle_pause_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "batch_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("backoff_s", "idle_pause_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be at least backoff_s")
        if self.max_idle_pause_s < self.idle_pause_s:
            raise ValueError("max_idle_pause_s must be at least idle_pause_s")

    @property
    def min_ask(self) -> int:
        """The least room worth an ask while an endpoint is healthy: a full batch, or a
        quarter of `max_in_flight` when that is smaller, so a small limit still fills."""
        return min(self.batch_length, max(1, self.max_in_flight // 4))


class PushPolicy:
    """The decisions; see the module docstring. Not thread-safe: one loop drives it."""

    def __init__(
        self, worker_map: Mapping[str, tuple[str, ...]], limits: PushLimits | None = None
    ) -> None:
        self.limits = limits or PushLimits()
        self.in_flight = 0
        self.stopped = False
        # Two applications may share a worker: they share its count and its rest.
        self._endpoints = {
            target: EndpointState(target) for targets in worker_map.values() for target in targets
        }
        self._applications = {
            name: _Application(name, tuple(self._endpoints[t] for t in targets))
            for name, targets in worker_map.items()
        }
        for name, application in self._applications.items():
            if not application.endpoints:
                raise ValueError(f"worker_map.{name}: no endpoint")
        self._next_first = 0

    def __repr__(self) -> str:
        resting = sum(not e.healthy for e in self._endpoints.values())
        return (
            f"<PushPolicy {self.in_flight}/{self.limits.max_in_flight} in flight, "
            f"{self.reserved} asked, {resting} endpoint(s) backed off>"
        )

    @property
    def reserved(self) -> int:
        return sum(application.asked for application in self._applications.values())

    @property
    def room(self) -> int:
        return self.limits.max_in_flight - self.in_flight - self.reserved

    @property
    def quiet(self) -> bool:
        """Nothing in flight and no ask outstanding."""
        return self.in_flight == 0 and self.reserved == 0

    def endpoint(self, target: str) -> EndpointState:
        return self._endpoints[target]

    def asks(self, now: float) -> list[Ask]:
        """The asks to send now; each reserves its count until `claimed`. Applications take
        turns at being first, so one cannot take all the room every time."""
        if self.stopped:
            return []
        asks: list[Ask] = []
        applications = list(self._applications.values())
        first = self._next_first
        self._next_first = (first + 1) % len(applications)
        for application in applications[first:] + applications[:first]:
            count = self._ask_size(application, now)
            if count:
                application.asked = count
                asks.append(Ask(application.name, count))
        return asks

    def claimed(self, application: str, count: int, now: float) -> None:
        """The ask for `application` was answered with `count` tasks (0: nothing pending, or
        the ask never reached the state)."""
        state = self._applications[application]
        state.asked = 0
        limits = self.limits
        if count:
            state.idle_pause_s = 0.0
            state.next_ask_at = now
        else:
            pause = state.idle_pause_s * 2 if state.idle_pause_s else limits.idle_pause_s
            state.idle_pause_s = min(pause, limits.max_idle_pause_s)
            state.next_ask_at = now + state.idle_pause_s

    def choose(self, application: str, now: float) -> str | None:
        """The endpoint for one push, counted as started; None when none may take it (the
        task goes back to pending)."""
        usable = [e for e in self._applications[application].endpoints if e.usable(now)]
        if not usable:
            return None
        chosen = min(usable, key=_outstanding)
        chosen.outstanding += 1
        self.in_flight += 1
        return chosen.target

    def finished(self, target: str, ok: bool, now: float) -> float | None:
        """A push to `target` ended; the new rest in seconds when this failure began one.

        Failures that end while the endpoint already rests (the rest of a burst sent before
        the first failure came back) do not lengthen it: one busy spell, one step."""
        endpoint = self._endpoints[target]
        endpoint.outstanding -= 1
        self.in_flight -= 1
        if ok:
            endpoint.backoff_s = 0.0
            endpoint.resting_until = -math.inf
            return None
        if now < endpoint.resting_until:
            return None
        limits = self.limits
        backoff_s = endpoint.backoff_s * 2 if endpoint.backoff_s else limits.backoff_s
        endpoint.backoff_s = min(backoff_s, limits.max_backoff_s)
        endpoint.resting_until = now + endpoint.backoff_s
        return endpoint.backoff_s

    def next_wakeup(self, now: float) -> float | None:
        """When an ask may next become possible without a push finishing first (a finishing
        push calls for a new look anyway); None when only a finish can change anything."""
        if self.stopped or self.room <= 0:
            return None
        times = []
        for application in self._applications.values():
            if application.asked:
                continue
            ready = [
                e.resting_until for e in application.endpoints if e.healthy or not e.outstanding
            ]
            if ready:
                times.append(max(application.next_ask_at, min(ready)))
        later = [t for t in times if t > now]
        return min(later) if later else None

    def _ask_size(self, application: _Application, now: float) -> int:
        if application.asked or now < application.next_ask_at:
            return 0
        usable = [e for e in application.endpoints if e.usable(now)]
        if not usable:
            return 0
        room = self.room
        if any(e.healthy for e in usable):
            return min(self.limits.batch_length, room) if room >= self.limits.min_ask else 0
        return max(min(len(usable), room), 0)  # probes: one per endpoint that may take one


def _outstanding(endpoint: EndpointState) -> int:
    return endpoint.outstanding
