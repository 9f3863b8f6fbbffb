"""Upkeep: the broker's clock, its Kafka producer for retries and dead letters, and health.

Every tick it asks the state actor to run the time-driven transitions (`Tick`), produces what
the answer lists, waits for Kafka's delivery reports, and only then tells the state
`Produced` for what Kafka acknowledged: a failed produce leaves the record where it was, and
the next tick tries again. It never changes a record itself.

Health is judged outside the actor's thread, by `HealthMonitor`: an upkeep stuck in a
produce cannot report that it is stuck.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pykka

from actors.activation import build_retry
from actors.errors import ActorUnavailable, ConfigError, MailboxFull
from actors.messages import (
    Maintain,
    Produced,
    ProduceKind,
    ProduceOrder,
    Recipient,
    SetServing,
    Tick,
    TickResult,
)
from actors.producer import KafkaProducer, OutgoingMessage, ProduceReport
from actors.records import ActivationId
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver, Ticker, ask

logger = logging.getLogger(__name__)

# Retries of the same attempt get the same new id, so a produce that Kafka took but did not
# confirm in time, then produced again, is deduplicated by id at ingest.
_RETRY_ID_NAMESPACE = uuid.UUID("6f1c1a52-4d0e-4a59-9a37-1c1d3b7a0e55")


@dataclass(frozen=True, slots=True)
class UpkeepConfig:
    retry_topic: str
    deadletter_topic: str
    interval_ms: int = 1000
    deadline_reset_skip_after_startup_s: float = 60.0
    """Workers of the previous process may still finish what they hold: no resets until then."""
    unhealthy_interval_ms: int = 5000
    produce_timeout_ms: int = 10_000
    state_ask_timeout_ms: int = 5000
    maintenance_interval_s: float = 60.0
    full_vacuum_interval_s: float = 0.0
    """0 disables the periodic full VACUUM."""

    def __post_init__(self) -> None:
        for name in ("interval_ms", "unhealthy_interval_ms", "produce_timeout_ms"):
            if getattr(self, name) < 1:
                raise ConfigError(f"upkeep.{name}: must be at least 1, got {getattr(self, name)}")
        if self.maintenance_interval_s <= 0:
            raise ConfigError("upkeep.maintenance_interval_s: must be positive")


class UpkeepObserver(Protocol):
    def ticked(self, seconds: float, result: TickResult, produced: int, failed: int) -> None: ...


class _SilentObserver:
    def ticked(self, seconds: float, result: TickResult, produced: int, failed: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class UpkeepTick:
    """The upkeep ticker fired."""


class Heartbeat:
    """When upkeep last showed it was alive. Written by the upkeep thread, read by the
    monitor: a float assignment is atomic, so no lock is needed.

    A beat may come with a wait announced: upkeep is about to wait up to `waiting_s` for
    Kafka's delivery reports. Until that wait is over the heartbeat counts as fresh: a tick
    that waits on a silent Kafka is not a stuck upkeep, and taking the broker out of service
    for it would stop it handing out what it holds. A wait that overruns what it announced
    ages like any other silence.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: float | None = None

    def beat(self, waiting_s: float = 0.0) -> None:
        self._last = self._clock() + waiting_s

    def age_s(self) -> float | None:
        last = self._last
        return None if last is None else max(self._clock() - last, 0.0)


class Upkeep(BrokerActor):
    def __init__(
        self,
        config: UpkeepConfig,
        *,
        state: pykka.ActorRef[Any],
        producer: KafkaProducer,
        writer: Recipient | None = None,
        mailbox: MailboxConfig | None = None,
        heartbeat: Heartbeat | None = None,
        observer: UpkeepObserver | None = None,
        mailbox_observer: MailboxObserver | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("upkeep", mailbox or MailboxConfig(size=100), mailbox_observer)
        self._config = config
        self._state = state
        self._producer = producer
        self._writer = writer
        self.heartbeat = heartbeat or Heartbeat(monotonic)
        self._upkeep_observer: UpkeepObserver = observer or _SilentObserver()
        self._clock = clock
        self._monotonic = monotonic
        self._started_at = monotonic()
        self._next_maintenance = self._started_at + config.maintenance_interval_s
        self._next_full_vacuum = (
            self._started_at + config.full_vacuum_interval_s
            if config.full_vacuum_interval_s > 0
            else None
        )
        self._produce_failing = False
        self._ticker: Ticker | None = None

    def __repr__(self) -> str:
        return f"<Upkeep every {self._config.interval_ms} ms, heartbeat {self.heartbeat.age_s()}>"

    def on_start(self) -> None:
        self._ticker = Ticker(
            self.actor_ref, UpkeepTick(), self._config.interval_ms / 1000, "upkeep-ticker"
        )
        self._ticker.start()
        # The first tick at once: health waits for a heartbeat before it turns SERVING.
        # A full mailbox already holds work; the ticker's beat comes soon anyway.
        with contextlib.suppress(MailboxFull):
            self.actor_ref.tell(UpkeepTick())

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        undelivered = self._producer.close(self._config.produce_timeout_ms / 1000)
        if undelivered:
            # Their records stay RETRY/FAILURE in the store; the next process produces them.
            logger.warning("%d retries/dead letters unconfirmed at shutdown", undelivered)

    def handle(self, message: object) -> object:
        match message:
            case UpkeepTick():
                self._tick()
            case _:
                raise TypeError(f"upkeep got an unknown message: {message!r}")
        return None

    def _tick(self) -> None:
        started = self._monotonic()
        resets_allowed = (
            started - self._started_at >= self._config.deadline_reset_skip_after_startup_s
        )
        try:
            result: TickResult = ask(
                self._state,
                Tick(self._clock(), deadline_resets=resets_allowed),
                self._config.state_ask_timeout_ms / 1000,
            )
        except (ActorUnavailable, MailboxFull) as error:
            # An overloaded state sheds this tick; the heartbeat goes stale if it lasts.
            logger.warning("upkeep tick skipped: %s", error)
            return
        report = self._produce(result.to_produce)
        if report.acknowledged:
            self._state.tell(Produced(tuple(ActivationId(i) for i in report.acknowledged)))
        self._maintain(started)
        self.heartbeat.beat()
        self._upkeep_observer.ticked(
            self._monotonic() - started, result, len(report.acknowledged), len(report.failed)
        )

    def _produce(self, orders: tuple[ProduceOrder, ...]) -> ProduceReport:
        if not orders:
            return ProduceReport(acknowledged=(), failed={})
        now = self._clock()
        messages = [self._outgoing(order, now) for order in orders]
        timeout_s = self._config.produce_timeout_ms / 1000
        self.heartbeat.beat(waiting_s=timeout_s)
        report = self._producer.produce_many(messages, timeout_s)
        if report.failed and not self._produce_failing:
            reason = next(iter(report.failed.values()))
            logger.warning(
                "%d of %d retries/dead letters not acknowledged by Kafka (%s); "
                "they stay and are produced again next tick",
                len(report.failed),
                len(orders),
                reason,
            )
        elif not report.failed and self._produce_failing:
            logger.info("Kafka acknowledges retries and dead letters again")
        self._produce_failing = bool(report.failed)
        return report

    def _outgoing(self, order: ProduceOrder, now: float) -> OutgoingMessage:
        if order.kind is ProduceKind.DEADLETTER:
            return OutgoingMessage(order.id, self._config.deadletter_topic, order.activation)
        if order.kind is ProduceKind.DEMOTE:
            return OutgoingMessage(order.id, order.topic, order.activation)
        new_id = uuid.uuid5(_RETRY_ID_NAMESPACE, f"{order.id}:retry").hex
        value = build_retry(
            order.activation,
            new_id=new_id,
            now=now,
            max_attempts=order.max_attempts,
            delay_on_retry_s=order.delay_on_retry_s,
        )
        return OutgoingMessage(order.id, self._config.retry_topic, value)

    def _maintain(self, now: float) -> None:
        if self._writer is None or now < self._next_maintenance:
            return
        self._next_maintenance = now + self._config.maintenance_interval_s
        full_vacuum = self._next_full_vacuum is not None and now >= self._next_full_vacuum
        if full_vacuum:
            self._next_full_vacuum = now + self._config.full_vacuum_interval_s
        self._writer.tell(Maintain(full_vacuum=full_vacuum))


class HealthMonitor:
    """Turns gRPC health SERVING while the broker is ready (started, and consuming since
    its first partition assignment) and upkeep's heartbeat is fresh, NOT_SERVING otherwise;
    tells the front end only when that changes.

    A Kafka outage after the first assignment does not turn it off: the broker still
    serves what it holds, and pulling every broker out of service would stop that too.
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        frontend: Recipient,
        unhealthy_after_s: float,
        check_interval_s: float = 0.25,
        consuming: threading.Event | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self._consuming = consuming
        self._frontend = frontend
        self._unhealthy_after_s = unhealthy_after_s
        self._check_interval_s = check_interval_s
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._serving: bool | None = None
        self._lock = threading.Lock()  # check() runs on the monitor thread and the caller's
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    def start(self) -> None:
        self._thread.start()

    def set_ready(self, ready: bool) -> None:
        """The supervisor says whether the broker is restored and consuming."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        self.check()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self._check_interval_s + 1.0)

    def check(self) -> None:
        age = self._heartbeat.age_s()
        fresh = age is not None and age <= self._unhealthy_after_s
        consuming = self._consuming is None or self._consuming.is_set()
        serving = self._ready.is_set() and consuming and fresh
        with self._lock:
            if serving == self._serving:
                return
            if self._serving and not fresh:
                logger.warning("upkeep has not completed a tick for %.1f s: NOT_SERVING", age)
            self._serving = serving
        try:
            self._frontend.tell(SetServing(serving))
        except pykka.ActorDeadError:
            logger.debug("health not told: the front end is stopped")

    def _run(self) -> None:
        while not self._stopping.wait(self._check_interval_s):
            self.check()
