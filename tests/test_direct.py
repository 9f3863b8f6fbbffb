"""The sqlite-direct design: the state machine's contract run against both designs, then
what only the direct one has (a file that is the state, a lock, an actor, a gRPC path)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import pykka
import pytest

from actors.activation import decode_record, encode_activation
from actors.direct import DirectStore, SqliteDirectState, SqliteDirectStateClient
from actors.errors import ActorUnavailable
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import (
    Claim,
    Conclude,
    ConcludeOutcome,
    Connect,
    Drain,
    Ingest,
    IngestBackpressure,
    Persisted,
    Produced,
    ProduceKind,
    StateStats,
    Stats,
    Tick,
    TickResult,
)
from actors.records import ActivationId, KafkaOffset, OnAttemptsExceeded, Record, Status
from actors.runtime import MailboxConfig
from actors.statemachine import IngestResult, Limits, StateMachine
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from tests.factories import make_record
from tests.recipients import Collector

NOW = 1000.0
TIMEOUT_S = 5.0
GRACE_S = 3.0


# --- one small interface over both designs --------------------------------------------------


class Design(Protocol):
    def ingest(self, *records: Record, now: float = NOW) -> IngestResult: ...

    def claim(
        self, now: float = NOW, application: str | None = None, namespace: str | None = None
    ) -> str | None: ...

    def conclude(
        self, conclude: Conclude, now: float = NOW
    ) -> tuple[ConcludeOutcome, str | None]: ...

    def tick(self, now: float, deadline_resets: bool = True) -> TickResult: ...

    def produced(self, *ids: str) -> int: ...

    def count(self, status: Status) -> int: ...

    def should_pause(self) -> bool: ...


def _id_of(activation: bytes | None) -> str | None:
    # make_record's bytes are b"bytes-of-<id>".
    return None if activation is None else activation.removeprefix(b"bytes-of-").decode()


def _offsets(records: tuple[Record, ...]) -> tuple[KafkaOffset, ...]:
    return tuple(KafkaOffset(r.partition, r.offset) for r in records)


class MemoryDesign:
    def __init__(self, limits: Limits) -> None:
        self.machine = StateMachine(limits)

    def ingest(self, *records: Record, now: float = NOW) -> IngestResult:
        return self.machine.ingest(records, _offsets(records), now)

    def claim(
        self, now: float = NOW, application: str | None = None, namespace: str | None = None
    ) -> str | None:
        record = self.machine.claim(now, application, namespace)
        return None if record is None else _id_of(record.activation)

    def conclude(self, conclude: Conclude, now: float = NOW) -> tuple[ConcludeOutcome, str | None]:
        outcome = self.machine.conclude(
            conclude.id,
            conclude.status,
            max_attempts=conclude.max_attempts,
            delay_on_retry_s=conclude.delay_on_retry_s,
        )
        fetch = conclude.fetch_next
        return outcome, (None if fetch is None else self.claim(now, *_filter(fetch)))

    def tick(self, now: float, deadline_resets: bool = True) -> TickResult:
        return self.machine.tick(now, deadline_resets=deadline_resets)

    def produced(self, *ids: str) -> int:
        return self.machine.produced(tuple(ActivationId(i) for i in ids))

    def count(self, status: Status) -> int:
        return self.machine.count(status)

    def should_pause(self) -> bool:
        return self.machine.ingest_should_pause


class SqliteDesign:
    def __init__(self, store: DirectStore) -> None:
        self.store = store

    def ingest(self, *records: Record, now: float = NOW) -> IngestResult:
        return self.store.ingest(records, now)

    def claim(
        self, now: float = NOW, application: str | None = None, namespace: str | None = None
    ) -> str | None:
        return _id_of(self.store.claim(now, application, namespace))

    def conclude(self, conclude: Conclude, now: float = NOW) -> tuple[ConcludeOutcome, str | None]:
        result = self.store.conclude(now, conclude)
        return result.outcome, _id_of(result.next_task)

    def tick(self, now: float, deadline_resets: bool = True) -> TickResult:
        return self.store.tick(now, deadline_resets=deadline_resets)

    def produced(self, *ids: str) -> int:
        return self.store.produced(tuple(ActivationId(i) for i in ids))

    def count(self, status: Status) -> int:
        return self.store.count(status)

    def should_pause(self) -> bool:
        return self.store.ingest_should_pause()


def _filter(claim: Claim) -> tuple[str | None, str | None]:
    return claim.application, claim.namespace


LIMITS = Limits(max_pending_count=3, max_processing_attempts=3, processing_deadline_grace_s=GRACE_S)


@pytest.fixture(params=["memory", "sqlite-direct"])
def design(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Design]:
    if request.param == "memory":
        yield MemoryDesign(LIMITS)
        return
    store = DirectStore(tmp_path / "direct.sqlite", LIMITS)
    try:
        yield SqliteDesign(store)
    finally:
        store.close()


def complete(activation_id: str, fetch_next: Claim | None = None) -> Conclude:
    return Conclude(ActivationId(activation_id), Status.COMPLETE, fetch_next=fetch_next)


# --- the contract ------------------------------------------------------------------------------


def test_ingest_makes_records_pending_and_deduplicates_by_id(design: Design) -> None:
    assert design.ingest(make_record("a"), make_record("b")) == IngestResult(2, 0)
    assert design.ingest(make_record("a"), make_record("c"), make_record("c")) == IngestResult(1, 2)
    assert design.count(Status.PENDING) == 3


def test_claims_hand_out_the_oldest_first_then_nothing(design: Design) -> None:
    design.ingest(make_record("newer"), now=NOW + 1)
    design.ingest(make_record("older"), now=NOW)
    assert design.claim() == "older"
    assert design.claim() == "newer"
    assert design.claim() is None
    assert design.count(Status.PROCESSING) == 2


def test_claims_stay_within_their_filter(design: Design) -> None:
    design.ingest(make_record("a1", application="a", namespace="x"), now=NOW)
    design.ingest(make_record("b1", application="b", namespace="x"), now=NOW + 1)
    design.ingest(make_record("b2", application="b", namespace="y"), now=NOW + 2)
    assert design.claim(application="b", namespace="y") == "b2"
    assert design.claim(application="c") is None
    assert design.claim(namespace="x") == "a1"  # a namespace alone spans applications
    assert design.claim(application="b") == "b1"
    assert design.claim() is None


def test_complete_finishes_and_a_second_result_or_an_unknown_id_is_a_no_op(design: Design) -> None:
    design.ingest(make_record("a"))
    assert design.claim() == "a"
    assert design.conclude(complete("a")) == (ConcludeOutcome.APPLIED, None)
    assert design.conclude(complete("a")) == (ConcludeOutcome.UNKNOWN, None)
    assert design.conclude(complete("nobody")) == (ConcludeOutcome.UNKNOWN, None)
    assert design.count(Status.PROCESSING) == design.count(Status.PENDING) == 0
    assert design.tick(NOW + 100).to_produce == ()


def test_a_result_with_fetch_next_claims_the_next_task(design: Design) -> None:
    design.ingest(make_record("a"), now=NOW)
    design.ingest(make_record("b"), now=NOW + 1)
    design.claim()
    assert design.conclude(complete("a", Claim(application="app"))) == (
        ConcludeOutcome.APPLIED,
        "b",
    )
    assert design.conclude(complete("b", Claim())) == (ConcludeOutcome.APPLIED, None)


def test_result_statuses_other_than_complete_retry_failure_are_refused(design: Design) -> None:
    design.ingest(make_record("a"))
    with pytest.raises(ValueError, match="COMPLETE, RETRY or FAILURE"):
        design.conclude(Conclude(ActivationId("a"), Status.PENDING))


def test_retry_is_produced_with_the_workers_retry_state_then_finished(design: Design) -> None:
    design.ingest(make_record("a", max_attempts=2))
    design.claim()
    retry = Conclude(ActivationId("a"), Status.RETRY, max_attempts=5, delay_on_retry_s=30)
    assert design.conclude(retry) == (ConcludeOutcome.APPLIED, None)
    orders = design.tick(NOW + 1).to_produce
    assert [(o.id, o.kind, o.max_attempts, o.delay_on_retry_s) for o in orders] == [
        ("a", ProduceKind.RETRY, 5, 30)
    ]
    assert orders[0].activation == b"bytes-of-a"
    assert design.tick(NOW + 2).to_produce == orders  # until Kafka acknowledges it
    assert design.produced("a") == 1
    assert design.produced("a") == 0
    assert design.tick(NOW + 3).to_produce == ()


@pytest.mark.parametrize(
    ("on_exceeded", "kinds"),
    [(OnAttemptsExceeded.DEADLETTER, [ProduceKind.DEADLETTER]), (OnAttemptsExceeded.DISCARD, [])],
)
def test_retry_past_max_attempts_and_failure_follow_on_attempts_exceeded(
    design: Design, on_exceeded: OnAttemptsExceeded, kinds: list[ProduceKind]
) -> None:
    design.ingest(make_record("r", attempts=2, max_attempts=3, on_attempts_exceeded=on_exceeded))
    design.ingest(make_record("f", on_attempts_exceeded=on_exceeded), now=NOW + 1)
    design.claim()
    design.claim()
    design.conclude(Conclude(ActivationId("r"), Status.RETRY))
    design.conclude(Conclude(ActivationId("f"), Status.FAILURE))
    orders = sorted(design.tick(NOW + 2).to_produce, key=lambda o: o.id)
    assert [o.kind for o in orders] == kinds * 2
    assert design.produced("f", "r") == len(orders)
    assert design.count(Status.FAILURE) == 0


def test_past_its_deadline_a_task_is_pending_again_and_a_late_result_counts(
    design: Design,
) -> None:
    design.ingest(make_record("a", processing_deadline_duration_s=10))
    design.claim(NOW)
    assert design.tick(NOW + 10 + GRACE_S - 0.1).deadline_resets == 0
    assert design.tick(NOW + 10 + GRACE_S, deadline_resets=False).deadline_resets == 0
    assert design.tick(NOW + 10 + GRACE_S).deadline_resets == 1
    assert design.count(Status.PENDING) == 1
    assert design.conclude(complete("a")) == (ConcludeOutcome.LATE, None)
    assert design.claim(NOW + 20) is None


@pytest.mark.parametrize("at_most_once", [True, False])
def test_at_most_once_or_out_of_processing_attempts_fails_at_the_deadline(
    design: Design, at_most_once: bool
) -> None:
    design.ingest(
        make_record(
            "a",
            processing_deadline_duration_s=1,
            at_most_once=at_most_once,
            on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER,
        )
    )
    now = NOW
    failed_at = 1 if at_most_once else LIMITS.max_processing_attempts
    for attempt in range(1, failed_at + 1):
        assert design.claim(now) == "a"
        now += 1 + GRACE_S
        result = design.tick(now)
        assert (result.deadline_resets, result.failed_by_deadline) == (
            (0, 1) if attempt == failed_at else (1, 0)
        )
    assert [o.kind for o in design.tick(now).to_produce] == [ProduceKind.DEADLETTER]


def test_expired_pending_tasks_are_never_handed_out(design: Design) -> None:
    design.ingest(make_record("a", expires_at=NOW + 5))
    design.ingest(make_record("b"), now=NOW + 1)
    assert design.tick(NOW + 5).expired == 1
    assert design.count(Status.PENDING) == 1
    design.ingest(make_record("c", expires_at=NOW + 6), now=NOW)
    assert design.claim(NOW + 6) == "b"
    assert design.claim(NOW + 6) is None


def test_delayed_tasks_wait_then_become_pending_at_a_tick(design: Design) -> None:
    design.ingest(make_record("a", received_at=NOW, delay_until=NOW + 30))
    design.ingest(make_record("capped", received_at=NOW, delay_until=NOW + 10 * 3600))
    assert design.count(Status.DELAY) == 2
    assert design.claim(NOW + 29) is None
    assert design.tick(NOW + 30).delays_due == 1
    assert design.claim(NOW + 30) == "a"
    assert design.tick(NOW + 3600).delays_due == 1  # capped at max_delayed_task_allowed_s


def test_ingest_should_pause_at_the_pending_limit(design: Design) -> None:
    design.ingest(make_record("a"), make_record("b"))
    assert not design.should_pause()
    design.ingest(make_record("c"))
    assert design.should_pause()
    design.claim()
    assert not design.should_pause()


# --- only the direct design ----------------------------------------------------------------------


def test_the_file_is_the_state_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "direct.sqlite"
    store = DirectStore(path, LIMITS)
    store.ingest((make_record("a"), make_record("b")), NOW)
    assert store.claim(NOW, None, None) == b"bytes-of-a"
    store.close()
    store = DirectStore(path, LIMITS)
    try:
        assert store.counts_by_status()[Status.PROCESSING] == 1
        assert store.claim(NOW, None, None) == b"bytes-of-b"
        stats = store.stats(ingest_paused=False)
        assert stats.by_status[Status.PROCESSING] == 2
        assert stats.claims == {"hit": 1}
    finally:
        store.close()


def test_a_handler_waits_for_the_lock_at_most_its_timeout(tmp_path: Path) -> None:
    slow = DirectStore(
        tmp_path / "direct.sqlite", LIMITS, lock_timeout_s=0.1, debug_commit_delay_ms=500
    )
    client = SqliteDirectStateClient(slow)
    holder = threading.Thread(target=slow.ingest, args=((make_record("a"),), NOW))
    holder.start()
    try:
        time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(ActorUnavailable, match="write lock"):
            client.claim(Claim())
        assert time.monotonic() - started < 0.4
    finally:
        holder.join(TIMEOUT_S)
        slow.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DirectStore]:
    store = DirectStore(tmp_path / "direct.sqlite", LIMITS)
    yield store
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)
    store.close()  # a second close is a no-op


def ask(ref: pykka.ActorRef[Any], message: object) -> Any:
    return ref.ask(message, block=True, timeout=TIMEOUT_S)


def test_the_actor_reports_persisted_offsets_and_backpressure(store: DirectStore) -> None:
    consumer = Collector()
    state = SqliteDirectState.start(
        store, MailboxConfig(size=100), backpressure_check_interval_ms=20, clock=lambda: NOW
    )
    state.tell(Connect(consumer=consumer))
    consumer.wait_until_told(IngestBackpressure(pause=False))
    records = tuple(make_record(name) for name in "abc")
    state.tell(Ingest(records, _offsets(records)))
    consumer.wait_until_told(Persisted(_offsets(records)))
    consumer.wait_until_told(IngestBackpressure(pause=True))
    # A claim in a handler thread, not through the actor: the timer notices it.
    assert SqliteDirectStateClient(store, clock=lambda: NOW).claim(Claim()) == b"bytes-of-a"
    consumer.messages.clear()
    consumer.wait_until_told(IngestBackpressure(pause=False))
    assert ask(state, Drain()) is True
    stats: StateStats = ask(state, Stats())
    assert (stats.by_status[Status.PENDING], stats.by_status[Status.PROCESSING]) == (2, 1)


def test_the_actor_ticks_and_finishes_produced_records(store: DirectStore) -> None:
    state = SqliteDirectState.start(store, MailboxConfig(size=100))
    store.ingest((make_record("a", on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER),), NOW)
    store.claim(NOW, None, None)
    store.conclude(NOW, Conclude(ActivationId("a"), Status.FAILURE))
    result: TickResult = ask(state, Tick(NOW + 1))
    assert [o.id for o in result.to_produce] == ["a"]
    state.tell(Produced((ActivationId("a"),)))
    assert ask(state, Tick(NOW + 2)).to_produce == ()


def test_grpc_handlers_claim_and_conclude_straight_from_sqlite(store: DirectStore) -> None:
    value = encode_activation(activation_id="t1", application="app")
    store.ingest((decode_record(value, 0, 0, time.time(), max_delay_s=3600),), time.time())
    config = FrontendConfig(host="127.0.0.1", port=0, max_workers=4, stop_grace_s=0.5)
    state = SqliteDirectState.start(store, MailboxConfig(size=100))
    frontend = GrpcFrontend.start(config, state, state_client=SqliteDirectStateClient(store))
    port = frontend.proxy().port.get(timeout=TIMEOUT_S)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ConsumerServiceStub(channel)
        task = stub.GetTask(pb.GetTaskRequest(application="app"), timeout=TIMEOUT_S).task
        assert task.id == "t1"
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        response = stub.SetTaskStatus(
            pb.SetTaskStatusRequest(
                id="t1",
                status=pb.TASK_ACTIVATION_STATUS_COMPLETE,
                fetch_next_task=pb.FetchNextTask(application="app"),
            ),
            timeout=TIMEOUT_S,
        )
        assert not response.HasField("task")
        stub.SetTaskStatus(
            pb.SetTaskStatusRequest(id="unknown", status=pb.TASK_ACTIVATION_STATUS_COMPLETE),
            timeout=TIMEOUT_S,
        )
    assert store.counts_by_status()[Status.PROCESSING] == 0
