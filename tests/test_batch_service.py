"""Our batched worker API (`taskbroker_actors.v1.TaskBatchService`) over a real loopback
server, a real state actor and a real SQLite writer: every task it moves has the unary
API's semantics (WIRE.md), and a client that goes away strands nothing."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pykka
import pytest

from actors.auth import SIGNATURE_METADATA_KEY, sign
from actors.messages import Connect, Drain, ProduceKind, Stats, Tick, TickResult
from actors.records import OnAttemptsExceeded, Status
from actors.runtime import MailboxConfig
from actors.services import BATCH_SERVICE_NAME, BatchLimits
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.taskbroker_actors.v1 import batch_pb2 as bpb
from actors.wire.taskbroker_actors.v1 import batch_pb2_grpc as bpb_grpc
from actors.writer import SqliteWriter, WriterConfig
from tests.grpc_support import TIMEOUT_S, Broker, StartBroker, activation_record

COMPLETE = pb.TASK_ACTIVATION_STATUS_COMPLETE
RETRY = pb.TASK_ACTIVATION_STATUS_RETRY
FAILURE = pb.TASK_ACTIVATION_STATUS_FAILURE


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "batch.sqlite"


@pytest.fixture
def broker(start_broker: StartBroker, db_path: Path) -> Broker:
    started = start_broker(batch_limits=BatchLimits(max_fetch=8, max_results=16, max_wait_ms=2000))
    writer = SqliteWriter.start(WriterConfig(db_path), started.state, mailbox=MailboxConfig(16))
    started.state.tell(Connect(writer=writer))
    return started


def stub_of(broker: Broker) -> bpb_grpc.TaskBatchServiceStub:
    return bpb_grpc.TaskBatchServiceStub(broker.channel)


def fetch(broker: Broker, max_tasks: int = 8, wait_ms: int = 0, **filters: str) -> list[str]:
    request = bpb.FetchTasksRequest(max_tasks=max_tasks, wait_ms=wait_ms, **filters)
    response = stub_of(broker).FetchTasks(request, timeout=TIMEOUT_S)
    return [task.id for task in response.tasks]


def result(activation_id: str, status: int = COMPLETE, **fields: Any) -> bpb.TaskResult:
    return bpb.TaskResult(id=activation_id, status=status, **fields)  # type: ignore[arg-type]


def report(broker: Broker, *results: bpb.TaskResult) -> None:
    stub_of(broker).ReportResults(bpb.ReportResultsRequest(results=results), timeout=TIMEOUT_S)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def by_status(broker: Broker) -> dict[Status, int]:
    counts: dict[Status, int] = broker.ask_state(Stats()).by_status
    return {status: n for status, n in counts.items() if n}


# --- FetchTasks ---------------------------------------------------------------------------------


def test_fetch_hands_out_up_to_max_tasks_oldest_first_each_processing(broker: Broker) -> None:
    broker.ingest(*(activation_record(f"t{i}") for i in range(5)))
    assert fetch(broker, max_tasks=3) == ["t0", "t1", "t2"]
    assert by_status(broker) == {Status.PROCESSING: 3, Status.PENDING: 2}
    assert fetch(broker, max_tasks=0) == ["t3"]  # 0 asks for one
    assert fetch(broker, max_tasks=100) == ["t4"]
    assert fetch(broker) == []


def test_fetch_is_capped_at_the_brokers_limit(broker: Broker) -> None:
    broker.ingest(*(activation_record(f"t{i}") for i in range(20)))
    assert len(fetch(broker, max_tasks=1000)) == 8


def test_fetch_hands_out_the_stored_bytes(broker: Broker) -> None:
    record = activation_record("a")
    broker.ingest(record)
    response = stub_of(broker).FetchTasks(bpb.FetchTasksRequest(max_tasks=1), timeout=TIMEOUT_S)
    assert response.tasks[0].SerializeToString(deterministic=True) == record.activation


def test_fetch_honours_application_and_namespace(broker: Broker) -> None:
    broker.ingest(
        activation_record("a1", application="a", namespace="x"),
        activation_record("b1", application="b", namespace="x"),
        activation_record("a2", application="a", namespace="y"),
    )
    assert fetch(broker, application="a", namespace="y") == ["a2"]
    assert fetch(broker, namespace="x") == ["a1", "b1"]


def test_a_waiting_fetch_gets_a_task_that_arrives_meanwhile(broker: Broker) -> None:
    later = threading.Timer(0.2, lambda: broker.ingest(activation_record("late")))
    later.start()
    started = time.monotonic()
    assert fetch(broker, wait_ms=1500) == ["late"]
    assert 0.15 < time.monotonic() - started < 1.0


def test_a_fetch_waits_at_most_wait_ms_then_answers_empty(broker: Broker) -> None:
    started = time.monotonic()
    assert fetch(broker, wait_ms=300) == []
    assert 0.25 < time.monotonic() - started < 1.5
    started = time.monotonic()
    assert fetch(broker, wait_ms=60_000) == []  # capped at the broker's 2 s
    assert time.monotonic() - started < 3.0


# --- ReportResults ------------------------------------------------------------------------------


def test_report_applies_every_result_and_an_unknown_id_is_ok(broker: Broker) -> None:
    broker.ingest(*(activation_record(f"t{i}") for i in range(3)))
    assert fetch(broker) == ["t0", "t1", "t2"]
    report(broker, result("t0"), result("t1"), result("nobody"))
    assert broker.ask_state(Stats()).conclusions == {"applied": 2, "unknown": 1}
    assert by_status(broker) == {Status.PROCESSING: 1}


def test_retry_and_failure_have_the_unary_semantics(broker: Broker) -> None:
    broker.ingest(
        activation_record("retry", max_attempts=1, delay_on_retry_s=5),
        activation_record("dlq", on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER),
        activation_record("drop", on_attempts_exceeded=OnAttemptsExceeded.DISCARD),
    )
    assert len(fetch(broker)) == 3
    report(
        broker,
        result("retry", RETRY, max_attempts=4, delay_on_retry=30),
        result("dlq", FAILURE),
        result("drop", FAILURE),
    )
    ticked: TickResult = broker.ask_state(Tick(time.time()))
    orders = {str(order.id): order for order in ticked.to_produce}
    assert set(orders) == {"retry", "dlq"}
    assert orders["retry"].kind is ProduceKind.RETRY
    assert (orders["retry"].max_attempts, orders["retry"].delay_on_retry_s) == (4, 30)
    assert orders["dlq"].kind is ProduceKind.DEADLETTER


def test_a_late_result_concludes_a_task_reset_after_its_deadline(broker: Broker) -> None:
    broker.ingest(activation_record("slow", processing_deadline_duration_s=1))
    assert fetch(broker) == ["slow"]
    broker.ask_state(Tick(time.time() + 60))  # past the deadline and its grace: reset
    assert by_status(broker) == {Status.PENDING: 1}
    report(broker, result("slow"))
    assert broker.ask_state(Stats()).conclusions == {"late": 1}
    assert by_status(broker) == {}


def test_one_bad_result_refuses_the_call_with_its_index_and_applies_none(broker: Broker) -> None:
    broker.ingest(activation_record("a"), activation_record("b"))
    fetch(broker)
    error = rpc_error(
        lambda: report(broker, result("a"), result("b", pb.TASK_ACTIVATION_STATUS_PENDING))
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("results[1]: status must be")
    error = rpc_error(lambda: report(broker, result("a"), result("")))
    assert error.details() == "results[1]: id is required"
    assert by_status(broker) == {Status.PROCESSING: 2}


def test_more_results_than_the_limit_are_refused(broker: Broker) -> None:
    error = rpc_error(lambda: report(broker, *(result(f"t{i}") for i in range(17))))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "at most 16 results per call, got 17"


# --- ReportAndFetch -----------------------------------------------------------------------------


def test_report_and_fetch_applies_the_results_then_hands_out_more(broker: Broker) -> None:
    broker.ingest(*(activation_record(f"t{i}") for i in range(4)))
    assert fetch(broker, max_tasks=2) == ["t0", "t1"]
    response = stub_of(broker).ReportAndFetch(
        bpb.ReportAndFetchRequest(
            results=[result("t0"), result("t1")], fetch=bpb.FetchTasksRequest(max_tasks=5)
        ),
        timeout=TIMEOUT_S,
    )
    assert [task.id for task in response.tasks] == ["t2", "t3"]
    assert broker.ask_state(Stats()).conclusions == {"applied": 2}
    assert by_status(broker) == {Status.PROCESSING: 2}


def test_what_the_service_did_reaches_sqlite(broker: Broker, db_path: Path) -> None:
    broker.ingest(*(activation_record(f"t{i}") for i in range(3)))
    fetch(broker, max_tasks=2)
    report(broker, result("t0"))
    deadline = time.monotonic() + TIMEOUT_S
    while not broker.ask_state(Drain()):
        assert time.monotonic() < deadline, "the writer never caught up"
        time.sleep(0.02)
    # The running writer holds the file's broker lock, so this reads it as plain SQLite.
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT id, status FROM activations").fetchall()
    stored = {activation_id: Status(status) for activation_id, status in rows}
    assert stored == {"t1": Status.PROCESSING, "t2": Status.PENDING}


# --- Signing, malformed requests ------------------------------------------------------------------


def test_signing_covers_the_batch_service(start_broker: StartBroker) -> None:
    broker = start_broker(shared_secrets=("secret",))
    broker.ingest(activation_record("a"))
    request = bpb.FetchTasksRequest(max_tasks=1)
    path = f"/{BATCH_SERVICE_NAME}/FetchTasks"
    signature = sign("secret", path, request.SerializeToString())
    error = rpc_error(lambda: stub_of(broker).FetchTasks(request, timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    wrong = [(SIGNATURE_METADATA_KEY, sign("wrong", path, request.SerializeToString()))]
    error = rpc_error(
        lambda: stub_of(broker).FetchTasks(request, timeout=TIMEOUT_S, metadata=wrong)
    )
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    signed = [(SIGNATURE_METADATA_KEY, signature)]
    response = stub_of(broker).FetchTasks(request, timeout=TIMEOUT_S, metadata=signed)
    assert [task.id for task in response.tasks] == ["a"]


@pytest.mark.parametrize(
    ("method", "message_name"),
    [
        ("FetchTasks", "FetchTasksRequest"),
        ("ReportResults", "ReportResultsRequest"),
        ("ReportAndFetch", "ReportAndFetchRequest"),
    ],
)
def test_malformed_bytes_are_invalid_argument(
    broker: Broker, method: str, message_name: str
) -> None:
    raw = broker.channel.unary_unary(f"/{BATCH_SERVICE_NAME}/{method}")
    error = rpc_error(lambda: raw(b"\xff\xff\xff\xff", timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"the request is not a {message_name}"


# --- Clients that go away ---------------------------------------------------------------------


def test_tasks_of_a_client_that_went_away_come_back_at_their_deadline(
    broker: Broker, start_broker: StartBroker
) -> None:
    broker.ingest(*(activation_record(f"t{i}", processing_deadline_duration_s=5) for i in range(4)))
    port = broker.frontend.proxy().port.get(timeout=TIMEOUT_S)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as gone:
        stub = bpb_grpc.TaskBatchServiceStub(gone)
        taken = stub.FetchTasks(bpb.FetchTasksRequest(max_tasks=3), timeout=TIMEOUT_S)
    assert len(taken.tasks) == 3  # the worker took three tasks and its connection dropped
    assert by_status(broker) == {Status.PROCESSING: 3, Status.PENDING: 1}
    broker.ask_state(Tick(time.time() + 60))
    assert by_status(broker) == {Status.PENDING: 4}
    assert sorted(fetch(broker)) == ["t0", "t1", "t2", "t3"]


def test_a_waiting_fetch_abandoned_by_its_client_takes_nothing(broker: Broker) -> None:
    request = bpb.FetchTasksRequest(max_tasks=4, wait_ms=2000)
    error = rpc_error(lambda: stub_of(broker).FetchTasks(request, timeout=0.2))
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.1)  # the abandoned fetch's next recheck would run by now
    broker.ingest(activation_record("after"))
    time.sleep(0.3)
    assert by_status(broker) == {Status.PENDING: 1}
    assert fetch(broker) == ["after"]


# --- Unary and batch workers together ---------------------------------------------------------


def test_unary_and_batch_workers_share_a_broker_and_each_task_ends_once(broker: Broker) -> None:
    total = 300
    broker.ingest(*(activation_record(f"t{i:03d}") for i in range(total)))
    completed: Counter[str] = Counter()
    unexpected: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def done(ids: list[str]) -> None:
        with lock:
            completed.update(ids)

    def unary_worker() -> None:
        stub = broker.stub
        while True:
            try:
                task = stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S).task
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.NOT_FOUND:
                    unexpected.append(error.code())
                return
            stub.SetTaskStatus(pb.SetTaskStatusRequest(id=task.id, status=COMPLETE))
            done([task.id])

    def batch_worker() -> None:
        held: list[str] = []
        while True:
            response = stub_of(broker).ReportAndFetch(
                bpb.ReportAndFetchRequest(
                    results=[result(i) for i in held], fetch=bpb.FetchTasksRequest(max_tasks=5)
                ),
                timeout=TIMEOUT_S,
            )
            done(held)
            held = [task.id for task in response.tasks]
            if not held:
                return

    workers = [threading.Thread(target=unary_worker) for _ in range(3)]
    workers += [threading.Thread(target=batch_worker) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(TIMEOUT_S * 4)
    assert unexpected == []
    assert sorted(completed) == [f"t{i:03d}" for i in range(total)]
    assert set(completed.values()) == {1}
    assert broker.ask_state(Stats()).conclusions == {"applied": total}
    assert by_status(broker) == {}


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


# --- Push delivery: workers only report -------------------------------------------------------


def test_in_push_mode_workers_report_but_cannot_pull(start_broker: StartBroker) -> None:
    broker = start_broker(pulls=False)
    broker.ingest(activation_record("a"), activation_record("b"))
    refused = "Cannot call while broker is in PUSH mode"
    for call in (
        lambda: broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S),
        lambda: fetch(broker),
        lambda: stub_of(broker).ReportAndFetch(bpb.ReportAndFetchRequest(), timeout=TIMEOUT_S),
    ):
        error = rpc_error(call)
        assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, refused)
    assert by_status(broker) == {Status.PENDING: 2}
    response = broker.stub.SetTaskStatus(
        pb.SetTaskStatusRequest(id="a", status=COMPLETE, fetch_next_task=pb.FetchNextTask()),
        timeout=TIMEOUT_S,
    )
    assert not response.HasField("task"), "SetTaskStatus never hands out a task in push mode"
    report(broker, result("b"))
    assert broker.ask_state(Stats()).conclusions == {"late": 2}  # pending, never pulled
    assert by_status(broker) == {}
