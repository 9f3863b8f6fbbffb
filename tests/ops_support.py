"""A full broker (`Supervisor`) on a thread, a little load through Kafka and gRPC, and its
/metrics scraped: shared by the ops endpoint's and the deploy files' tests."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from actors.activation import encode_activation
from actors.config import Config, Mailboxes, MailboxSettings, OffsetReset
from actors.embedded_kafka import EmbeddedKafka, TopicSpec, free_port
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.runtime import MailboxPolicy
from actors.supervisor import Broker, Supervisor
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc

START_TIMEOUT_S = 30.0
WAIT_S = 30.0
NAMESPACE = "ops-test"


@dataclass
class RunningBroker:
    broker: Broker
    metrics_url: str
    topic: str

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.broker.grpc_port}"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(metrics_url: str) -> dict[str, Metric]:
    """The families of /metrics by name (counters by their name without `_total`)."""
    code, body = http_get(f"{metrics_url}/metrics")
    assert code == 200, body
    return {family.name: family for family in text_string_to_metric_families(body)}


def sample(
    families: dict[str, Metric], family: str, sample_name: str | None = None, **labels: str
) -> float | None:
    """One sample's value, or None when it is absent."""
    for s in families[family].samples if family in families else ():
        if s.name == (sample_name or family) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return float(s.value)
    return None


@contextmanager
def running_broker(kafka: EmbeddedKafka, tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker on fresh topics, ready; its upkeep mailbox is tiny with policy `fail`,
    so a test can overflow it deliberately."""
    topic = f"ops-{uuid.uuid4().hex[:12]}"
    dlq = f"{topic}-dlq"
    kafka.create_topics([TopicSpec(topic, 1), TopicSpec(dlq, 1)])
    metrics_port = free_port()
    config = Config(
        kafka_cluster=kafka.bootstrap,
        kafka_topic=topic,
        kafka_deadletter_topic=dlq,
        kafka_consumer_group=f"group-{topic}",
        kafka_auto_offset_reset=OffsetReset.EARLIEST,
        grpc_addr="127.0.0.1",
        grpc_port=0,
        metrics_addr="127.0.0.1",
        metrics_port=metrics_port,
        db_path=str(tmp_path / "broker.sqlite"),
        upkeep_task_interval_ms=200,
        upkeep_deadline_reset_skip_after_startup_sec=0,
        db_insert_batch_max_time_ms=100,
        mailbox=Mailboxes(upkeep=MailboxSettings(size=1, policy=MailboxPolicy.FAIL)),
    )
    supervisor = Supervisor(config)
    ready = threading.Event()
    exit_codes: list[int] = []

    def run() -> None:
        exit_codes.append(supervisor.run(on_ready=lambda _: ready.set()))

    thread = threading.Thread(target=run, name="supervisor-under-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: ready.is_set() or not thread.is_alive(), "the broker to start")
        assert ready.is_set(), f"the broker did not start (exit code {exit_codes})"
        broker = supervisor.broker
        assert broker is not None
        url = f"http://127.0.0.1:{metrics_port}"
        wait_until(lambda: http_get(f"{url}/readyz")[0] == 200, "/readyz to answer 200")
        yield RunningBroker(broker, url, topic)
    finally:
        supervisor.request_stop()
        thread.join(START_TIMEOUT_S)
    assert not thread.is_alive(), "the broker did not stop"
    assert exit_codes == [0]


@dataclass(frozen=True, slots=True)
class LoadDone:
    produced: int
    undecodable: int
    completed: int


def put_load(running: RunningBroker, kafka: EmbeddedKafka, count: int = 20) -> LoadDone:
    """Produce `count` activations and one undecodable message; claim and complete half of
    them over gRPC (one GetTask, then SetTaskStatus fetching the next until the last), and
    ask once for a namespace that has nothing. No task is left processing."""
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    messages = [
        OutgoingMessage(
            f"load-{n}",
            running.topic,
            encode_activation(namespace=NAMESPACE, taskname="ops.load", kwargs={"n": n}),
        )
        for n in range(count)
    ]
    messages.append(OutgoingMessage("garbage", running.topic, b"\xff not an activation"))
    report = producer.produce_many(messages, timeout_s=10)
    producer.close(timeout_s=5)
    assert report.all_acknowledged, report.failed

    completed = 0
    with grpc.insecure_channel(running.grpc_target) as channel:
        stub = pb_grpc.ConsumerServiceStub(channel)
        task: pb.TaskActivation | None = _first_task(stub)
        while task is not None:
            last = completed + 1 == count // 2
            request = pb.SetTaskStatusRequest(
                id=task.id,
                status=pb.TASK_ACTIVATION_STATUS_COMPLETE,
                fetch_next_task=None if last else pb.FetchNextTask(namespace=NAMESPACE),
            )
            response = stub.SetTaskStatus(request, timeout=5)
            completed += 1
            task = response.task if response.HasField("task") else None
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetTask(pb.GetTaskRequest(namespace="nothing-here"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    return LoadDone(produced=count, undecodable=1, completed=completed)


def _first_task(stub: Any) -> pb.TaskActivation:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            task: pb.TaskActivation = stub.GetTask(
                pb.GetTaskRequest(namespace=NAMESPACE), timeout=5
            ).task
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # the consumer joins its group and ingests in its own time
        else:
            return task


def settled_families(running: RunningBroker, load: LoadDone) -> dict[str, Metric]:
    """/metrics once the snapshots show the load: consumed, flushed, offsets committed."""
    families: dict[str, Metric] = {}

    def caught_up() -> bool:
        nonlocal families
        families = scrape(running.metrics_url)
        consumed = sample(
            families,
            "taskbroker_kafka_messages_consumed",
            "taskbroker_kafka_messages_consumed_total",
        )
        committed = sample(families, "taskbroker_kafka_committed_offset", partition="0")
        conclusions = sample(
            families,
            "taskbroker_state_conclusions",
            "taskbroker_state_conclusions_total",
            outcome="applied",
        )
        return (
            consumed == load.produced + load.undecodable
            and committed == load.produced + load.undecodable
            and conclusions == load.completed
        )

    wait_until(caught_up, "the metrics to show the load")
    return families
