"""What the fault tests share: a Kafka of their own that they can freeze, a broker process
on a file they choose, a worker that keeps trying like a real one, and readings of what
the broker and Kafka say."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from confluent_kafka import Consumer, TopicPartition

from actors.activation import encode_activation
from actors.embedded_kafka import EmbeddedKafka, TopicSpec, free_port
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from tests.broker_process import BrokerProcess, run_args
from tests.ops_support import http_get, sample, scrape, wait_until

NAMESPACE = "faults"

# What a real worker sends again: the broker is restarting, stopping or overloaded.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@contextmanager
def frozen(kafka: EmbeddedKafka) -> Iterator[None]:
    """Kafka stopped (SIGSTOP) for the block: its sockets stay open and nothing answers,
    which is what a hung or partitioned broker looks like; SIGCONT afterwards, always."""
    pid = kafka.pid
    assert pid is not None, "the test's Kafka is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@dataclass(frozen=True, slots=True)
class Topics:
    topic: str
    dlq: str

    @property
    def group(self) -> str:
        # The group `run_args` gives the broker.
        return f"group-{self.topic}"


def new_topics(kafka: EmbeddedKafka) -> Topics:
    topic = f"faults-{uuid.uuid4().hex[:12]}"
    topics = Topics(topic, f"{topic}-dlq")
    kafka.create_topics([TopicSpec(topics.topic, 1), TopicSpec(topics.dlq, 1)])
    return topics


@dataclass
class FaultBroker:
    """A `taskbroker run` child process with its gRPC and ops ports."""

    process: BrokerProcess
    grpc_port: int
    metrics_url: str

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metric(self, family: str, sample_name: str | None = None, **labels: str) -> float | None:
        return sample(scrape(self.metrics_url), family, sample_name, **labels)

    def counter(self, family: str, **labels: str) -> float:
        return sample(scrape(self.metrics_url), family, f"{family}_total", **labels) or 0.0

    def held(self, status: str) -> float:
        """Activations of `status` the state actor holds, as /metrics says."""
        return self.metric("taskbroker_state_activations", status=status) or 0.0

    def readyz(self) -> tuple[int, str]:
        return http_get(f"{self.metrics_url}/readyz")

    def status(self) -> dict[str, object]:
        code, body = http_get(f"{self.metrics_url}/status")
        assert code == 200, body
        document: dict[str, object] = json.loads(body)
        return document


@contextmanager
def broker_process(
    kafka: EmbeddedKafka, topics: Topics, db_path: Path, log_dir: Path, *settings: str
) -> Iterator[FaultBroker]:
    """A ready broker on `db_path` consuming `topics`; `settings` are further `--set`s.
    Stopped with SIGTERM at the end (killed if that fails)."""
    grpc_port, metrics_port = free_port(), free_port()
    args = run_args(kafka, topics.topic, topics.dlq, db_path, grpc_port, metrics_port)
    for setting in settings:
        args += ["--set", setting]
    process = BrokerProcess(args, log_dir / f"broker-{uuid.uuid4().hex[:6]}.log")
    with process:
        process.start()
        broker = FaultBroker(process, grpc_port, f"http://127.0.0.1:{metrics_port}")
        wait_until(lambda: broker.readyz()[0] == 200, "/readyz to answer 200")
        yield broker
        exit_code = process.stop()
        assert exit_code == 0, process.log


def produce(
    kafka: EmbeddedKafka, topic: str, count: int, *, tag: str, **fields: object
) -> list[str]:
    """`count` activations produced and acknowledged; their ids."""
    ids = [f"{tag}-{n}-{uuid.uuid4().hex[:8]}" for n in range(count)]
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    try:
        report = producer.produce_many(
            [
                OutgoingMessage(
                    task_id,
                    topic,
                    encode_activation(
                        activation_id=task_id,
                        namespace=NAMESPACE,
                        taskname=f"faults.{tag}",
                        **fields,  # type: ignore[arg-type]
                    ),
                )
                for task_id in ids
            ],
            timeout_s=15,
        )
    finally:
        producer.close(timeout_s=5)
    assert report.all_acknowledged, report.failed
    return ids


def committed_offset(kafka: EmbeddedKafka, topics: Topics, partition: int = 0) -> int | None:
    """What Kafka holds as the group's committed offset (next to read), None when none.

    Asked with the group's id but without joining it: `committed` only reads."""
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": topics.group,
            "enable.auto.commit": False,
        }
    )
    try:
        [found] = consumer.committed([TopicPartition(topics.topic, partition)], timeout=10)
    finally:
        consumer.close()
    return None if found.offset < 0 else int(found.offset)


@dataclass
class Outcomes:
    """What the worker did: every task it was handed, and the results the broker took."""

    handed_out: list[str] = field(default_factory=list)
    concluded: list[str] = field(default_factory=list)
    refused: list[grpc.StatusCode] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def completed(self) -> set[str]:
        with self.lock:
            return set(self.concluded)


class Worker:
    """One thread that asks for a task, completes it, and sends a result again
    when the call failed with a transient code, as the real worker does."""

    def __init__(self, target: str) -> None:
        self.outcomes = Outcomes()
        self._target = target
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-worker", daemon=True)

    def __enter__(self) -> Worker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the worker did not stop"

    def _run(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            while not self._stopping.is_set():
                task = self._get(stub)
                if task is None:
                    continue
                self._conclude(stub, task.id)

    def _get(self, stub: pb_grpc.ConsumerServiceStub) -> pb.TaskActivation | None:
        try:
            task: pb.TaskActivation = stub.GetTask(
                pb.GetTaskRequest(namespace=NAMESPACE), timeout=5
            ).task
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                self._refused(error.code())
            time.sleep(0.05)
            return None
        with self.outcomes.lock:
            self.outcomes.handed_out.append(task.id)
        return task

    def _conclude(self, stub: pb_grpc.ConsumerServiceStub, task_id: str) -> None:
        request = pb.SetTaskStatusRequest(id=task_id, status=pb.TASK_ACTIVATION_STATUS_COMPLETE)
        while not self._stopping.is_set():
            try:
                stub.SetTaskStatus(request, timeout=5)
            except grpc.RpcError as error:
                self._refused(error.code())
                time.sleep(0.2)
                continue
            with self.outcomes.lock:
                self.outcomes.concluded.append(task_id)
            return

    def _refused(self, code: grpc.StatusCode) -> None:
        if code not in TRANSIENT:
            raise AssertionError(f"the broker answered {code}, which no worker retries")
        with self.outcomes.lock:
            self.outcomes.refused.append(code)
