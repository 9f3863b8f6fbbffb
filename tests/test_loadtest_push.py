"""The simulated push workers of `loadtest e2e --delivery push`: against a stand-in for the
broker, pushes are queued or refused when the queue stays full and results come back in
batches of at most the worker's concurrency; then a short push run against a real broker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from actors.activation import encode_activation
from actors.config import DeliveryMode, load
from actors.embedded_kafka import EmbeddedKafka
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from loadtest import e2e
from loadtest.broker import BrokerSetup, broker_environment
from loadtest.e2e import Phase, Session
from loadtest.producer import APPLICATION
from loadtest.push_workers import PushDelivery, PushPlan, PushRun, PushWorkerPool

CONSUMER_SERVICE = "sentry_protos.taskbroker.v1.ConsumerService"


class ResultSink:
    """ConsumerService/SetBatchActivationStatus on 127.0.0.1, keeping every batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(
            self._report,
            request_deserializer=pb.SetBatchActivationStatusRequest.FromString,
            response_serializer=pb.SetBatchActivationStatusResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    CONSUMER_SERVICE, {"SetBatchActivationStatus": handler}
                ),
            )
        )
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _report(
        self, request: pb.SetBatchActivationStatusRequest, _: grpc.ServicerContext
    ) -> pb.SetBatchActivationStatusResponse:
        assert all(u.status == pb.TASK_ACTIVATION_STATUS_COMPLETE for u in request.updates)
        with self._lock:
            self.batches.append([update.id for update in request.updates])
        return pb.SetBatchActivationStatusResponse()

    def stop(self) -> None:
        self._server.stop(grace=None)


@pytest.fixture
def sink() -> Iterator[ResultSink]:
    sink = ResultSink()
    yield sink
    sink.stop()


def push(stub: pb_grpc.WorkerServiceStub, task_id: str) -> grpc.StatusCode:
    task = pb.TaskActivation.FromString(encode_activation(activation_id=task_id))
    try:
        stub.PushTask(pb.PushTaskRequest(task=task), timeout=10)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def test_push_workers_queue_refuse_when_full_and_report_in_batches(sink: ResultSink) -> None:
    plan = PushPlan(coroutines=2, queue_size=2, flush_interval_s=0.05, push_timeout_s=1.0)
    with PushWorkerPool(processes=1) as pool:
        pool.prepare(sink.target, plan)
        with grpc.insecure_channel(pool.endpoints[0]) as channel:
            stub = pb_grpc.WorkerServiceStub(channel)
            # Nothing executes before the run: two fit, the third waits and is refused.
            before = [push(stub, f"early-{i}") for i in range(3)]
            assert before == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
            outcome: list[PushRun] = []
            running = threading.Thread(
                target=lambda: outcome.append(pool.run(until_completed=12, max_seconds=30))
            )
            running.start()
            later = [push(stub, f"later-{i}") for i in range(10)]
            running.join(timeout=60)
    assert later == [grpc.StatusCode.OK] * 10
    (run,) = outcome
    accepted = {"early-0", "early-1"} | {f"later-{i}" for i in range(10)}
    assert set(run.report.completed) == accepted
    assert sorted(run.report.received) == sorted(accepted)
    assert run.refused == 1
    assert len(run.report.task_latencies_ms) == 12
    reported = [task_id for batch in sink.batches for task_id in batch]
    assert sorted(reported) == sorted(accepted)
    assert max(len(batch) for batch in sink.batches) <= plan.coroutines


def test_slots_are_spread_over_the_processes() -> None:
    assert PushDelivery().plan(256, 4, 0.0) == PushPlan(coroutines=64, queue_size=64)
    assert PushDelivery(queue_size=5).plan(30, 4, 0.0).coroutines == 8
    with pytest.raises(ValueError, match="at least one"):
        PushPlan(coroutines=0, queue_size=1)


def test_a_push_broker_environment_maps_the_load_test_application_to_the_workers(
    tmp_path: Path,
) -> None:
    endpoints = ("127.0.0.1:7001", "127.0.0.1:7002")
    setup = BrokerSetup(delivery="push", worker_endpoints=endpoints)
    config = load(env=broker_environment(setup, "127.0.0.1:9", "t", 5000, tmp_path / "db"))
    assert config.delivery_mode is DeliveryMode.PUSH
    assert config.worker_map == {APPLICATION: endpoints}


def test_a_phase_must_be_delivered_as_its_broker_delivers() -> None:
    pull_broker = Session(BrokerSetup(), "127.0.0.1:9", "t", "127.0.0.1:5000", None, kafka_pid=None)
    with pytest.raises(ValueError, match="a push phase against a pull broker"):
        pull_broker.run(Phase(kind=PushDelivery()))


@pytest.mark.kafka
@pytest.mark.slow
def test_a_short_push_run_completes_every_task_once(kafka: EmbeddedKafka, tmp_path: Path) -> None:
    result_path = tmp_path / "e2e.json"
    exit_code = e2e.main(
        [
            "--delivery", "push", "--workers", "16", "--processes", "2", "--tasks", "500",
            "--kafka", kafka.bootstrap, "--json", str(result_path),
        ]
    )  # fmt: skip
    assert exit_code == 0
    result = json.loads(result_path.read_text())
    assert (result["protocol"], result["completed"]) == ("push", 500)
    assert (result["lost"], result["duplicates"], result["errors"]) == (0, 0, 0)
    assert result["broker"]["cpu_us_per_task"] > 0
    assert result["task_latency_ms"]["p50"] > 0
    assert "refused_pushes" in result
