"""The state actor over real pykka threads: asks answered from memory, one flush at a time,
backpressure told to the consumer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.messages import (
    Claim,
    ClaimedForPush,
    ClaimForPush,
    Conclude,
    ConcludeOutcome,
    ConcludeResult,
    Connect,
    Drain,
    Flush,
    FlushDone,
    FlushFailed,
    Ingest,
    IngestBackpressure,
    PushesSettled,
    StateStats,
    Stats,
    Tick,
    TickResult,
    WorkBatch,
)
from actors.records import ActivationId, KafkaOffset, Record, Status
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.statemachine import Limits
from actors.writer import SqliteWriter, WriterConfig
from tests.factories import make_record
from tests.recipients import Collector

TIMEOUT_S = 5.0


@pytest.fixture
def actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


class FirstClaims:
    """A `ClaimObserver` that keeps what it is told (read after an ask, so no lock)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    def first_claimed(self, namespace: str, taskname: str, latency_s: float) -> None:
        self.seen.append((namespace, taskname, latency_s))


def start_state(limits: Limits | None = None) -> pykka.ActorRef[StateActor]:
    config = StateConfig(limits=limits or Limits(), flush_interval_ms=10)
    return StateActor.start(config, MailboxConfig(size=1000))


def ask(state: pykka.ActorRef[StateActor], message: object) -> Any:
    return state.ask(message, block=True, timeout=TIMEOUT_S)


def ingest(state: pykka.ActorRef[StateActor], *records: Record) -> None:
    offsets = tuple(KafkaOffset(r.partition, r.offset) for r in records)
    state.tell(Ingest(records, offsets))


@pytest.mark.usefixtures("actors")
def test_claim_and_conclude_with_fetch_next() -> None:
    state = start_state()
    ingest(state, make_record("a"), make_record("b"))
    assert ask(state, Claim(application="app")) == b"bytes-of-a"
    result = ask(
        state,
        Conclude(ActivationId("a"), Status.COMPLETE, fetch_next=Claim(application="app")),
    )
    assert result == ConcludeResult(ConcludeOutcome.APPLIED, b"bytes-of-b")
    again = ask(state, Conclude(ActivationId("a"), Status.COMPLETE))
    assert again == ConcludeResult(ConcludeOutcome.UNKNOWN, None)


@pytest.mark.usefixtures("actors")
def test_batches_answer_one_result_per_item() -> None:
    state = start_state()
    ingest(state, make_record("a"), make_record("b"))
    answers = ask(state, WorkBatch((Claim(), Claim(), Claim())))
    assert answers == (b"bytes-of-a", b"bytes-of-b", None)
    results = ask(
        state,
        WorkBatch(
            (
                Conclude(ActivationId("a"), Status.COMPLETE),
                Conclude(ActivationId("zz"), Status.COMPLETE),
            )
        ),
    )
    assert [r.outcome for r in results] == [ConcludeOutcome.APPLIED, ConcludeOutcome.UNKNOWN]
    stats: StateStats = ask(state, Stats())
    assert stats.by_status[Status.PROCESSING] == 1
    assert stats.claims == {"hit": 2, "miss": 1}
    assert stats.conclusions == {"applied": 1, "unknown": 1}


@pytest.mark.usefixtures("actors")
def test_first_claims_are_observed_once_on_every_claim_path() -> None:
    now = [2000.0]
    observer = FirstClaims()
    state = StateActor.start(
        StateConfig(limits=Limits(processing_deadline_grace_s=0)),
        MailboxConfig(size=1000),
        claim_observer=observer,
        clock=lambda: now[0],
    )
    ingest(
        state,
        make_record("a", namespace="n1", taskname="t.a", received_at=1999.5),
        make_record("b", namespace="n2", taskname="t.b", received_at=1999.0),
        make_record("c", namespace="n1", taskname="t.c", received_at=1998.0),
    )
    assert ask(state, Claim(namespace="n1")) == b"bytes-of-a"
    assert ask(state, WorkBatch((Claim(namespace="n2"),))) == (b"bytes-of-b",)
    next_task = Claim(namespace="n1")
    result = ask(state, Conclude(ActivationId("b"), Status.COMPLETE, fetch_next=next_task))
    assert result.next_task == b"bytes-of-c"
    assert observer.seen == [("n1", "t.a", 0.5), ("n2", "t.b", 1.0), ("n1", "t.c", 2.0)]

    # Past their deadlines a and c are pending again: claimed again, but not for the first time.
    now[0] = 2010.0
    assert ask(state, Tick(now=now[0])).deadline_resets == 2
    answers = ask(state, WorkBatch((Claim(), Claim(), Claim())))
    assert sorted(a for a in answers if a is not None) == [b"bytes-of-a", b"bytes-of-c"]
    assert len(observer.seen) == 3


@pytest.mark.usefixtures("actors")
def test_one_flush_outstanding_and_claims_answer_meanwhile() -> None:
    state = start_state()
    writer = Collector()
    state.tell(Connect(writer=writer))
    ingest(state, make_record("a"))
    (first,) = writer.wait_for(Flush)
    ingest(state, make_record("b"), make_record("c"))
    # The writer is "slow": it has not answered. Claims and results still work from memory.
    assert ask(state, Claim()) == b"bytes-of-a"
    done = ask(state, Conclude(ActivationId("a"), Status.COMPLETE))
    assert done.outcome is ConcludeOutcome.APPLIED
    time.sleep(0.1)  # several flush timer beats
    assert len(writer.wait_for(Flush)) == 1
    assert ask(state, Drain()) is False
    state.tell(FlushDone(first.seq))
    _, second = writer.wait_for(Flush, 2)
    assert {r.id for r in second.upserts} == {"b", "c"}
    assert second.deletes == ("a",)


@pytest.mark.usefixtures("actors")
def test_failed_flush_is_sent_again() -> None:
    state = start_state()
    writer = Collector()
    state.tell(Connect(writer=writer))
    ingest(state, make_record("a"))
    (first,) = writer.wait_for(Flush)
    state.tell(FlushFailed(first.seq, "disk full"))
    _, second = writer.wait_for(Flush, 2)
    assert second.seq > first.seq
    assert [r.id for r in second.upserts] == ["a"]
    assert second.new_blobs == first.new_blobs
    state.tell(FlushDone(second.seq))
    deadline = time.monotonic() + TIMEOUT_S
    while not ask(state, Drain()):
        assert time.monotonic() < deadline


@pytest.mark.usefixtures("actors")
def test_backpressure_is_told_when_it_changes() -> None:
    state = start_state(Limits(max_pending_count=2))
    consumer = Collector()
    state.tell(Connect(consumer=consumer))
    assert consumer.wait_for(IngestBackpressure) == [IngestBackpressure(pause=False)]
    ingest(state, make_record("a"), make_record("b"))
    consumer.wait_for(IngestBackpressure, 2)
    ask(state, Claim())
    told = consumer.wait_for(IngestBackpressure, 3)
    assert [m.pause for m in told] == [False, True, False]


@pytest.mark.usefixtures("actors")
def test_tick_answers_what_to_produce() -> None:
    state = start_state()
    ingest(state, make_record("a"))
    ask(state, Claim())
    ask(state, Conclude(ActivationId("a"), Status.RETRY))
    result: TickResult = ask(state, Tick(now=time.time()))
    assert [o.id for o in result.to_produce] == ["a"]


@pytest.mark.usefixtures("actors")
def test_unknown_message_fails_the_asker_not_the_actor() -> None:
    state = start_state()
    with pytest.raises(TypeError, match="unknown message"):
        ask(state, "hello")
    assert ask(state, Claim()) is None


@pytest.mark.usefixtures("actors")
def test_claims_and_results_are_answered_while_a_slow_commit_is_in_progress(
    tmp_path: Path,
) -> None:
    state = start_state()
    writer = SqliteWriter.start(
        WriterConfig(tmp_path / "slow.sqlite", debug_commit_delay_ms=1500),
        state,
        mailbox=MailboxConfig(size=16),
    )
    state.tell(Connect(writer=writer))
    ingest(state, *(make_record(f"t{i}") for i in range(20)))
    deadline = time.monotonic() + TIMEOUT_S
    while not ask(state, Stats()).flush_outstanding:
        assert time.monotonic() < deadline, "no flush was sent"
        time.sleep(0.01)
    for i in range(20):  # every claim and result while the first commit sleeps
        assert ask(state, Claim()) == f"bytes-of-t{i}".encode()
        result = ask(state, Conclude(ActivationId(f"t{i}"), Status.COMPLETE))
        assert result.outcome is ConcludeOutcome.APPLIED
    assert ask(state, Stats()).flush_outstanding, "the commit finished early: nothing was shown"
    while not ask(state, Drain()):
        assert time.monotonic() < deadline + TIMEOUT_S, "the slow commits never finished"
        time.sleep(0.05)


@pytest.mark.usefixtures("actors")
def test_push_claims_go_to_the_pusher_and_settle_by_its_word() -> None:
    state = start_state()
    ingest(state, *(make_record(name, application="app") for name in ("a", "b", "c")))
    pusher = Collector()
    state.tell(ClaimForPush("app", 2, lease_s=30, reply_to=pusher))
    (claimed,) = pusher.wait_for(ClaimedForPush)
    assert claimed.application == "app"
    assert claimed.tasks == (("a", b"bytes-of-a"), ("b", b"bytes-of-b"))

    state.tell(PushesSettled(acknowledged=(ActivationId("a"),), failed=(ActivationId("b"),)))
    stats = ask(state, Stats())
    assert (stats.by_status[Status.PROCESSING], stats.by_status[Status.PENDING]) == (1, 2)
    state.tell(ClaimForPush("other", 5, lease_s=30, reply_to=pusher))
    assert pusher.wait_for(ClaimedForPush, 2)[1] == ClaimedForPush("other", ())
