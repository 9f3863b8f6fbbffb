"""Push delivery: `PushPolicy`'s decisions with numbers for a clock, then the `Pusher` with a
real state actor and fake workers serving `WorkerService/PushTask` on loopback."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pykka
import pytest
from prometheus_client import CollectorRegistry

from actors.activation import encode_activation
from actors.auth import SignatureCheck
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.messages import Ingest, StateStats, Stats, Tick, TickResult
from actors.metrics import PusherMetrics
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.push_policy import Ask, PushLimits, PushPolicy
from actors.pusher import PUSH_TASK_PATH, Pusher, PusherConfig, channel_target
from actors.records import KafkaOffset, Record, Status
from actors.runtime import MailboxConfig, MailboxPolicy
from actors.state import StateActor, StateConfig
from actors.supervisor import Supervisor
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from tests.grpc_support import StartBroker, activation_record
from tests.kafka_support import broker_config

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

TIMEOUT_S = 5.0
WORKER_SERVICE = "sentry_protos.taskbroker.v1.WorkerService"


# --- PushPolicy: no thread, no network -------------------------------------------------------


def policy(worker_map: Mapping[str, tuple[str, ...]], **limits: Any) -> PushPolicy:
    return PushPolicy(worker_map, PushLimits(**limits))


def test_the_endpoint_with_the_fewest_outstanding_pushes_takes_the_next() -> None:
    p = policy({"app": ("a:1", "b:1", "c:1")})
    assert Counter(p.choose("app", now=0.0) for _ in range(6)) == {"a:1": 2, "b:1": 2, "c:1": 2}
    p.finished("b:1", ok=True, now=0.1)
    p.finished("b:1", ok=True, now=0.1)
    assert p.choose("app", now=0.2) == "b:1"
    assert p.in_flight == 5


def test_a_failed_push_backs_its_endpoint_off_doubling_to_the_cap_and_an_ok_resets() -> None:
    p = policy({"app": ("a:1", "b:1")}, backoff_s=0.2, max_backoff_s=0.5)
    assert [p.choose("app", now=0.0) for _ in range(3)] == ["a:1", "b:1", "a:1"]
    assert p.finished("a:1", ok=False, now=1.0) == 0.2
    # The rest of a burst sent before the first failure came back: no longer rest.
    assert p.finished("a:1", ok=False, now=1.1) is None
    assert [p.choose("app", now=1.15) for _ in range(2)] == ["b:1", "b:1"]

    # Rested but suspect: it takes one push at a time until one succeeds.
    assert [p.choose("app", now=1.2) for _ in range(2)] == ["a:1", "b:1"]
    assert p.finished("a:1", ok=False, now=1.3) == 0.4
    assert p.choose("app", now=1.69) == "b:1"
    assert p.choose("app", now=1.71) == "a:1"
    assert p.finished("a:1", ok=False, now=1.8) == 0.5  # the cap
    assert p.choose("app", now=2.3) == "a:1"
    assert p.finished("a:1", ok=True, now=2.4) is None
    assert p.endpoint("a:1").healthy

    assert p.choose("app", now=2.5) == "a:1"
    assert p.finished("a:1", ok=False, now=2.6) == 0.2  # reset: the first rest again


def test_room_counts_pushes_in_flight_and_outstanding_asks_and_waits_for_a_fair_batch() -> None:
    p = policy({"app": ("a:1",)}, max_in_flight=40, batch_length=32)
    assert p.limits.min_ask == 10
    assert p.asks(now=0.0) == [Ask("app", 32)]
    assert p.room == 8
    assert p.asks(now=0.0) == []  # one ask outstanding per application
    p.claimed("app", 32, now=0.0)
    for _ in range(32):
        p.choose("app", now=0.0)
    assert (p.in_flight, p.room) == (32, 8)
    assert p.asks(now=0.0) == []  # 8 free: pushes ending one by one are not one ask each
    p.finished("a:1", ok=True, now=0.1)
    p.finished("a:1", ok=True, now=0.1)
    assert p.asks(now=0.1) == [Ask("app", 10)]
    p.claimed("app", 3, now=0.1)  # fewer than asked: the reservation ends with the answer
    assert p.room == 10


def test_applications_take_turns_at_the_room() -> None:
    p = policy({"one": ("a:1",), "two": ("b:1",)}, max_in_flight=40, batch_length=32)
    assert p.asks(now=0.0) == [Ask("one", 32)]  # 8 left: too little for "two"
    p.claimed("one", 0, now=0.0)
    assert p.asks(now=1.0) == [Ask("two", 32)]


def test_an_empty_answer_rests_the_application_for_an_idle_pause_that_grows() -> None:
    p = policy({"app": ("a:1",)}, idle_pause_s=0.02, max_idle_pause_s=0.05)
    pauses = []
    now = 0.0
    for _ in range(4):
        assert p.asks(now) == [Ask("app", 32)]
        p.claimed("app", 0, now)
        assert p.asks(now) == []
        wakeup = p.next_wakeup(now)
        assert wakeup is not None
        pauses.append(round(wakeup - now, 6))
        now = wakeup
    assert pauses == [0.02, 0.04, 0.05, 0.05]
    assert p.asks(now) == [Ask("app", 32)]
    p.claimed("app", 5, now)  # something was pending: ask again at once, pause reset
    assert p.asks(now) == [Ask("app", 32)]
    p.claimed("app", 0, now)
    assert p.next_wakeup(now) == pytest.approx(now + 0.02)


def test_an_application_whose_endpoints_rest_is_not_asked_then_probed_one_task_each() -> None:
    p = policy({"app": ("a:1", "b:1")}, backoff_s=0.2)
    assert p.asks(now=0.0) == [Ask("app", 32)]
    p.claimed("app", 2, now=0.0)
    p.choose("app", now=0.0)
    p.choose("app", now=0.0)
    p.finished("a:1", ok=False, now=0.1)
    p.finished("b:1", ok=False, now=0.15)
    assert p.asks(now=0.2) == []
    assert p.next_wakeup(now=0.2) == pytest.approx(0.3)
    assert p.asks(now=0.31) == [Ask("app", 1)]  # a:1 rested; b:1 rests until 0.35
    p.claimed("app", 1, now=0.31)
    assert p.choose("app", now=0.31) == "a:1"
    assert p.asks(now=0.31) == []  # a:1 takes one probe at a time, b:1 rests
    assert p.asks(now=0.36) == [Ask("app", 1)]


def test_a_stopped_policy_asks_nothing_and_sets_no_wakeup() -> None:
    p = policy({"app": ("a:1",)})
    p.stopped = True
    assert p.asks(now=0.0) == []
    assert p.next_wakeup(now=0.0) is None
    assert p.quiet


def test_channel_targets_resolve_names_round_robin_and_leave_addresses_alone() -> None:
    assert channel_target("10.0.0.7:50052") == ("10.0.0.7:50052", ())
    assert channel_target("[::1]:50052") == ("[::1]:50052", ())
    assert channel_target("workers.svc:50052") == (
        "dns:///workers.svc:50052",
        (("grpc.lb_policy_name", "round_robin"),),
    )


def test_pusher_config_refuses_a_lease_no_longer_than_the_timeout() -> None:
    with pytest.raises(ValueError, match="lease_ms"):
        PusherConfig({"app": ("a:1",)}, timeout_ms=1000, lease_ms=1000)
    with pytest.raises(ValueError, match="worker_map"):
        PusherConfig({})
    with pytest.raises(ValueError, match="batch_length"):
        PusherConfig({"app": ("a:1",)}, batch_length=0)


# --- fake workers ------------------------------------------------------------------------------


class FakeWorker:
    """A `WorkerService` on 127.0.0.1 as the push worker behaves: a pushed task joins a
    bounded queue, or the call answers RESOURCE_EXHAUSTED "worker busy" when it is full.

    `hold()` makes later pushes wait for `answer()` (a worker that is slow, or never
    answers); `secrets`, when given, are checked as the worker checks them."""

    def __init__(self, capacity: int = 1000, secrets: tuple[str, ...] = (), port: int = 0) -> None:
        self.tasks: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.held = 0
        self._lock = threading.Lock()
        self._answering = threading.Event()
        self._answering.set()
        self._check = SignatureCheck(secrets)
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=64), options=[("grpc.so_reuseport", 0)]
        )
        handler = grpc.unary_unary_rpc_method_handler(self._push)  # raw bytes both ways
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(WORKER_SERVICE, {"PushTask": handler}),)
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port, f"cannot listen on 127.0.0.1:{port}"
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self) -> None:
        self._answering.clear()

    def answer(self) -> None:
        self._answering.set()

    def take_all(self) -> list[str]:
        """Empty the queue, as the worker's children would."""
        taken = []
        while not self.tasks.empty():
            taken.append(self.tasks.get_nowait())
        return taken

    def kill(self) -> None:
        self._server.stop(grace=None).wait(TIMEOUT_S)
        self._answering.set()  # handler threads still waiting may end

    def _push(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if not self._check.verify(PUSH_TASK_PATH, request, context.invocation_metadata()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad signature")
        task_id = pb.PushTaskRequest.FromString(request).task.id
        if not self._answering.is_set():
            with self._lock:
                self.held += 1
            self._answering.wait(TIMEOUT_S * 2)
        with self._lock:
            try:
                self.tasks.put_nowait(task_id)
            except queue.Full:
                self.refused.append(task_id)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "worker busy")
            self.accepted.append(task_id)
        return b""


class HandledCounter:
    """The state's mailbox observer: counts the messages it handled, by type."""

    def __init__(self) -> None:
        self.handled_by: Counter[str] = Counter()

    def enqueued(self, actor: str, depth: int) -> None:
        pass

    def overflowed(self, actor: str, policy: MailboxPolicy) -> None:
        pass

    def dequeued(self, actor: str, message_type: str, waited_s: float, depth: int) -> None:
        pass

    def handled(self, actor: str, message_type: str, seconds: float) -> None:
        self.handled_by[message_type] += 1


class Outcomes:
    """A `PushObserver` that keeps the codes it is told, per endpoint."""

    def __init__(self) -> None:
        self.codes: list[tuple[str, grpc.StatusCode]] = []
        self.backoffs: list[str] = []
        self.unmapped: list[dict[str, int]] = []

    def push_started(self, endpoint: str) -> None:
        pass

    def pushed(self, endpoint: str, code: grpc.StatusCode, seconds: float) -> None:
        self.codes.append((endpoint, code))

    def backed_off(self, endpoint: str) -> None:
        self.backoffs.append(endpoint)

    def claim_answered(self, application: str, tasks: int) -> None:
        pass

    def unmapped_pending(self, counts: Mapping[str, int]) -> None:
        self.unmapped.append(dict(counts))


@pytest.fixture
def workers() -> Iterator[Callable[..., FakeWorker]]:
    started: list[FakeWorker] = []

    def start(**options: Any) -> FakeWorker:
        worker = FakeWorker(**options)
        started.append(worker)
        return worker

    yield start
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)
    for worker in started:
        worker.kill()


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails a test in which the broker logged an error: every failure here is expected."""
    yield
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("actors")
    ]
    assert not errors, [r.getMessage() for r in errors]


def start_state(observer: HandledCounter | None = None) -> pykka.ActorRef[StateActor]:
    return StateActor.start(StateConfig(), MailboxConfig(size=1000), observer=observer)


def start_pusher(
    state: pykka.ActorRef[Any],
    worker_map: Mapping[str, tuple[str, ...]],
    observer: Any = None,
    **settings: Any,
) -> pykka.ActorRef[Pusher]:
    settings.setdefault("timeout_ms", 2000)
    settings.setdefault("lease_ms", 60_000)
    settings.setdefault("backoff_ms", 100)
    settings.setdefault("max_backoff_ms", 400)
    return Pusher.start(PusherConfig(worker_map, **settings), state, observer=observer)


def ingest(state: pykka.ActorRef[Any], *ids: str, application: str = "app") -> list[Record]:
    records = [activation_record(i, application=application) for i in ids]
    offsets = tuple(KafkaOffset(r.partition, r.offset) for r in records)
    state.tell(Ingest(tuple(records), offsets))
    return records


def ask(state: pykka.ActorRef[Any], message: object) -> Any:
    return state.ask(message, block=True, timeout=TIMEOUT_S)


def stats(state: pykka.ActorRef[Any]) -> StateStats:
    answer: StateStats = ask(state, Stats())
    return answer


def counts(state: pykka.ActorRef[Any]) -> dict[str, int]:
    return {s.name.lower(): n for s, n in stats(state).by_status.items() if n}


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.01)


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


# --- the Pusher with a real state actor ---------------------------------------------------------


def test_tasks_are_pushed_oldest_first_and_processing_once_acknowledged(
    workers: Callable[..., FakeWorker],
) -> None:
    worker = workers()
    state = start_state()
    expected = ids("t", 12)
    ingest(state, *expected)
    # One push at a time, so the arrival order is the order the pusher sent them in.
    start_pusher(state, {"app": (worker.endpoint,)}, max_in_flight=1)
    wait_until(lambda: counts(state) == {"processing": 12}, "all acknowledged")
    assert worker.accepted == expected


def test_a_busy_worker_is_backed_off_its_tasks_stay_pending_and_go_later(
    workers: Callable[..., FakeWorker],
) -> None:
    worker = workers(capacity=3)
    state = start_state()
    expected = ids("b", 8)
    ingest(state, *expected)
    outcomes = Outcomes()
    # One push at a time, so that the arrival order shows the claim order.
    start_pusher(state, {"app": (worker.endpoint,)}, observer=outcomes, max_in_flight=1)
    wait_until(lambda: counts(state) == {"processing": 3, "pending": 5}, "3 queued, 5 pending")
    assert worker.accepted == expected[:3]
    assert worker.refused[0] == expected[3]
    assert set(outcomes.backoffs) == {worker.endpoint}

    delivered = worker.take_all()
    while len(delivered) < len(expected):
        wait_until(lambda: not worker.tasks.empty(), "the worker got more")
        delivered += worker.take_all()
    # Nothing lost, nothing twice, and a refused task went back to its place.
    assert delivered == expected
    assert set(worker.refused) <= set(expected[3:])
    wait_until(lambda: counts(state) == {"processing": 8}, "all acknowledged")


def test_a_worker_down_at_start_costs_a_bounded_claim_rate_and_loses_nothing(
    workers: Callable[..., FakeWorker],
) -> None:
    port = free_port()
    handled = HandledCounter()
    state = start_state(handled)
    expected = ids("d", 20)
    ingest(state, *expected)
    start_pusher(state, {"app": (f"127.0.0.1:{port}",)}, backoff_ms=200, max_backoff_ms=1000)
    time.sleep(1.0)
    claims_in_first_second = handled.handled_by["ClaimForPush"]
    # Two at 0 s (the second finds nothing more), then one probe after each rest of 200 and
    # 400 ms: 4 measured. A pusher that spun would ask thousands of times.
    assert 1 <= claims_in_first_second <= 5, handled.handled_by
    wait_until(lambda: counts(state) == {"pending": 20}, "every task pending")

    worker = workers(port=port)
    wait_until(lambda: len(worker.accepted) == 20, "delivered once the worker is up")
    assert sorted(worker.accepted) == expected
    # The worker accepted before the pusher's settlement reached the state.
    wait_until(lambda: counts(state) == {"processing": 20}, "every push acknowledged")


def test_a_killed_worker_returns_unacknowledged_tasks_at_once_and_the_rest_at_deadline(
    workers: Callable[..., FakeWorker],
) -> None:
    worker = workers()
    state = start_state()
    first, later = ids("k", 3), ids("m", 4)
    ingest(state, *first)
    pusher = start_pusher(state, {"app": (worker.endpoint,)})
    wait_until(lambda: counts(state) == {"processing": 3}, "the first three acknowledged")
    worker.hold()
    ingest(state, *later)
    wait_until(lambda: worker.held == 4, "the next four in flight")
    worker.kill()
    # Pending again at once, not when their 60 s lease ends (a probe may be out briefly).
    wait_until(lambda: counts(state) == {"processing": 3, "pending": 4}, "unacknowledged back")
    pusher.stop(timeout=TIMEOUT_S)
    assert counts(state) == {"processing": 3, "pending": 4}

    deadline = time.time() + 10 + 3 + 1  # processing_deadline_duration + grace, and a second
    ticked: TickResult = ask(state, Tick(deadline))
    assert ticked.deadline_resets == 3
    assert counts(state) == {"pending": 7}


def test_a_worker_that_never_answers_gets_its_tasks_back_after_the_push_timeout(
    workers: Callable[..., FakeWorker],
) -> None:
    worker = workers()
    worker.hold()
    state = start_state()
    ingest(state, *ids("n", 3))
    outcomes = Outcomes()
    started = time.monotonic()
    # A long rest afterwards, so the test sees them pending before they are pushed again.
    start_pusher(
        state,
        {"app": (worker.endpoint,)},
        observer=outcomes,
        timeout_ms=300,
        backoff_ms=5000,
        max_backoff_ms=5000,
    )
    wait_until(lambda: counts(state) == {"claimed": 3}, "three pushes out")
    wait_until(lambda: counts(state) == {"pending": 3}, "pending after the timeout")
    assert time.monotonic() - started >= 0.3
    assert outcomes.codes == [(worker.endpoint, grpc.StatusCode.DEADLINE_EXCEEDED)] * 3
    assert outcomes.backoffs == [worker.endpoint]


def test_a_result_that_arrives_before_the_push_answer_concludes_the_task(
    start_broker: StartBroker, workers: Callable[..., FakeWorker]
) -> None:
    worker = workers()
    worker.hold()
    broker = start_broker(pulls=False)
    ingest(broker.state, "r1")
    start_pusher(broker.state, {"app": (worker.endpoint,)})
    wait_until(lambda: worker.held == 1, "the push reached the worker")
    assert counts(broker.state) == {"claimed": 1}

    # The worker ran it and reported before its acknowledgement reached the broker.
    complete = pb.TASK_ACTIVATION_STATUS_COMPLETE
    broker.stub.SetTaskStatus(pb.SetTaskStatusRequest(id="r1", status=complete), timeout=TIMEOUT_S)
    assert counts(broker.state) == {}
    worker.answer()
    wait_until(lambda: worker.accepted == ["r1"], "acknowledged")
    time.sleep(0.05)  # the settlement follows within a round of the pusher's loop
    assert counts(broker.state) == {}
    assert stats(broker.state).conclusions == {"applied": 1}


def test_a_stop_with_pushes_in_flight_leaves_their_tasks_pending(
    workers: Callable[..., FakeWorker],
) -> None:
    worker = workers()
    state = start_state()
    ingest(state, *ids("s", 2))
    pusher = start_pusher(state, {"app": (worker.endpoint,)}, stop_wait_ms=200)
    wait_until(lambda: counts(state) == {"processing": 2}, "two acknowledged")
    worker.hold()
    ingest(state, *ids("h", 5))
    wait_until(lambda: worker.held == 5, "five pushes in flight")

    started = time.monotonic()
    pusher.stop(timeout=TIMEOUT_S)
    assert time.monotonic() - started < 0.2 + 1.0  # stop_wait_ms, and closing
    assert counts(state) == {"processing": 2, "pending": 5}


def test_pushes_are_signed_with_the_first_secret_and_a_refused_signature_is_a_failure(
    workers: Callable[..., FakeWorker],
) -> None:
    trusting = workers(secrets=("old", "new"))
    stranger = workers(secrets=("someone-else",))
    state = start_state()
    ingest(state, "g1", "g2", application="good")
    ingest(state, "x1", application="bad")
    outcomes = Outcomes()
    start_pusher(
        state,
        {"good": (trusting.endpoint,), "bad": (stranger.endpoint,)},
        observer=outcomes,
        shared_secrets=("new", "old"),
    )
    wait_until(lambda: sorted(trusting.accepted) == ["g1", "g2"], "signed pushes accepted")
    wait_until(
        lambda: (stranger.endpoint, grpc.StatusCode.UNAUTHENTICATED) in outcomes.codes,
        "the other worker refused the signature",
    )
    assert stranger.accepted == []
    by_group = stats(state).by_group
    assert by_group[("good", "ns", Status.PROCESSING)] == 2
    bad = {s: n for (a, _, s), n in by_group.items() if a == "bad"}
    assert bad in ({Status.PENDING: 1}, {Status.CLAIMED: 1})  # refused, or probing again


def test_pushes_spread_over_endpoints_and_a_dns_name_works(
    workers: Callable[..., FakeWorker],
) -> None:
    by_address, by_name = workers(), workers()
    for worker in (by_address, by_name):
        worker.hold()
    state = start_state()
    ingest(state, *ids("p", 6))
    start_pusher(state, {"app": (by_address.endpoint, f"localhost:{by_name.port}")})
    wait_until(lambda: by_address.held + by_name.held == 6, "six pushes in flight")
    assert (by_address.held, by_name.held) == (3, 3)
    by_address.answer()
    by_name.answer()
    wait_until(lambda: counts(state) == {"processing": 6}, "all acknowledged")


def test_an_unmapped_application_is_counted_and_logged_once(
    workers: Callable[..., FakeWorker], caplog: pytest.LogCaptureFixture
) -> None:
    worker = workers()
    state = start_state()
    ingest(state, "o1", "o2", application="orphans")
    ingest(state, "a1")
    outcomes = Outcomes()
    with caplog.at_level(logging.WARNING, logger="actors.pusher"):
        start_pusher(state, {"app": (worker.endpoint,)}, observer=outcomes, unmapped_check_ms=30)
        wait_until(lambda: len(outcomes.unmapped) >= 4, "several checks")
    assert outcomes.unmapped[-1] == {"orphans": 2}
    assert worker.accepted == ["a1"]
    warnings = [r.getMessage() for r in caplog.records if "worker_map" in r.getMessage()]
    assert len(warnings) == 1
    assert "'orphans' has 2 pending" in warnings[0]


def test_pusher_metrics_count_pushes_latency_in_flight_backoffs_and_claim_asks(
    workers: Callable[..., FakeWorker],
) -> None:
    registry = CollectorRegistry()
    worker = workers(capacity=1)
    state = start_state()
    ingest(state, "q1", "q2")
    start_pusher(state, {"app": (worker.endpoint,)}, observer=PusherMetrics(registry))

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(f"taskbroker_{name}", labels) or 0.0

    endpoint = worker.endpoint
    wait_until(lambda: value("push_backoffs_total", endpoint=endpoint) == 1, "a backoff")
    assert value("pushes_total", endpoint=endpoint, code="OK") == 1
    assert value("pushes_total", endpoint=endpoint, code="RESOURCE_EXHAUSTED") >= 1
    assert value("push_duration_seconds_count", endpoint=endpoint, code="OK") == 1
    assert value("push_claim_asks_total", application="app", result="tasks") >= 1
    wait_until(lambda: value("push_in_flight", endpoint=endpoint) == 0, "nothing in flight")


# --- wired by the supervisor ---------------------------------------------------------------------


@pytest.mark.kafka
def test_a_push_mode_broker_pushes_what_it_consumes_and_stops_with_the_unacknowledged_pending(
    kafka: EmbeddedKafka,
    kafka_topics: TopicFactory,
    tmp_path: Path,
    workers: Callable[..., FakeWorker],
) -> None:
    worker = workers()
    topic, dlq = kafka_topics()
    db = tmp_path / "push.sqlite"
    supervisor = Supervisor(
        broker_config(
            kafka.bootstrap,
            topic,
            dlq,
            db,
            delivery_mode="push",
            worker_map={"app": [worker.endpoint]},
            kafka_auto_offset_reset="earliest",
            **{"push.timeout_ms": 500},
        )
    )
    broker = supervisor.start()
    try:
        assert [name for name, _ in broker.actors] == [
            "state",
            "writer",
            "upkeep",
            "pusher",
            "consumer",
            "frontend",
        ]
        produce(kafka, topic, ids("a", 3))
        wait_until(lambda: sorted(worker.accepted) == ids("a", 3), "pushed", timeout_s=30)
        worker.hold()
        produce(kafka, topic, ids("h", 2))
        wait_until(lambda: worker.held == 2, "two pushes in flight", timeout_s=30)
    finally:
        supervisor.stop(broker)

    with sqlite3.connect(db) as connection:
        stored = dict(connection.execute("SELECT id, status FROM activations").fetchall())
    assert stored == {
        **dict.fromkeys(ids("a", 3), Status.PROCESSING.value),
        **dict.fromkeys(ids("h", 2), Status.PENDING.value),
    }


def produce(kafka: EmbeddedKafka, topic: str, activation_ids: list[str]) -> None:
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    try:
        report = producer.produce_many(
            [
                OutgoingMessage(i, topic, encode_activation(activation_id=i, application="app"))
                for i in activation_ids
            ],
            timeout_s=TIMEOUT_S,
        )
    finally:
        producer.close(timeout_s=TIMEOUT_S)
    assert report.all_acknowledged, report.failed
