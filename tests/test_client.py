"""actors/client.py against a real state actor behind a real gRPC front end on loopback:
the three calls, signing, which codes are retried and how often, and the worker loops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from actors.client import (
    AsyncBatchClient,
    BatchClient,
    CallFailed,
    Outcome,
    Result,
    RetriesExhausted,
    RetryPolicy,
    run_worker,
    run_worker_async,
)
from actors.embedded_kafka import free_port
from actors.errors import RecoverableError
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import ProduceKind, StateStats, Stats, Tick
from actors.records import Status
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.wire.sentry_protos.taskbroker.v1.taskbroker_pb2 import TaskActivation
from actors.wire.taskbroker_actors.v1 import batch_pb2
from tests.grpc_support import TIMEOUT_S, Broker, StartBroker, activation_record

FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.02)


@pytest.fixture
def broker(start_broker: StartBroker) -> Broker:
    return start_broker()


def target_of(broker: Broker) -> str:
    return f"127.0.0.1:{broker.frontend.proxy().port.get(timeout=TIMEOUT_S)}"


def stats_of(broker: Broker) -> StateStats:
    stats: StateStats = broker.ask_state(Stats())
    return stats


def ids(tasks: list[TaskActivation]) -> list[str]:
    return [task.id for task in tasks]


class CountingChannel:
    """A sync or aio channel that records the request bytes of every call made through it:
    one entry per attempt, seen from outside the client."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self.sent: list[tuple[str, bytes]] = []

    def unary_unary(self, path: str, **options: Any) -> Callable[..., Any]:
        send = self._channel.unary_unary(path, **options)

        def call(request: bytes, **call_options: Any) -> Any:
            self.sent.append((path, request))
            return send(request, **call_options)

        return call


# --- Calls -------------------------------------------------------------------------------------


def test_fetch_report_and_fetch_then_report_conclude_the_tasks(broker: Broker) -> None:
    first = activation_record("a")
    broker.ingest(
        first,
        activation_record("b", max_attempts=2),
        activation_record("c"),
        activation_record("elsewhere", application="other"),
    )
    with BatchClient(target_of(broker)) as client:
        fetched = client.fetch(2, wait_ms=0, application="app")
        assert ids(fetched) == ["a", "b"]
        assert fetched[0].SerializeToString(deterministic=True) == first.activation
        assert stats_of(broker).by_status.get(Status.PROCESSING) == 2
        rest = client.report_and_fetch(
            [
                Result("a", Outcome.COMPLETE),
                Result("b", Outcome.RETRY, max_attempts=4, delay_on_retry_s=30),
            ],
            max_tasks=5,
            wait_ms=0,
            application="app",
        )
        assert ids(rest) == ["c"]
        client.report([Result("c", Outcome.FAILURE), Result("unknown", Outcome.COMPLETE)])
    stats = stats_of(broker)
    assert stats.conclusions == {"applied": 3, "unknown": 1}
    assert stats.by_status[Status.PROCESSING] == 0
    assert stats.by_status.get(Status.PENDING) == 1  # the other application's
    (order,) = broker.ask_state(Tick(time.time())).to_produce
    assert (order.id, order.kind) == ("b", ProduceKind.RETRY)
    assert (order.max_attempts, order.delay_on_retry_s) == (4, 30)


def test_fetch_with_nothing_pending_waits_then_returns_no_task(broker: Broker) -> None:
    client = BatchClient(broker.channel)
    started = time.monotonic()
    assert client.fetch(8, wait_ms=150) == []
    assert time.monotonic() - started >= 0.14


def test_fetch_returns_a_task_that_arrives_while_it_waits(broker: Broker) -> None:
    client = BatchClient(broker.channel)
    with ThreadPoolExecutor(1) as pool:
        fetching = pool.submit(client.fetch, 8, 3000)
        time.sleep(0.1)
        broker.ingest(activation_record("late"))
        started = time.monotonic()
        assert ids(fetching.result(timeout=TIMEOUT_S)) == ["late"]
    assert time.monotonic() - started < 1.0


def test_signed_calls_are_accepted_and_others_refused(start_broker: StartBroker) -> None:
    broker = start_broker(shared_secrets=("old", "s"))
    broker.ingest(activation_record("a"), activation_record("b"))
    signed = BatchClient(broker.channel, shared_secret="s")
    assert ids(signed.fetch(1, wait_ms=0)) == ["a"]
    assert ids(signed.report_and_fetch([Result("a", Outcome.COMPLETE)], 1, wait_ms=0)) == ["b"]
    for client in (BatchClient(broker.channel), BatchClient(broker.channel, shared_secret="x")):
        with pytest.raises(CallFailed) as caught:
            client.report([Result("b", Outcome.COMPLETE)])
        assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.attempts == 1
        assert not isinstance(caught.value, RecoverableError)
    signed.report([Result("b", Outcome.COMPLETE)])
    assert stats_of(broker).conclusions == {"applied": 2}


def test_the_secret_stays_out_of_the_repr() -> None:
    client = BatchClient("127.0.0.1:1", shared_secret="hunter2")
    assert "hunter2" not in repr(client)
    assert "signed" in repr(client)
    client.close()


# --- Retries -----------------------------------------------------------------------------------


def test_unavailable_is_retried_until_the_broker_answers() -> None:
    port = free_port()
    # grpc waits ~1 s before reconnecting after a refused connection; the test need not.
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 50),
        ],
    )
    counting = CountingChannel(channel)
    client = BatchClient(counting, retry=RetryPolicy(attempts=200, base_delay_s=0.01))
    state = StateActor.start(StateConfig(), MailboxConfig(size=100))
    frontend = None
    try:
        with ThreadPoolExecutor(1) as pool:
            fetching = pool.submit(client.fetch, 1, 3000)
            wait_until(lambda: len(counting.sent) >= 2)  # refused at least once
            config = FrontendConfig(host="127.0.0.1", port=port, stop_grace_s=0.5)
            frontend = GrpcFrontend.start(config, state)
            Broker(state, frontend, channel).ingest(activation_record("a"))
            assert ids(fetching.result(timeout=TIMEOUT_S)) == ["a"]
    finally:
        channel.close()
        if frontend is not None:
            frontend.stop(timeout=TIMEOUT_S)
        state.stop(timeout=TIMEOUT_S)
    assert len(counting.sent) >= 2


def test_retries_stop_after_the_last_attempt(broker: Broker) -> None:
    counting = CountingChannel(broker.channel)
    client = BatchClient(counting, retry=FAST_RETRY)
    broker.state.stop(timeout=TIMEOUT_S)  # the front end answers UNAVAILABLE from now on
    with pytest.raises(RetriesExhausted) as caught:
        client.report([Result("a", Outcome.COMPLETE)])
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == 4
    assert isinstance(caught.value, RecoverableError)
    assert len(counting.sent) == 4
    assert len(set(counting.sent)) == 1  # the same bytes each time, under the same signature


def test_invalid_argument_is_raised_at_once(broker: Broker) -> None:
    counting = CountingChannel(broker.channel)
    client = BatchClient(counting, retry=FAST_RETRY)
    with pytest.raises(CallFailed) as caught:
        client.report_and_fetch([Result("", Outcome.COMPLETE)], 1, wait_ms=0)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == "results[0]: id is required"
    assert not isinstance(caught.value, RetriesExhausted)
    assert len(counting.sent) == 1


def test_retry_delays_double_up_to_their_bound() -> None:
    policy = RetryPolicy(attempts=6, base_delay_s=0.05, max_delay_s=0.3)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.05, 0.1, 0.2, 0.3, 0.3]


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"attempts": 0}, "attempts"),
        ({"base_delay_s": -1.0}, "base_delay_s"),
        ({"base_delay_s": 1.0, "max_delay_s": 0.5}, "max_delay_s"),
    ],
)
def test_retry_policy_names_the_invalid_key(fields: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} "):
        RetryPolicy(**fields)


# --- The worker loop ---------------------------------------------------------------------------


class Gauge:
    """How many are inside at once, and the most there ever were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self.most = 0

    def __enter__(self) -> None:
        with self._lock:
            self._inside += 1
            self.most = max(self.most, self._inside)

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._inside -= 1


def fetch_sizes(counting: CountingChannel) -> list[int]:
    return [
        batch_pb2.ReportAndFetchRequest.FromString(request).fetch.max_tasks
        for path, request in counting.sent
        if path.endswith("/ReportAndFetch")
    ]


TASK_IDS = [f"t{n}" for n in range(40)]


def ingest_tasks(broker: Broker) -> None:
    broker.ingest(
        *(activation_record(task_id) for task_id in TASK_IDS),
        activation_record("boom", max_attempts=3),
    )


def assert_every_task_concluded_once(
    broker: Broker, handled: Counter[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert handled == Counter([*TASK_IDS, "boom"])
    stats = stats_of(broker)
    assert stats.conclusions == {"applied": len(TASK_IDS) + 1}
    assert stats.by_status[Status.PROCESSING] == 0
    # The handler that raised: RETRY, so the task's retry state decides, and a traceback.
    (order,) = broker.ask_state(Tick(time.time())).to_produce
    assert (order.id, order.kind) == ("boom", ProduceKind.RETRY)
    (logged,) = [r for r in caplog.records if r.exc_info]
    assert "boom" in logged.getMessage()


def test_run_worker_runs_every_task_once_within_its_concurrency(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    ingest_tasks(broker)
    counting = CountingChannel(broker.channel)
    client = BatchClient(counting)
    gauge = Gauge()
    handled: Counter[str] = Counter()
    lock = threading.Lock()
    all_handled = threading.Event()

    def handle(task: TaskActivation) -> Outcome:
        with gauge:
            time.sleep(0.02)
        with lock:
            handled[task.id] += 1
            if len(handled) == len(TASK_IDS) + 1:
                all_handled.set()
        if task.id == "boom":
            raise RuntimeError("boom")
        return Outcome.COMPLETE

    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(
            run_worker, client, handle, concurrency=4, stop=stop, batch=3, wait_ms=50
        )
        assert all_handled.wait(TIMEOUT_S)
        stop.set()
        worker.result(timeout=TIMEOUT_S)
    assert gauge.most == 4
    assert max(fetch_sizes(counting)) == 3  # batch caps a fetch below the free slots
    assert_every_task_concluded_once(broker, handled, caplog)


def test_run_worker_on_stop_finishes_and_reports_what_it_fetched_then_fetches_no_more(
    broker: Broker,
) -> None:
    broker.ingest(*(activation_record(task_id) for task_id in ["a", "b", "c", "left"]))
    started = threading.Semaphore(0)
    release = threading.Event()

    def handle(task: TaskActivation) -> Result:
        started.release()
        release.wait(TIMEOUT_S)
        return Result(task.id, Outcome.COMPLETE)

    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(
            run_worker, BatchClient(broker.channel), handle, concurrency=3, stop=stop
        )
        for _ in range(3):
            assert started.acquire(timeout=TIMEOUT_S)
        stop.set()
        release.set()
        worker.result(timeout=TIMEOUT_S)
    stats = stats_of(broker)
    assert stats.conclusions == {"applied": 3}
    assert stats.by_status.get(Status.PENDING) == 1  # "left", never fetched


def test_run_worker_refuses_a_concurrency_below_one(broker: Broker) -> None:
    with pytest.raises(ValueError, match=r"^concurrency "):
        run_worker(
            BatchClient(broker.channel),
            lambda _: Outcome.COMPLETE,
            concurrency=0,
            stop=threading.Event(),
        )


# --- asyncio -----------------------------------------------------------------------------------


def test_async_calls_round_trip_signed(start_broker: StartBroker) -> None:
    broker = start_broker(shared_secrets=("s",))
    broker.ingest(activation_record("a"), activation_record("b"))

    async def scenario() -> None:
        async with AsyncBatchClient(target_of(broker), shared_secret="s") as client:
            assert ids(await client.fetch(1, wait_ms=0)) == ["a"]
            tasks = await client.report_and_fetch([Result("a", Outcome.COMPLETE)], 5, 0)
            assert ids(tasks) == ["b"]
            await client.report([Result("b", Outcome.COMPLETE)])
            assert await client.fetch(5, wait_ms=0) == []
        async with AsyncBatchClient(target_of(broker)) as unsigned:
            with pytest.raises(CallFailed) as caught:
                await unsigned.fetch(1, wait_ms=0)
            assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(scenario())
    assert stats_of(broker).conclusions == {"applied": 2}


def test_async_retries_stop_after_the_last_attempt(broker: Broker) -> None:
    broker.state.stop(timeout=TIMEOUT_S)

    async def scenario() -> list[tuple[str, bytes]]:
        async with grpc.aio.insecure_channel(target_of(broker)) as channel:
            counting = CountingChannel(channel)
            client = AsyncBatchClient(counting, retry=FAST_RETRY)
            with pytest.raises(RetriesExhausted) as caught:
                await client.fetch(1, wait_ms=0)
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE
            return counting.sent

    assert len(asyncio.run(scenario())) == 4


def test_async_run_worker_runs_every_task_once_within_its_concurrency(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    ingest_tasks(broker)
    gauge = Gauge()
    handled: Counter[str] = Counter()

    async def scenario() -> None:
        stop = asyncio.Event()

        async def handle(task: TaskActivation) -> Outcome:
            with gauge:
                await asyncio.sleep(0.02)
            handled[task.id] += 1
            if len(handled) == len(TASK_IDS) + 1:
                stop.set()  # the last results go out in the loop's final report
            if task.id == "boom":
                raise RuntimeError("boom")
            return Outcome.COMPLETE

        async with AsyncBatchClient(target_of(broker)) as client:
            await asyncio.wait_for(
                run_worker_async(client, handle, concurrency=4, stop=stop, wait_ms=50),
                TIMEOUT_S,
            )

    asyncio.run(scenario())
    assert gauge.most == 4
    assert_every_task_concluded_once(broker, handled, caplog)


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
