"""The gRPC front end over a real loopback server, real grpc clients and a real state actor:
every row of WIRE.md "Semantics" with its status code, health, signing, limits."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pykka
import pytest
from prometheus_client import CollectorRegistry

from actors.auth import SIGNATURE_METADATA_KEY, sign
from actors.errors import ConfigError, MailboxFull
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import (
    Connect,
    Ingest,
    ProduceKind,
    SetServing,
    Stats,
    Tick,
    TickResult,
)
from actors.metrics import FrontendMetrics
from actors.records import OnAttemptsExceeded, Status
from actors.runtime import MailboxConfig, MailboxPolicy, mailbox_stats_of
from actors.services import MALFORMED, SERVICE_NAME, AbuseStreaks
from actors.wire.grpc.health.v1 import health_pb2, health_pb2_grpc
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from tests.grpc_support import TIMEOUT_S, Broker, StartBroker, activation_record

GET_TASK_PATH = f"/{SERVICE_NAME}/GetTask"
SET_TASK_STATUS_PATH = f"/{SERVICE_NAME}/SetTaskStatus"
SET_BATCH_PATH = f"/{SERVICE_NAME}/SetBatchActivationStatus"


@pytest.fixture
def broker(start_broker: StartBroker) -> Broker:
    return start_broker()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def status_request(activation_id: str, status: int, **fields: Any) -> pb.SetTaskStatusRequest:
    # Any int, like a worker from a newer protocol would send.
    wire_status = cast(pb.TaskActivationStatus, status)
    return pb.SetTaskStatusRequest(id=activation_id, status=wire_status, **fields)


COMPLETE = pb.TASK_ACTIVATION_STATUS_COMPLETE
RETRY = pb.TASK_ACTIVATION_STATUS_RETRY
FAILURE = pb.TASK_ACTIVATION_STATUS_FAILURE


# --- GetTask -----------------------------------------------------------------------------------


def test_get_task_with_nothing_pending_is_not_found(broker: Broker) -> None:
    error = rpc_error(lambda: broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "No pending activations"


def test_get_task_hands_out_the_stored_bytes_oldest_first(broker: Broker) -> None:
    first, second = activation_record("a"), activation_record("b")
    broker.ingest(first, second)
    response = broker.stub.GetTask(pb.GetTaskRequest(application="app"), timeout=TIMEOUT_S)
    assert response.task.id == "a"
    assert response.task.SerializeToString(deterministic=True) == first.activation
    assert broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S).task.id == "b"
    error = rpc_error(lambda: broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.NOT_FOUND


def test_namespace_filter_applies_within_the_application(broker: Broker) -> None:
    broker.ingest(
        activation_record("sentry-ingest", application="sentry", namespace="ingest"),
        activation_record("other-ingest", application="other", namespace="ingest"),
        activation_record("sentry-issues", application="sentry", namespace="issues"),
    )
    stub = broker.stub
    by_app = stub.GetTask(pb.GetTaskRequest(application="other"), timeout=TIMEOUT_S)
    assert by_app.task.id == "other-ingest"
    filtered = stub.GetTask(
        pb.GetTaskRequest(application="sentry", namespace="issues"), timeout=TIMEOUT_S
    )
    assert filtered.task.id == "sentry-issues"
    error = rpc_error(
        lambda: stub.GetTask(
            pb.GetTaskRequest(application="other", namespace="issues"), timeout=TIMEOUT_S
        )
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


# --- SetTaskStatus -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        pb.TASK_ACTIVATION_STATUS_UNSPECIFIED,
        pb.TASK_ACTIVATION_STATUS_PENDING,
        pb.TASK_ACTIVATION_STATUS_PROCESSING,
        99,  # not in the enum at all
    ],
)
def test_set_task_status_refuses_statuses_other_than_results(broker: Broker, status: int) -> None:
    broker.ingest(activation_record("a"))
    broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
    error = rpc_error(
        lambda: broker.stub.SetTaskStatus(status_request("a", status), timeout=TIMEOUT_S)
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "status must be COMPLETE, RETRY or FAILURE" in (error.details() or "")
    assert broker.ask_state(Tick(time.time())).to_produce == ()


def test_set_task_status_refuses_an_empty_id(broker: Broker) -> None:
    error = rpc_error(
        lambda: broker.stub.SetTaskStatus(status_request("", COMPLETE), timeout=TIMEOUT_S)
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "id is required"


def test_set_task_status_for_an_unknown_id_is_ok(broker: Broker) -> None:
    response = broker.stub.SetTaskStatus(status_request("nope", COMPLETE), timeout=TIMEOUT_S)
    assert not response.HasField("task")


def test_complete_with_fetch_next_returns_the_next_task_then_none(broker: Broker) -> None:
    broker.ingest(activation_record("a"), activation_record("b"))
    stub = broker.stub
    assert stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S).task.id == "a"
    fetch = pb.FetchNextTask(application="app")
    response = stub.SetTaskStatus(
        status_request("a", COMPLETE, fetch_next_task=fetch), timeout=TIMEOUT_S
    )
    assert response.task.id == "b"
    last = stub.SetTaskStatus(
        status_request("b", COMPLETE, fetch_next_task=fetch), timeout=TIMEOUT_S
    )
    assert not last.HasField("task")
    stats = broker.ask_state(Stats())
    assert stats.conclusions == {"applied": 2}


def test_fetch_next_honours_its_filter(broker: Broker) -> None:
    broker.ingest(
        activation_record("a"),
        activation_record("other", application="other"),
        activation_record("b"),
    )
    broker.stub.GetTask(pb.GetTaskRequest(application="app"), timeout=TIMEOUT_S)
    response = broker.stub.SetTaskStatus(
        status_request("a", COMPLETE, fetch_next_task=pb.FetchNextTask(application="other")),
        timeout=TIMEOUT_S,
    )
    assert response.task.id == "other"


def test_retry_carries_the_requests_max_attempts_and_delay(broker: Broker) -> None:
    broker.ingest(activation_record("a", max_attempts=1, delay_on_retry_s=5))
    broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
    broker.stub.SetTaskStatus(
        status_request("a", RETRY, max_attempts=4, delay_on_retry=30), timeout=TIMEOUT_S
    )
    ticked: TickResult = broker.ask_state(Tick(time.time()))
    (order,) = ticked.to_produce
    assert (order.id, order.kind) == ("a", ProduceKind.RETRY)
    assert (order.max_attempts, order.delay_on_retry_s) == (4, 30)


def test_retry_without_overrides_keeps_the_stored_retry_state(broker: Broker) -> None:
    broker.ingest(activation_record("a", max_attempts=3, delay_on_retry_s=5))
    broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
    broker.stub.SetTaskStatus(status_request("a", RETRY), timeout=TIMEOUT_S)
    (order,) = broker.ask_state(Tick(time.time())).to_produce
    assert (order.kind, order.max_attempts, order.delay_on_retry_s) == (ProduceKind.RETRY, 3, 5)


def test_failure_dead_letters_or_discards_per_the_activation(broker: Broker) -> None:
    broker.ingest(
        activation_record("dlq", on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER),
        activation_record("drop", on_attempts_exceeded=OnAttemptsExceeded.DISCARD),
    )
    for _ in range(2):
        task = broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S).task
        broker.stub.SetTaskStatus(status_request(task.id, FAILURE), timeout=TIMEOUT_S)
    (order,) = broker.ask_state(Tick(time.time())).to_produce
    assert (order.id, order.kind) == ("dlq", ProduceKind.DEADLETTER)
    assert order.activation == activation_bytes_of(broker, "dlq", order.activation)


def activation_bytes_of(broker: Broker, activation_id: str, value: bytes) -> bytes:
    """The dead letter is the original activation, byte for byte."""
    parsed = pb.TaskActivation.FromString(value)
    assert parsed.id == activation_id
    return parsed.SerializeToString(deterministic=True)


# --- SetBatchActivationStatus --------------------------------------------------------------


def test_batch_status_applies_every_update(broker: Broker) -> None:
    broker.ingest(activation_record("a"), activation_record("b"), activation_record("c"))
    for _ in range(3):
        broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
    response = broker.stub.SetBatchActivationStatus(
        pb.SetBatchActivationStatusRequest(
            updates=[
                status_request("a", COMPLETE),
                status_request("b", COMPLETE, fetch_next_task=pb.FetchNextTask()),
                status_request("unknown", COMPLETE),
            ]
        ),
        timeout=TIMEOUT_S,
    )
    assert response == pb.SetBatchActivationStatusResponse()
    stats = broker.ask_state(Stats())
    assert stats.by_status.get(Status.PROCESSING) == 1  # only "c" is still out
    assert stats.conclusions == {"applied": 2, "unknown": 1}


def test_batch_status_with_one_invalid_update_applies_none(broker: Broker) -> None:
    broker.ingest(activation_record("a"))
    broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
    error = rpc_error(
        lambda: broker.stub.SetBatchActivationStatus(
            pb.SetBatchActivationStatusRequest(
                updates=[
                    status_request("a", COMPLETE),
                    status_request("a", pb.TASK_ACTIVATION_STATUS_PENDING),
                ]
            ),
            timeout=TIMEOUT_S,
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("updates[1]: status must be")
    stats = broker.ask_state(Stats())
    assert stats.by_status.get(Status.PROCESSING) == 1


# --- Malformed requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message_name"),
    [
        (GET_TASK_PATH, "GetTaskRequest"),
        (SET_TASK_STATUS_PATH, "SetTaskStatusRequest"),
        (SET_BATCH_PATH, "SetBatchActivationStatusRequest"),
    ],
)
def test_malformed_bytes_are_invalid_argument_without_a_trace(
    broker: Broker, caplog: pytest.LogCaptureFixture, path: str, message_name: str
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = broker.channel.unary_unary(path)
    error = rpc_error(lambda: raw(b"\xff\xff\xff\xff", timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"the request is not a {message_name}"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


# --- Health ------------------------------------------------------------------------------------


def check(broker: Broker, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    response = broker.health.Check(request, timeout=TIMEOUT_S)
    return int(response.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_is_not_serving_until_the_broker_says_so(start_broker: StartBroker) -> None:
    broker = start_broker()
    assert check(broker, "") == NOT_SERVING
    assert check(broker, SERVICE_NAME) == NOT_SERVING
    broker.frontend.tell(SetServing(serving=True))
    wait_until(lambda: check(broker, "") == SERVING)
    assert check(broker, SERVICE_NAME) == SERVING
    broker.frontend.tell(SetServing(serving=False))
    wait_until(lambda: check(broker, SERVICE_NAME) == NOT_SERVING)


def test_health_of_an_unknown_service_is_not_found(start_broker: StartBroker) -> None:
    broker = start_broker()
    error = rpc_error(lambda: check(broker, "no.such.Service"))
    assert error.code() is grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_changes_and_ends_when_the_server_stops(
    start_broker: StartBroker,
) -> None:
    broker = start_broker()
    stream = broker.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    statuses = iter(stream)
    assert next(statuses).status == NOT_SERVING
    broker.frontend.tell(SetServing(serving=True))
    assert next(statuses).status == SERVING
    broker.frontend.tell(SetServing(serving=False))
    assert next(statuses).status == NOT_SERVING
    broker.frontend.tell(SetServing(serving=True))
    assert next(statuses).status == SERVING
    broker.frontend.stop(timeout=TIMEOUT_S)
    assert next(statuses).status == NOT_SERVING
    with pytest.raises(StopIteration):
        next(statuses)


# --- Signing ---------------------------------------------------------------------------------


def signed(secret: str, path: str, request: Any) -> list[tuple[str, str]]:
    return [(SIGNATURE_METADATA_KEY, sign(secret, path, request.SerializeToString()))]


def test_signing_accepts_old_and_new_secrets_and_refuses_others(
    start_broker: StartBroker,
) -> None:
    broker = start_broker(shared_secrets=("new-secret", "old-secret"))
    broker.ingest(activation_record("a"), activation_record("b"))
    stub = broker.stub
    get = pb.GetTaskRequest(application="app")
    for secret in ("new-secret", "old-secret"):
        response = stub.GetTask(get, metadata=signed(secret, GET_TASK_PATH, get), timeout=TIMEOUT_S)
        done = status_request(response.task.id, COMPLETE)
        stub.SetTaskStatus(
            done, metadata=signed(secret, SET_TASK_STATUS_PATH, done), timeout=TIMEOUT_S
        )

    refusals = {
        "a third secret": signed("other-secret", GET_TASK_PATH, get),
        "a signature for another method": signed("new-secret", SET_TASK_STATUS_PATH, get),
        "no signature": [],
        "garbage": [(SIGNATURE_METADATA_KEY, "not-a-hex-digest")],
    }
    for metadata in refusals.values():
        error = rpc_error(lambda m=metadata: stub.GetTask(get, metadata=m, timeout=TIMEOUT_S))  # type: ignore[misc]
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert check(broker, "") == NOT_SERVING  # health is exempt from signing


def test_signing_covers_the_bytes_as_sent(start_broker: StartBroker) -> None:
    broker = start_broker(shared_secrets=("secret",))
    broker.ingest(activation_record("a"))
    raw = broker.channel.unary_unary(GET_TASK_PATH)
    # Field 2 (application) then field 1 (namespace): valid, but not how protobuf orders them.
    body = b"\x12\x03app\x0a\x02ns"
    response = raw(body, metadata=[(SIGNATURE_METADATA_KEY, sign("secret", GET_TASK_PATH, body))])
    assert pb.GetTaskResponse.FromString(response).task.id == "a"


def test_malformed_bytes_with_signing_on_are_refused_before_parsing(
    start_broker: StartBroker,
) -> None:
    broker = start_broker(shared_secrets=("secret",))
    raw = broker.channel.unary_unary(GET_TASK_PATH)
    error = rpc_error(lambda: raw(b"\xff\xff", timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


# --- Limits ------------------------------------------------------------------------------------


class BlockingWriter:
    """A writer whose `tell` blocks until released: the state actor is stuck in it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def tell(self, message: object) -> None:
        self.entered.set()
        self.release.wait(TIMEOUT_S * 4)


@pytest.fixture
def stuck_writer() -> Iterator[BlockingWriter]:
    writer = BlockingWriter()
    yield writer
    writer.release.set()  # before the actors are stopped, so the state actor can stop


def stick(broker: Broker, writer: BlockingWriter) -> None:
    """Leave the state actor stuck on its next flush (its timer sends one within 50 ms)."""
    record = activation_record("a")
    for message in (Connect(writer=writer), Ingest((record,), ())):
        deliver(broker.state, message)
    assert writer.entered.wait(TIMEOUT_S)


def deliver(actor: pykka.ActorRef[Any], message: object) -> None:
    """Tell, waiting out a mailbox of one that the flush timer has just filled."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            actor.tell(message)
        except MailboxFull:
            assert time.monotonic() < deadline, f"{actor} never had room for {message!r}"
            time.sleep(0.001)
        else:
            return


def test_a_state_actor_that_cannot_answer_gives_unavailable(
    start_broker: StartBroker, stuck_writer: BlockingWriter
) -> None:
    broker = start_broker(state_ask_timeout_ms=200)
    stick(broker, stuck_writer)
    started = time.monotonic()
    error = rpc_error(lambda: broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.0
    stuck_writer.release.set()
    wait_until(lambda: answers_again(broker))


def answers_again(broker: Broker) -> bool:
    """The timed-out claim was applied late, so "nothing pending" is the answer once free."""
    try:
        broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code() is grpc.StatusCode.NOT_FOUND
    return True


def test_a_full_fail_mailbox_gives_resource_exhausted(
    start_broker: StartBroker, stuck_writer: BlockingWriter
) -> None:
    broker = start_broker(state_mailbox=MailboxConfig(size=1, policy=MailboxPolicy.FAIL))
    stick(broker, stuck_writer)
    # The state actor's flush timer fills the one place in its mailbox.
    wait_until(lambda: mailbox_stats_of(broker.state).depth >= 1)
    error = rpc_error(lambda: broker.stub.GetTask(pb.GetTaskRequest(), timeout=TIMEOUT_S))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "mailbox of state is full" in (error.details() or "")


def test_a_port_in_use_is_a_clear_error(start_broker: StartBroker) -> None:
    broker = start_broker()
    port = broker.frontend.proxy().port.get(timeout=TIMEOUT_S)
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        GrpcFrontend(FrontendConfig(host="127.0.0.1", port=port), broker.state)


def test_config_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="state_ask_timeout_ms"):
        FrontendConfig(state_ask_timeout_ms=0)
    with pytest.raises(ConfigError, match="port"):
        FrontendConfig(port=70000)


def test_requests_over_the_size_limit_are_refused(start_broker: StartBroker) -> None:
    broker = start_broker()
    raw = broker.channel.unary_unary(GET_TASK_PATH)
    error = rpc_error(lambda: raw(b"\x12" + b"\x80\x80\x80\x08" + b"x" * (16 << 20)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- Limits and abusive clients ------------------------------------------------------------

QUIET_S = 0.3


@pytest.fixture
def watched(start_broker: StartBroker) -> Iterator[tuple[Broker, CollectorRegistry, Any]]:
    """A front end counting into a fresh registry, streaks ending after QUIET_S, one
    stream per connection; yields it with a function that opens another channel to it."""
    registry = CollectorRegistry()
    state = start_broker().state
    config = FrontendConfig(
        host="127.0.0.1",
        port=0,
        shared_secrets=("secret",),
        max_concurrent_streams=1,
        abuse_quiet_s=QUIET_S,
        stop_grace_s=0.5,
    )
    frontend = GrpcFrontend.start(config, state, observer=FrontendMetrics(registry))
    address = f"127.0.0.1:{frontend.proxy().port.get(timeout=TIMEOUT_S)}"
    channels: list[grpc.Channel] = []

    def connect() -> grpc.Channel:
        # A connection of its own: channels to one address share one by default.
        channels.append(grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)]))
        return channels[-1]

    yield Broker(state, frontend, connect()), registry, connect
    for channel in channels:
        channel.close()
    frontend.stop(timeout=TIMEOUT_S)


def abusive(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("taskbroker_grpc_abusive_requests_total", {"reason": reason})


def test_abusive_requests_are_counted_each_and_logged_once_per_streak(
    watched: tuple[Broker, CollectorRegistry, Any], caplog: pytest.LogCaptureFixture
) -> None:
    broker, registry, _ = watched
    caplog.set_level(logging.INFO, logger="actors.services")
    raw = broker.channel.unary_unary(GET_TASK_PATH)
    request = b"\xff\xff\xff\xff"
    metadata = [(SIGNATURE_METADATA_KEY, sign("secret", GET_TASK_PATH, request))]
    for streak in (25, 3):
        for _ in range(streak):
            rpc_error(lambda: raw(request, metadata=metadata, timeout=TIMEOUT_S))
        rpc_error(lambda: raw(request, timeout=TIMEOUT_S))  # unsigned as well
        time.sleep(QUIET_S * 3)

    lines = [r.getMessage() for r in caplog.records if r.name == "actors.services"]
    starts = [line for line in lines if line.startswith("refused a request from ipv4:127.0.0.1")]
    assert len(starts) == 4  # two streaks of each reason
    peer = starts[0].removeprefix("refused a request from ").split(" ", 1)[0]
    ended = "from 1 peer(s) in the streak that " + peer + " started"
    assert [line for line in lines if line not in starts] == [
        f"refused 25 requests (malformed request) {ended}",
        f"refused 1 requests (bad signature) {ended}",
        f"refused 3 requests (malformed request) {ended}",
        f"refused 1 requests (bad signature) {ended}",
    ]
    assert len(lines) == 8
    assert abusive(registry, "malformed") == 28
    assert abusive(registry, "signature") == 2


def test_a_streak_ends_only_after_a_quiet_period() -> None:
    streaks = AbuseStreaks(quiet_s=10.0)
    assert streaks.refused(MALFORMED, "a", now=0.0)
    assert not streaks.refused(MALFORMED, "b", now=8.0)
    assert streaks.end_quiet(now=12.0) == 6.0  # the last refusal restarted the quiet period
    assert streaks.end_quiet(now=18.0) is None
    assert streaks.refused(MALFORMED, "a", now=19.0)


def test_one_connection_runs_at_most_max_concurrent_streams_calls(
    watched: tuple[Broker, CollectorRegistry, Any],
) -> None:
    broker, _, connect = watched
    watch: Any = broker.health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    next(watch)  # the stream is open and holds the connection's one stream
    queued = rpc_error(lambda: broker.health.Check(health_pb2.HealthCheckRequest(), timeout=0.5))
    assert queued.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    other = health_pb2_grpc.HealthStub(connect())
    other.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    watch.cancel()


def test_a_worker_process_may_hold_hundreds_of_calls_on_one_connection(
    start_broker: StartBroker,
) -> None:
    """A worker process multiplexes its calls on one connection; the default stream limit
    must not refuse a busy one (at 100 streams it refused most of 256)."""
    broker = start_broker()
    broker.ingest(*(activation_record(f"t{i}") for i in range(300)))
    port = broker.frontend.proxy().port.get(timeout=TIMEOUT_S)

    async def claim_together() -> list[str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            get_task = channel.unary_unary(f"/{SERVICE_NAME}/GetTask")
            answers = await asyncio.gather(
                *(get_task(b"", timeout=TIMEOUT_S) for _ in range(300)), return_exceptions=True
            )
        return [type(a).__name__ for a in answers if not isinstance(a, bytes)]

    assert asyncio.run(claim_together()) == []
    assert broker.ask_state(Stats()).by_status.get(Status.PROCESSING) == 300
