"""StateActor: the thin actor around `StateMachine`.

It never blocks and never asks: it answers claims and results from memory, tells the writer
one flush batch at a time, and tells the consumer when ingest should pause or resume.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from actors.messages import (
    ApplyRules,
    Claim,
    ClaimedForPush,
    ClaimForPush,
    Conclude,
    ConcludeResult,
    Connect,
    Drain,
    FlushDone,
    FlushDue,
    FlushFailed,
    Ingest,
    IngestBackpressure,
    Produced,
    PushesSettled,
    Recipient,
    Restore,
    StateStats,
    Stats,
    Tick,
    TickResult,
    WorkBatch,
)
from actors.records import ActivationId, Record
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver, Ticker, tell_if_alive
from actors.runtime_rules import RuntimeRules
from actors.statemachine import Limits, StateMachine, first_claim_latency_s

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StateConfig:
    limits: Limits = field(default_factory=Limits)
    flush_interval_ms: int = 50
    flush_max_dirty: int = 10_000
    """Past this many dirty records a batch goes as soon as the writer is free."""

    def __post_init__(self) -> None:
        if self.flush_interval_ms < 1:
            raise ValueError(f"flush_interval_ms must be at least 1, got {self.flush_interval_ms}")
        if self.flush_max_dirty < 1:
            raise ValueError(f"flush_max_dirty must be at least 1, got {self.flush_max_dirty}")


class ClaimObserver(Protocol):
    """Receives claim measurements, on the state actor's thread, at every claim: it must
    be cheap."""

    def first_claimed(self, namespace: str, taskname: str, latency_s: float) -> None:
        """A record was handed out for the first time, `latency_s` after it became
        claimable (see `statemachine.first_claim_latency_s`)."""


class _SilentClaimObserver:
    def first_claimed(self, namespace: str, taskname: str, latency_s: float) -> None:
        pass


class RuleObserver(Protocol):
    """Receives what the runtime rules did, on the state actor's thread."""

    def killed(self, label: str, count: int) -> None:
        """`count` more activations were dropped by the killswitch entry `label`."""

    def demoted(self, count: int) -> None:
        """`count` more activations were forwarded to the demoted topic."""


class _SilentRuleObserver:
    def killed(self, label: str, count: int) -> None:
        pass

    def demoted(self, count: int) -> None:
        pass


class StateActor(BrokerActor):
    def __init__(
        self,
        config: StateConfig,
        mailbox: MailboxConfig,
        *,
        observer: MailboxObserver | None = None,
        claim_observer: ClaimObserver | None = None,
        rules: RuntimeRules | None = None,
        rule_observer: RuleObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("state", mailbox, observer)
        self._config = config
        self._machine = StateMachine(config.limits, rules)
        self._claim_observer: ClaimObserver = claim_observer or _SilentClaimObserver()
        self._rule_observer: RuleObserver = rule_observer or _SilentRuleObserver()
        self._killed_reported: Counter[str] = Counter()
        self._demoted_reported = 0
        self._clock = clock
        self._writer: Recipient | None = None
        self._consumer: Recipient | None = None
        self._ingest_paused = False
        self._claims: Counter[str] = Counter()
        self._conclusions: Counter[str] = Counter()
        self._flush_timer: Ticker | None = None

    def __repr__(self) -> str:
        return f"<StateActor {self._machine!r}>"

    def on_start(self) -> None:
        self._flush_timer = Ticker(
            self.actor_ref, FlushDue(), self._config.flush_interval_ms / 1000, "state-flush-timer"
        )
        self._flush_timer.start()

    def release(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.stop()

    def handle(self, message: object) -> object:  # noqa: PLR0911, PLR0912, PLR0915 - one branch per message
        machine = self._machine
        match message:
            case WorkBatch(requests):
                answers = tuple(
                    self._claim(r) if isinstance(r, Claim) else self._conclude(r) for r in requests
                )
                self._after_change()
                return answers
            case Conclude():
                result = self._conclude(message)
                self._after_change()
                return result
            case Claim():
                answer = self._claim(message)
                self._after_change()
                return answer
            case ClaimForPush():
                tasks = self._claim_for_push(message)
                # A pusher stopped meanwhile must not stop the state: the lease brings the
                # tasks back.
                tell_if_alive(message.reply_to, ClaimedForPush(message.application, tasks))
                self._after_change()
            case PushesSettled():
                self._settle(message)
                self._after_change()
            case Ingest(records, offsets):
                if machine.ingest(records, offsets, self._clock()).killed:
                    self._report_rules()
                self._after_change()
            case ApplyRules(rules):
                self._apply_rules(rules)
            case Tick(now, deadline_resets):
                ticked: TickResult = machine.tick(now, deadline_resets=deadline_resets)
                self._after_change()
                return ticked
            case Produced(ids):
                if machine.produced(ids):
                    self._report_rules()
                self._after_change()
            case FlushDue():
                self._send_flush()
            case FlushDone(seq):
                machine.flush_done(seq)
                if machine.dirty_count >= self._config.flush_max_dirty:
                    self._send_flush()
            case FlushFailed(seq, error):
                # The writer already waited out its backoff; the timer sends the retry.
                logger.debug("flush %d failed, its changes go again: %s", seq, error)
                machine.flush_failed(seq)
            case Restore(records):
                machine.restore(records)
                logger.info("restored %d activations", len(machine))
                self._report_rules()
                self._after_change()
            case Connect(writer, consumer):
                self._writer = writer if writer is not None else self._writer
                self._consumer = consumer if consumer is not None else self._consumer
                if self._consumer is not None:
                    self._consumer.tell(IngestBackpressure(pause=self._ingest_paused))
            case Drain():
                self._send_flush()
                return not machine.has_unflushed_changes
            case Stats():
                return self._stats()
            case _:
                raise TypeError(f"state actor got an unknown message: {message!r}")
        return None

    def _claim(self, claim: Claim) -> bytes | None:
        now = self._clock()
        record = self._machine.claim(now, claim.application, claim.namespace)
        if record is None:
            self._claims["miss"] += 1
            return None
        self._claims["hit"] += 1
        self._observe_claim(record, now)
        return record.activation

    def _claim_for_push(self, ask: ClaimForPush) -> tuple[tuple[ActivationId, bytes], ...]:
        now, machine = self._clock(), self._machine
        tasks: list[tuple[ActivationId, bytes]] = []
        while len(tasks) < ask.count:
            record = machine.claim_for_push(now, ask.application, ask.lease_s)
            if record is None:
                break
            tasks.append((record.id, record.activation))
            self._observe_claim(record, now)
        return tuple(tasks)

    def _observe_claim(self, record: Record, now: float) -> None:
        latency_s = first_claim_latency_s(record, now)
        if latency_s is not None:
            self._claim_observer.first_claimed(record.namespace, record.taskname, latency_s)

    def _settle(self, settled: PushesSettled) -> None:
        now, machine = self._clock(), self._machine
        for activation_id in settled.acknowledged:
            machine.push_acknowledged(activation_id, now)
        for activation_id in settled.failed:
            machine.push_failed(activation_id)

    def _conclude(self, conclude: Conclude) -> ConcludeResult:
        outcome = self._machine.conclude(
            conclude.id,
            conclude.status,
            max_attempts=conclude.max_attempts,
            delay_on_retry_s=conclude.delay_on_retry_s,
        )
        self._conclusions[outcome.value] += 1
        next_task = None if conclude.fetch_next is None else self._claim(conclude.fetch_next)
        return ConcludeResult(outcome, next_task)

    def _apply_rules(self, rules: RuntimeRules) -> None:
        changed = self._machine.apply_rules(rules, self._clock())
        logger.info("runtime rules in force; %d held activations changed by them", changed)
        self._report_rules()
        self._after_change()

    def _report_rules(self) -> None:
        """Count what the rules did since last time, and log each killswitch entry's first
        drop (once per entry: an incident's flood must not flood the log too)."""
        machine = self._machine
        for label, total in machine.killed.items():
            seen = self._killed_reported[label]
            if total == seen:
                continue
            if not seen:
                logger.warning(
                    "killswitch %s dropped its first activation; "
                    "further drops are counted, not logged",
                    label,
                )
            self._rule_observer.killed(label, total - seen)
            self._killed_reported[label] = total
        forwarded = machine.demoted_forwarded
        if forwarded != self._demoted_reported:
            self._rule_observer.demoted(forwarded - self._demoted_reported)
            self._demoted_reported = forwarded

    def _after_change(self) -> None:
        if self._machine.dirty_count >= self._config.flush_max_dirty:
            self._send_flush()
        paused = self._machine.ingest_should_pause
        if paused != self._ingest_paused:
            self._ingest_paused = paused
            if self._consumer is not None:
                self._consumer.tell(IngestBackpressure(pause=paused))

    def _send_flush(self) -> None:
        if self._writer is None:
            return
        flush = self._machine.take_flush()
        if flush is not None:
            self._writer.tell(flush)

    def _stats(self) -> StateStats:
        machine = self._machine
        return StateStats(
            by_status=machine.counts_by_status(),
            by_group=machine.counts_by_group(),
            by_partition=machine.counts_by_partition(),
            dirty=machine.dirty_count,
            flush_outstanding=machine.flush_outstanding,
            ingest_paused=self._ingest_paused,
            oldest_pending_added_at=machine.oldest_pending_added_at(),
            claims=dict(self._claims),
            conclusions=dict(self._conclusions),
            killed=dict(machine.killed),
            demoted_forwarded=machine.demoted_forwarded,
            held_pending=machine.held_pending_count,
        )
