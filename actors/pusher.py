"""Pusher: push delivery, taskbroker's `delivery_mode = "push"` (WIRE.md, "Push delivery").

It asks the state for claims while it has room, calls each worker's
`WorkerService/PushTask` with the claimed task, and tells the state how each push ended:
acknowledged (PROCESSING from then on) or failed (pending again, in its old place). What to
ask, which endpoint, and how long a busy or unreachable worker rests are `PushPolicy`'s
decisions (`actors.push_policy`); this module is the shell that does the I/O.

Everything runs on one asyncio loop in a thread of its own, as in the front end: one
grpc.aio channel per endpoint, one coroutine per push. The outcomes of one round of the loop
go to the state as one `PushesSettled`, sent before any new ask, so a failed task is back in
its place before the next claim and the order stays oldest first.

The state's answers (`ClaimedForPush`, and the `Stats` read to find applications missing
from worker_map) come straight onto the loop with `call_soon_threadsafe`, not through the
actor's mailbox: one thread hand-off per batch of claims instead of two, and a `reply_to`
that never raises. The state tells its answer from inside its handler, and a tell to a
stopped actor's mailbox would raise there and stop the state. The mailbox takes only stop.

Stop: no more asks; pushes in flight get up to `stop_wait_ms` to end; every task not
acknowledged by then is told failed, so it is pending in the state's last flush.

Measured on 2 cores, 20,000 pending tasks pushed to one grpc.aio worker process that answers
at once: 160 µs (max_in_flight 32, 5,600 pushes/s) to 180 µs (256, 4,300/s) of broker CPU
per push, pusher and state actor together; a unary front-end call costs about 260 µs, and a
pulled task takes two.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
import pykka

from actors.activation import get_task_response_bytes
from actors.auth import SIGNATURE_METADATA_KEY, sign
from actors.errors import MailboxFull
from actors.messages import ClaimedForPush, ClaimForPush, PushesSettled, StateStats, Stats
from actors.push_policy import PushLimits, PushPolicy
from actors.records import ActivationId, Status
from actors.runtime import (
    BrokerActor,
    LoopThread,
    MailboxConfig,
    MailboxObserver,
    ask_with_callback,
    tell_if_alive,
)

logger = logging.getLogger(__name__)

PUSH_TASK_PATH: Final = "/sentry_protos.taskbroker.v1.WorkerService/PushTask"

# What a stop may take beyond its wait for pushes: settling them, stopping the loop.
_STOP_MARGIN_S: Final = 10.0
# How often a stopping pusher looks whether its pushes have ended.
_STOP_POLL_S: Final = 0.01


@dataclass(frozen=True, slots=True)
class PusherConfig:
    """The supervisor fills it from the configuration: `worker_map`, `push.*`,
    `fetch.batch_length` and `grpc_shared_secret`. The rest are the pusher's own."""

    worker_map: Mapping[str, tuple[str, ...]]
    """Application -> worker endpoints "host:port". A host that is a DNS name is resolved
    by grpc, and its addresses share the endpoint's pushes round robin."""
    max_in_flight: int = 256
    """PushTask calls outstanding at once, whole broker."""
    batch_length: int = 32
    """Tasks per ClaimForPush to the state."""
    timeout_ms: int = 30_000
    lease_ms: int = 60_000
    backoff_ms: int = 200
    max_backoff_ms: int = 5_000
    idle_pause_ms: int = 20
    """An ask that found nothing pending rests its application this long, doubling while
    nothing is pending up to `max_idle_pause_ms`: the longest a new task waits for the
    pusher to notice it on an idle broker."""
    max_idle_pause_ms: int = 50
    shared_secrets: tuple[str, ...] = ()
    """Each push is signed with the first (as taskbroker does); empty: unsigned."""
    stop_wait_ms: int = 5_000
    """At stop, how long pushes in flight may take to end before their tasks are told failed."""
    unmapped_check_ms: int = 10_000
    """How often the state's pending counts are read to find applications without a
    worker_map entry (counted, and logged once each)."""

    def __post_init__(self) -> None:
        if not self.worker_map:
            raise ValueError("worker_map: push delivery needs at least one application")
        for name in ("timeout_ms", "lease_ms", "stop_wait_ms", "unmapped_check_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lease_ms <= self.timeout_ms:
            # A lease that ends while its push is in flight could push the task twice.
            raise ValueError(
                f"lease_ms ({self.lease_ms}) must exceed timeout_ms ({self.timeout_ms})"
            )
        if isinstance(self.shared_secrets, str):
            raise TypeError("shared_secrets must be a list of secrets, not one string")
        self.limits()  # validates the rest

    def limits(self) -> PushLimits:
        return PushLimits(
            max_in_flight=self.max_in_flight,
            batch_length=self.batch_length,
            backoff_s=self.backoff_ms / 1000,
            max_backoff_s=self.max_backoff_ms / 1000,
            idle_pause_s=self.idle_pause_ms / 1000,
            max_idle_pause_s=self.max_idle_pause_ms / 1000,
        )


class PushObserver(Protocol):
    """Receives the pusher's measurements, on its loop's thread."""

    def push_started(self, endpoint: str) -> None: ...

    def pushed(self, endpoint: str, code: grpc.StatusCode, seconds: float) -> None:
        """A push ended: OK (acknowledged) or the code it failed with."""

    def backed_off(self, endpoint: str) -> None:
        """A failed push began a rest for its endpoint."""

    def claim_answered(self, application: str, tasks: int) -> None: ...

    def unmapped_pending(self, counts: Mapping[str, int]) -> None:
        """Pending activations per application missing from worker_map (0: no longer any)."""


class _SilentPushObserver:
    def push_started(self, endpoint: str) -> None:
        pass

    def pushed(self, endpoint: str, code: grpc.StatusCode, seconds: float) -> None:
        pass

    def backed_off(self, endpoint: str) -> None:
        pass

    def claim_answered(self, application: str, tasks: int) -> None:
        pass

    def unmapped_pending(self, counts: Mapping[str, int]) -> None:
        pass


def channel_target(endpoint: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The grpc target and channel options for an endpoint "host:port": an IP address as it
    is; a DNS name through grpc's resolver with round_robin, so that every address it
    resolves to takes pushes (grpc's default, pick_first, would use one)."""
    host = endpoint.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"dns:///{endpoint}", (("grpc.lb_policy_name", "round_robin"),)
    return endpoint, ()


class Pusher(BrokerActor):
    """The loop and its thread as an actor: built (channels included) in __init__, pushing
    from on_start, drained in release. It takes no message of its own; see the module
    docstring for why the state's answers bypass the mailbox."""

    def __init__(
        self,
        config: PusherConfig,
        state: pykka.ActorRef[Any],
        mailbox: MailboxConfig | None = None,
        *,
        observer: PushObserver | None = None,
        mailbox_observer: MailboxObserver | None = None,
    ) -> None:
        super().__init__("pusher", mailbox or MailboxConfig(size=100), mailbox_observer)
        self._config = config
        self._loop = LoopThread("pusher-loop")
        try:
            self._pushes = self._loop.run(self._build(state, observer or _SilentPushObserver()))
        except BaseException:
            self._loop.stop()
            raise

    def __repr__(self) -> str:
        return f"<Pusher {self._pushes!r}>"

    def on_start(self) -> None:
        self._loop.call_soon(self._pushes.start)
        logger.info("pushing to %s", dict(self._config.worker_map))

    def handle(self, message: object) -> object:
        raise TypeError(f"pusher got an unknown message: {message!r}")

    def release(self) -> None:
        wait_s = self._config.stop_wait_ms / 1000
        try:
            abandoned = self._loop.run(self._pushes.stop(wait_s), wait_s + _STOP_MARGIN_S)
            if abandoned:
                logger.info("stopped with %d push(es) unanswered: pending again", abandoned)
        finally:
            self._loop.stop()

    async def _build(self, state: pykka.ActorRef[Any], observer: PushObserver) -> _Pushes:
        return _Pushes(self._config, state, observer, asyncio.get_running_loop())


class _Replies:
    """The `reply_to` of every ClaimForPush: hands the answer to the loop, from the state's
    thread. Once the pusher has stopped it tells the state the tasks failed instead, so
    that an answer that crossed the stop is pending again at once, not after its lease."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_claimed: Callable[[ClaimedForPush], None],
        state: pykka.ActorRef[Any],
    ) -> None:
        self._loop = loop
        self._on_claimed = on_claimed
        self._state = state
        self._lock = threading.Lock()
        self._open = True

    def tell(self, message: object) -> None:
        if not isinstance(message, ClaimedForPush):
            raise TypeError(f"the pusher expects ClaimedForPush, got {message!r}")
        with self._lock:
            if self._open:
                self._loop.call_soon_threadsafe(self._on_claimed, message)
                return
        failed = tuple(task_id for task_id, _ in message.tasks)
        if failed:
            tell_if_alive(self._state, PushesSettled(failed=failed))

    def close(self) -> None:
        """From the loop: answers from now on go back to the state; those queued before
        still reach the loop, which runs them before it stops."""
        with self._lock:
            self._open = False


class _Pushes:
    """Everything on the pusher's loop. Built there, because grpc.aio channels bind to the
    loop they are created on; every method runs on the loop's thread."""

    def __init__(
        self,
        config: PusherConfig,
        state: pykka.ActorRef[Any],
        observer: PushObserver,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._config = config
        self._state = state
        self._observer = observer
        self._loop = loop
        self._policy = PushPolicy(config.worker_map, config.limits())
        self._timeout_s = config.timeout_ms / 1000
        self._lease_s = config.lease_ms / 1000
        self._secret = config.shared_secrets[0] if config.shared_secrets else None
        self._channels: dict[str, Any] = {}
        self._calls: dict[str, Any] = {}
        for endpoint in {e for endpoints in config.worker_map.values() for e in endpoints}:
            target, options = channel_target(endpoint)
            channel = grpc.aio.insecure_channel(
                target,
                options=[
                    *options,
                    # grpc's own reconnect backoff grows to 120 s: a worker back from a
                    # restart would wait that long. Ours bounds the waits instead.
                    ("grpc.initial_reconnect_backoff_ms", config.backoff_ms),
                    ("grpc.min_reconnect_backoff_ms", config.backoff_ms),
                    ("grpc.max_reconnect_backoff_ms", config.max_backoff_ms),
                ],
            )
            self._channels[endpoint] = channel
            # Raw bytes both ways: the stored activation goes out framed, never re-serialized.
            self._calls[endpoint] = channel.unary_unary(PUSH_TASK_PATH)
        self._replies = _Replies(loop, self._claimed, state)
        self._in_flight: dict[ActivationId, asyncio.Task[None]] = {}
        self._acknowledged: list[ActivationId] = []
        self._failed: list[ActivationId] = []
        self._settle_scheduled = False
        self._pump_scheduled = False
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at = math.inf
        self._unmapped_timer: asyncio.TimerHandle | None = None
        self._unmapped_logged: set[str] = set()

    def __repr__(self) -> str:
        return repr(self._policy)

    def start(self) -> None:
        self._pump()
        self._check_unmapped()

    async def stop(self, wait_s: float) -> int:
        """Stop asking, give pushes in flight up to `wait_s`, tell the state the rest
        failed, close the channels; the number of pushes abandoned."""
        self._policy.stopped = True
        for timer in (self._wakeup, self._unmapped_timer):
            if timer is not None:
                timer.cancel()
        deadline = self._loop.time() + wait_s
        while not self._policy.quiet and self._loop.time() < deadline:
            await asyncio.sleep(_STOP_POLL_S)
        self._replies.close()
        await asyncio.sleep(0)  # answers queued before the close run now, and fail their tasks
        abandoned = dict(self._in_flight)
        self._in_flight.clear()
        for task in abandoned.values():
            task.cancel()
        self._failed.extend(abandoned)
        self._settle()
        await asyncio.gather(*abandoned.values(), return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
        return len(abandoned)

    # --- asking ---------------------------------------------------------------------------

    def _pump(self) -> None:
        self._pump_scheduled = False
        # Settlements first: a failed task must be pending again before the next claim.
        self._settle()
        now = self._loop.time()
        for ask in self._policy.asks(now):
            message = ClaimForPush(ask.application, ask.count, self._lease_s, self._replies)
            try:
                self._state.tell(message)
            except (MailboxFull, pykka.ActorDeadError) as error:
                logger.debug("claim for %s not asked: %s", ask.application, error)
                self._policy.claimed(ask.application, 0, now)
        self._wake_at(self._policy.next_wakeup(now))

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _wake_at(self, when: float | None) -> None:
        if when is None or when >= self._wakeup_at:
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup = self._loop.call_at(when, self._woke)
        self._wakeup_at = when

    def _woke(self) -> None:
        self._wakeup = None
        self._wakeup_at = math.inf
        self._pump()

    def _claimed(self, claimed: ClaimedForPush) -> None:
        now = self._loop.time()
        policy = self._policy
        application = claimed.application
        policy.claimed(application, len(claimed.tasks), now)
        self._observer.claim_answered(application, len(claimed.tasks))
        for task_id, activation in claimed.tasks:
            endpoint = None if policy.stopped else policy.choose(application, now)
            if endpoint is None:  # every endpoint began a rest since the ask, or stopping
                self._failed.append(task_id)
                continue
            self._observer.push_started(endpoint)
            self._in_flight[task_id] = self._loop.create_task(
                self._push(endpoint, task_id, activation)
            )
        self._schedule_settle()
        self._schedule_pump()

    # --- pushing --------------------------------------------------------------------------

    async def _push(self, endpoint: str, task_id: ActivationId, activation: bytes) -> None:
        # PushTaskRequest.task is field 1, as GetTaskResponse.task is: the same framing.
        request = get_task_response_bytes(activation)
        metadata: tuple[tuple[str, str], ...] = ()
        if self._secret is not None:
            metadata = ((SIGNATURE_METADATA_KEY, sign(self._secret, PUSH_TASK_PATH, request)),)
        started = self._loop.time()
        try:
            await self._calls[endpoint](request, timeout=self._timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            code = error.code()
        except Exception:
            # Not an answer from the worker (a bug, a closed channel); the task must still
            # go back to pending and the room be given back.
            logger.exception("push of %s to %s failed", task_id, endpoint)
            code = grpc.StatusCode.UNKNOWN
        else:
            code = grpc.StatusCode.OK
        self._finished(endpoint, task_id, code, started)

    def _finished(
        self, endpoint: str, task_id: ActivationId, code: grpc.StatusCode, started: float
    ) -> None:
        now = self._loop.time()
        self._in_flight.pop(task_id, None)
        ok = code is grpc.StatusCode.OK
        (self._acknowledged if ok else self._failed).append(task_id)
        self._observer.pushed(endpoint, code, now - started)
        backoff_s = self._policy.finished(endpoint, ok, now)
        if backoff_s is not None:
            self._observer.backed_off(endpoint)
            busy = code is grpc.StatusCode.RESOURCE_EXHAUSTED
            logger.log(
                logging.INFO if busy else logging.WARNING,
                "worker %s %s (%s): no pushes to it for %.0f ms",
                endpoint,
                "is busy" if busy else "failed a push",
                code.name,
                backoff_s * 1000,
            )
        self._schedule_settle()
        self._schedule_pump()

    def _schedule_settle(self) -> None:
        if not self._settle_scheduled and (self._acknowledged or self._failed):
            self._settle_scheduled = True
            self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        self._settle_scheduled = False
        if not (self._acknowledged or self._failed):
            return
        settled = PushesSettled(tuple(self._acknowledged), tuple(self._failed))
        self._acknowledged = []
        self._failed = []
        tell_if_alive(self._state, settled)

    # --- applications missing from worker_map ----------------------------------------------

    def _check_unmapped(self) -> None:
        loop = self._loop

        def on_answer(answer: Any, error: BaseException | None) -> None:
            # On the state's thread (or this one, when the ask was refused at once).
            try:
                loop.call_soon_threadsafe(self._unmapped_answered, answer, error)
            except RuntimeError:
                logger.debug("the state's counts arrived after the pusher stopped")

        ask_with_callback(self._state, Stats(), on_answer)
        self._unmapped_timer = loop.call_later(
            self._config.unmapped_check_ms / 1000, self._check_unmapped
        )

    def _unmapped_answered(self, stats: StateStats | None, error: BaseException | None) -> None:
        if stats is None:
            logger.debug("pending counts not read: %s", error)
            return
        mapped = self._config.worker_map
        counts: Counter[str] = Counter()
        for (application, _namespace, status), count in stats.by_group.items():
            if status is Status.PENDING and application not in mapped:
                counts[application] += count
        for application in self._unmapped_logged - counts.keys():
            counts[application] = 0  # its gauge falls back to 0
        for application in sorted(counts.keys() - self._unmapped_logged):
            logger.warning(
                "application %r has %d pending activation(s) and no worker_map entry: "
                "they wait until one is configured",
                application,
                counts[application],
            )
            self._unmapped_logged.add(application)
        self._observer.unmapped_pending(counts)
