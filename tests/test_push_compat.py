"""The PyPI `taskbroker-client` push worker, unchanged, in its own venv, against `taskbroker
run` in push mode: the broker pushes each task of the worker's application to the worker's
`WorkerService/PushTask`, and the worker reports results through
`SetBatchActivationStatus`. What ran is read from the app's ledger file
(tests/compat/push_app.py), what the broker concluded from its /status document."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.activation import encode_activation
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.wire.grpc.health.v1 import health_pb2
from tests import client_venv
from tests.broker_process import BrokerProcess, wait_for

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

APPLICATION = "compat"
OTHER_APPLICATION = "elsewhere"
COMPAT_DIR = Path(__file__).parent / "compat"
# The wheel installs no console script for its click group.
WORKER_COMMAND = ("-c", "from taskbroker_client.cli import worker; worker()", "push")
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def client_python() -> Path:
    return client_venv.client_python()


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The push command's options that the tests vary (the client's defaults otherwise)."""

    concurrency: int = 2
    queue_size: int = 5
    push_timeout_s: float = 5.0


class PushWorker:
    """`taskbroker_client.cli worker push` as a child process, serving the compat app."""

    def __init__(
        self,
        python: Path,
        broker_port: int,
        folder: Path,
        secrets: tuple[str, ...] = (),
        settings: WorkerSettings = WorkerSettings(),
    ) -> None:
        self.port = free_port()
        self.ledger = folder / "ledger.txt"
        self.log_path = folder / "worker.log"
        self._command = [
            str(python), *WORKER_COMMAND,
            "--app-module", "push_app:app",
            "--broker-service", f"127.0.0.1:{broker_port}",
            "--grpc-port", str(self.port),
            "--concurrency", str(settings.concurrency),
            "--child-tasks-queue-maxsize", str(settings.queue_size),
            "--push-task-timeout", str(settings.push_timeout_s),
        ]  # fmt: skip
        self._env = {
            **os.environ,
            "PYTHONPATH": str(COMPAT_DIR),
            "COMPAT_APPLICATION": APPLICATION,
            "COMPAT_LEDGER": str(self.ledger),
        }
        if secrets:
            self._env["COMPAT_RPC_SECRET"] = json.dumps(list(secrets))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start it and wait until its health says SERVING (its children are warm)."""
        self.ledger.write_text("")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self._command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # its spawned children die with the group
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._serving():
            if self._process.poll() is not None:
                raise AssertionError(f"the worker exited ({self._process.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not serving in {START_TIMEOUT_S} s:\n{self.log}")
            time.sleep(0.2)

    def executed(self) -> Counter[str]:
        """How many times each activation id ran."""
        return Counter(self.ledger.read_text().split())

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)

    def _serving(self) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            check = channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                response = check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def __enter__(self) -> PushWorker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class PushBroker:
    args: list[str]
    grpc_port: int
    status_url: str
    topic: str

    def with_settings(self, *assignments: str) -> PushBroker:
        """The same broker with `--set KEY=VALUE` for each assignment."""
        extra = [arg for assignment in assignments for arg in ("--set", assignment)]
        return dataclasses.replace(self, args=[*self.args, *extra])

    @property
    def metrics_url(self) -> str:
        return self.status_url.removesuffix("/status") + "/metrics"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url, timeout=5) as response:
            document: dict[str, Any] = json.load(response)
        return document


@pytest.fixture
def push_broker(kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path) -> PushBroker:
    """`taskbroker run` arguments for push mode; `worker_map` is added by each test."""
    topic, dlq = kafka_topics()
    grpc_port, metrics_port = free_port(), free_port()
    args = [
        "--kafka", kafka.bootstrap,
        "--db", str(tmp_path / "broker.sqlite"),
        "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        "--set", f"kafka_topic={topic}",
        "--set", f"kafka_deadletter_topic={dlq}",
        "--set", f"kafka_consumer_group=group-{topic}",
        "--set", "kafka_auto_offset_reset=earliest",
        "--set", "grpc_addr=127.0.0.1",
        "--set", "metrics_addr=127.0.0.1",
        "--set", "delivery_mode=push",
    ]  # fmt: skip
    return PushBroker(args, grpc_port, f"http://127.0.0.1:{metrics_port}/status", topic)


def produce(kafka: EmbeddedKafka, topic: str, count: int, sleep_s: float = 0.0) -> list[str]:
    """`count` compat:record tasks of the worker's application, and one of another
    application; the ids of the first."""
    ids = [f"push-compat-{i}" for i in range(count)]
    applications = dict.fromkeys(ids, APPLICATION)
    applications["not-for-this-worker"] = OTHER_APPLICATION
    messages = [
        OutgoingMessage(
            activation_id,
            topic,
            encode_activation(
                activation_id=activation_id,
                namespace="compat",
                taskname="record",
                kwargs={"sleep_s": sleep_s},
                application=application,
            ),
        )
        for activation_id, application in applications.items()
    ]
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    report = producer.produce_many(messages, timeout_s=30)
    producer.close(timeout_s=5)
    assert report.all_acknowledged, report.failed
    return ids


def held(broker: PushBroker) -> dict[str, int]:
    """The activations the broker still holds, by status (finished ones are not held)."""
    counts: dict[str, int] = broker.status()["counts_by_status"]
    return {status: n for status, n in counts.items() if n}


def ingested(broker: PushBroker) -> int:
    return int(broker.status()["headline"].get("kafka_ingested", 0))


def requests(broker: PushBroker, method: str, code: str) -> float:
    """ConsumerService calls the broker answered with `code`, from its /metrics."""
    with urllib.request.urlopen(broker.metrics_url, timeout=5) as response:
        exposition = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "taskbroker_grpc_requests_total"
        and sample.labels == {"method": method, "code": code}
    )


def applied(broker: PushBroker) -> int:
    """Results that concluded a task."""
    return int(broker.status()["headline"].get("conclusions_applied", 0))


def run_to_completion(
    broker: PushBroker, worker: PushWorker, ids: list[str], log_path: Path
) -> None:
    """Every task of the worker's application runs once and is concluded by its result;
    the other application's task waits, pending."""
    with BrokerProcess(broker.args, log_path) as process:
        process.start()
        try:
            wait_for(lambda: set(worker.executed()) >= set(ids), RUN_TIMEOUT_S, "every task ran")
            wait_for(lambda: applied(broker) >= len(ids), RUN_TIMEOUT_S, "every result")
        except AssertionError as error:
            logs = f"broker:\n{process.log}\nworker:\n{worker.log}"
            raise AssertionError(f"{error}\n{logs}") from None
        assert held(broker) == {"pending": 1}, process.log
        assert applied(broker) == len(ids)
        assert process.stop() == 0, process.log
    assert worker.executed() == Counter(ids), "a task ran twice, or one that was not pushed"


@pytest.mark.parametrize(
    "secrets",
    [((), ()), (("new-secret", "old-secret"), ("old-secret", "new-secret"))],
    ids=["plain", "signed"],
)
def test_the_push_worker_runs_and_reports_every_task_of_its_application(
    client_python: Path,
    kafka: EmbeddedKafka,
    push_broker: PushBroker,
    tmp_path: Path,
    secrets: tuple[tuple[str, ...], tuple[str, ...]],
) -> None:
    # Each side signs with its first secret and accepts any of its list: a rotation in
    # progress, with the two sides on different first secrets.
    broker_secrets, worker_secrets = secrets
    with PushWorker(client_python, push_broker.grpc_port, tmp_path, worker_secrets) as worker:
        broker = push_broker.with_settings(f"worker_map.{APPLICATION}=127.0.0.1:{worker.port}")
        if broker_secrets:
            broker = broker.with_settings(f"grpc_shared_secret={','.join(broker_secrets)}")
        ids = produce(kafka, push_broker.topic, count=20)
        run_to_completion(broker, worker, ids, tmp_path / "broker.log")


def test_a_push_the_worker_refuses_with_its_queue_full_is_pushed_again(
    client_python: Path, kafka: EmbeddedKafka, push_broker: PushBroker, tmp_path: Path
) -> None:
    # One child, one queued task, and pushes that give up after 0.2 s: while a task runs
    # (0.3 s) and another waits, further pushes are answered RESOURCE_EXHAUSTED.
    settings = WorkerSettings(concurrency=1, queue_size=1, push_timeout_s=0.2)
    with PushWorker(client_python, push_broker.grpc_port, tmp_path, settings=settings) as worker:
        broker = push_broker.with_settings(
            f"worker_map.{APPLICATION}=127.0.0.1:{worker.port}",
            "push.max_backoff_ms=500",  # the busy worker is tried again soon
        )
        ids = produce(kafka, push_broker.topic, count=12, sleep_s=0.3)
        run_to_completion(broker, worker, ids, tmp_path / "broker.log")
        assert "taskworker.add_task.child_task_queue_full" in worker.log, "no push was refused"


def test_with_secrets_that_do_not_match_no_task_runs_and_none_is_concluded(
    client_python: Path, kafka: EmbeddedKafka, push_broker: PushBroker, tmp_path: Path
) -> None:
    # taskbroker-client 0.20.30 does not refuse a push whose signature it cannot verify:
    # its interceptor flags the failure in a thread-local from the request deserializer,
    # which grpcio runs on its polling thread, not on the handler's, so the handler answers
    # OK for an empty task (logged "taskworker.invalid_namespace", reported as FAILURE of
    # id "", which the broker ignores as unknown). The broker therefore sees acknowledged
    # pushes; its tasks wait for their processing deadline. What it does refuse is the
    # worker's reports, signed with a secret it lacks: UNAUTHENTICATED.
    with PushWorker(client_python, push_broker.grpc_port, tmp_path, ("worker-secret",)) as worker:
        broker = push_broker.with_settings(
            f"worker_map.{APPLICATION}=127.0.0.1:{worker.port}",
            "grpc_shared_secret=broker-secret",
        )
        ids = produce(kafka, push_broker.topic, count=5)
        with BrokerProcess(broker.args, tmp_path / "broker.log") as process:
            process.start()
            wait_for(lambda: ingested(broker) == len(ids) + 1, 30, "every task ingested")
            time.sleep(3)  # pushes made, reports refused and sent again
            still_held = held(broker)
            assert sum(still_held.values()) == len(ids) + 1, process.log
            assert applied(broker) == 0
            refused = requests(broker, "SetBatchActivationStatus", "UNAUTHENTICATED")
            assert refused > 0, process.log
            assert process.stop() == 0, process.log
        assert not worker.executed()
