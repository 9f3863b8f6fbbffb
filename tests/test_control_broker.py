"""The incident controls on `taskbroker run`, as an operator meets them: the rules file and
SIGHUP, `taskbroker control` through the admin endpoint, Kafka, gRPC workers' claims, and a
restart that keeps the control actions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from actors.activation import encode_activation
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from tests.broker_process import BrokerProcess, run_args, wait_for
from tests.kafka_support import read_values
from tests.ops_support import http_get, sample, scrape

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

TOKEN = "incident-controls-token-0123456789"
WAIT_S = 30.0


class Operator:
    """What an operator has at hand: the ports, the rules file, the token in a file."""

    def __init__(self, tmp_path: Path, metrics_port: int, grpc_port: int) -> None:
        self.url = f"http://127.0.0.1:{metrics_port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.rules_file = tmp_path / "rules.yaml"
        self.token_file = tmp_path / "admin-token"
        self.token_file.write_text(TOKEN + "\n")

    def write_rules(self, text: str) -> None:
        self.rules_file.write_text(text)

    def control(self, *arguments: str) -> str:
        """`taskbroker control ...` with the token in the environment; its output."""
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "actors.cli",
                "control",
                *arguments,
                "--url",
                self.url,
                "--who",
                "tester",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TASKBROKER_OPS_ADMIN_TOKEN_FILE": str(self.token_file)},
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def status_table(self) -> str:
        """`taskbroker status`'s output."""
        return subprocess.run(
            [sys.executable, "-m", "actors.cli", "status", "--url", self.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    def status(self) -> dict[str, Any]:
        code, body = http_get(f"{self.url}/status")
        assert code == 200, body
        document: dict[str, Any] = json.loads(body)
        return document

    def pending(self) -> int:
        return int(self.status().get("counts_by_status", {}).get("pending", -1))

    def claim_all(self, expected: int) -> list[str]:
        """Claim as a worker does until `expected` tasks came or a while passed; then one
        more claim must find nothing."""
        claimed: list[str] = []
        deadline = time.monotonic() + WAIT_S
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            while len(claimed) < expected and time.monotonic() < deadline:
                task = get_task(stub)
                if task is None:
                    time.sleep(0.1)
                    continue
                claimed.append(task.id)
                stub.SetTaskStatus(
                    pb.SetTaskStatusRequest(id=task.id, status=pb.TASK_ACTIVATION_STATUS_COMPLETE),
                    timeout=5,
                )
            assert get_task(stub) is None
        return claimed


def get_task(stub: pb_grpc.ConsumerServiceStub) -> pb.TaskActivation | None:
    """A worker's GetTask: the task, or None for NOT_FOUND (any other error fails)."""
    try:
        response = stub.GetTask(pb.GetTaskRequest(), timeout=5)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return response.task


def produce(kafka: EmbeddedKafka, topic: str, *tasks: tuple[str, str, str]) -> dict[str, bytes]:
    """(id, namespace, taskname) activations, acknowledged by Kafka; their bytes by id."""
    values = {
        activation_id: encode_activation(
            activation_id=activation_id, namespace=namespace, taskname=taskname, args=[1]
        )
        for activation_id, namespace, taskname in tasks
    }
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    report = producer.produce_many(
        [OutgoingMessage(i, topic, value) for i, value in values.items()], timeout_s=30
    )
    producer.close(timeout_s=5)
    assert report.all_acknowledged, report.failed
    return values


def post_control(url: str, authorization: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(
        f"{url}/control",
        data=json.dumps({"action": "pause", "namespace": "x", "who": "mallory"}).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@contextmanager
def broker(args: list[str], log: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(args, log)
    with process:
        process.start()
        yield process
        assert process.stop() == 0, process.log


def reload_at_sighup(operator: Operator, process: BrokerProcess, demoted_topic: str) -> None:
    """A bad file at SIGHUP keeps "held" paused; a good one releases its three tasks."""
    operator.write_rules("paused_namespaces: [")
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "runtime rules not reloaded (SIGHUP)" in process.log, WAIT_S, "refusal")
    assert operator.claim_all(0) == []
    assert operator.status()["runtime_rules"]["file"]["error"] is not None
    families = scrape(operator.url)
    failures = "taskbroker_runtime_rules_reload_failures"
    assert sample(families, failures, f"{failures}_total") == 1
    assert sample(families, "taskbroker_runtime_rules_file_ok") == 0

    operator.write_rules(f"demoted_topic: {demoted_topic}\n")
    process.send_signal(signal.SIGHUP)
    assert operator.claim_all(3) == ["held-0", "held-1", "held-2"], "not oldest first"


@pytest.mark.kafka
def test_incident_controls_end_to_end(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> None:
    topic, dlq = kafka_topics()
    demoted_topic, _ = kafka_topics()
    metrics_port, grpc_port = free_port(), free_port()
    operator = Operator(tmp_path, metrics_port, grpc_port)
    operator.write_rules(f"paused_namespaces: [held]\ndemoted_topic: {demoted_topic}\n")
    args = [
        *run_args(kafka, topic, dlq, tmp_path / "broker.sqlite", grpc_port, metrics_port),
        "--set", f"runtime_config_path={operator.rules_file}",
        # Only SIGHUP reloads the file in this test.
        "--set", "runtime_config_check_interval_ms=600000",
        "--set", f"ops_admin_token_file={operator.token_file}",
    ]  # fmt: skip

    with broker(args, tmp_path / "first.log") as process:
        # A paused namespace is consumed and kept, not handed out.
        produce(kafka, topic, *((f"held-{n}", "held", "ok") for n in range(3)))
        produce(kafka, topic, ("free-0", "free", "ok"), ("free-1", "free", "ok"))
        assert sorted(operator.claim_all(2)) == ["free-0", "free-1"]
        wait_for(lambda: operator.pending() == 3, WAIT_S, "the held tasks in /status")
        status = operator.status()
        assert status["runtime_rules"]["effective"]["paused_namespaces"] == ["held"]
        assert status["headline"]["held_by_pause"] == 3

        reload_at_sighup(operator, process, demoted_topic)

        # The admin endpoint wants the token.
        wrong = "Bearer wrong-token-wrong-token-wrong"
        assert [post_control(operator.url, None), post_control(operator.url, wrong)] == [401, 401]

        # Kill and demote what is pending, then what comes.
        doomed = produce(kafka, topic, ("doomed-0", "free", "bad.task"), ("noisy-0", "noisy", "ok"))
        wait_for(lambda: operator.pending() == 2, WAIT_S, "the doomed and noisy tasks")
        assert "in force: kill bad.task" in operator.control("kill", "bad.task")
        assert "in force: demote namespace noisy" in operator.control("demote", "noisy")
        after = produce(
            kafka,
            topic,
            ("doomed-1", "free", "bad.task"),
            ("noisy-1", "noisy", "ok"),
            ("free-2", "free", "ok"),
        )
        assert operator.claim_all(1) == ["free-2"], "a dropped activation held ingest back"
        forwarded = read_values(kafka.bootstrap, demoted_topic, count=2)
        assert sorted(value for value, _ in forwarded) == sorted(
            [doomed["noisy-0"], after["noisy-1"]]
        )
        families = scrape(operator.url)
        dropped = "taskbroker_killswitch_dropped"
        assert sample(families, dropped, f"{dropped}_total", entry="bad.task") == 2
        assert process.log.count("killswitch bad.task dropped its first activation") == 1
        wait_for(
            lambda: operator.status()["headline"]["demoted_forwarded"] == 2,
            WAIT_S,
            "the forwards in /status",
        )
        assert operator.status()["headline"]["killswitch_dropped"] == 2

        operator.control("pause", "--namespace", "later")
        produce(kafka, topic, ("later-0", "later", "ok"))
        wait_for(lambda: operator.pending() == 1, WAIT_S, "the paused task")

    # The controls survive a restart; resume lets the paused task out.
    with broker(args, tmp_path / "second.log"):
        assert operator.claim_all(0) == []
        controls = operator.status()["runtime_rules"]["controls"]
        assert [(c["action"], c["who"]) for c in controls] == [
            ("kill", "tester from 127.0.0.1"),
            ("demote", "tester from 127.0.0.1"),
            ("pause", "tester from 127.0.0.1"),
        ]
        shown = operator.control("show")
        assert "paused namespaces:   later" in shown
        assert "control: pause later by tester from 127.0.0.1" in shown
        assert "paused namespaces:   later" in operator.status_table()
        assert "resumed: pause namespace later" in operator.control(
            "resume", "--namespace", "later"
        )
        assert operator.claim_all(1) == ["later-0"]
