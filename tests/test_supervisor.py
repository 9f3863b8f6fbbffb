"""The supervisor's lifecycle: ready, a clean stop, an actor that dies, a startup that fails."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from actors import config
from actors.embedded_kafka import EmbeddedKafka
from actors.store import DatabaseLock
from actors.supervisor import (
    EXIT_ACTOR_DIED,
    EXIT_OK,
    EXIT_STARTUP_FAILED,
    Broker,
    Supervisor,
)

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka
TIMEOUT_S = 30.0


class SupervisorThread:
    """Runs `Supervisor.run` on a thread and hands the test the broker once it is ready."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.exit_code: int | None = None
        self.ready = threading.Event()
        self.broker: Broker | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.exit_code = self.supervisor.run(on_ready=self._on_ready)
        self.ready.set()  # also when startup failed, so the test does not wait in vain

    def _on_ready(self, broker: Broker) -> None:
        self.broker = broker
        self.ready.set()

    def start(self) -> Broker:
        self._thread.start()
        assert self.ready.wait(TIMEOUT_S), "broker not ready"
        assert self.broker is not None, f"startup failed with exit code {self.exit_code}"
        return self.broker

    def join(self) -> int | None:
        self._thread.join(TIMEOUT_S)
        assert not self._thread.is_alive(), "supervisor did not finish"
        return self.exit_code


def broker_config(kafka: EmbeddedKafka, topics: TopicFactory, db: Path) -> config.Config:
    topic, dlq = topics()
    return config.load(
        overrides={
            "kafka_cluster": kafka.bootstrap,
            "kafka_topic": topic,
            "kafka_deadletter_topic": dlq,
            "kafka_consumer_group": f"group-{topic}",
            "grpc_addr": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "db_path": str(db),
        }
    )


def test_clean_stop_exits_zero(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> None:
    runner = SupervisorThread(Supervisor(broker_config(kafka, kafka_topics, tmp_path / "b.db")))
    broker = runner.start()
    assert broker.grpc_port > 0
    assert [name for name, _ in broker.actors] == [
        "state",
        "writer",
        "upkeep",
        "consumer",
        "frontend",
    ]
    runner.supervisor.request_stop()
    assert runner.join() == EXIT_OK
    assert not any(ref.is_alive() for _, ref in broker.actors)


def test_an_actor_that_dies_stops_the_broker_with_an_error(
    kafka: EmbeddedKafka,
    kafka_topics: TopicFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = SupervisorThread(Supervisor(broker_config(kafka, kafka_topics, tmp_path / "b.db")))
    broker = runner.start()
    broker.ref("upkeep").stop(timeout=TIMEOUT_S)
    assert runner.join() == EXIT_ACTOR_DIED
    assert "upkeep stopped unexpectedly" in caplog.text
    assert not any(ref.is_alive() for _, ref in broker.actors)


def test_a_corrupt_database_fails_the_start_naming_the_file(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> None:
    db = tmp_path / "corrupt.sqlite"
    db.write_bytes(b"this is not a database, not even close" * 100)
    topic, _ = kafka_topics()
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", "run", "--kafka", kafka.bootstrap, "--db", str(db),
         "--grpc-port", "0", "--metrics-port", "0", "--set", f"kafka_topic={topic}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == EXIT_STARTUP_FAILED
    assert str(db) in result.stderr


@pytest.mark.parametrize("held", [True, False], ids=["held by another broker", "no directory"])
def test_a_database_the_broker_cannot_have_fails_before_kafka_starts(
    tmp_path: Path, held: bool
) -> None:
    db = tmp_path / "inflight.sqlite" if held else tmp_path / "missing" / "inflight.sqlite"
    holder = DatabaseLock(db) if held else None
    try:
        result = subprocess.run(
            # No --kafka: the embedded Kafka would start first, were the check later.
            [sys.executable, "-m", "actors.cli", "run", "--db", str(db),
             "--grpc-port", "0", "--metrics-port", "0", "--embedded-kafka-port", "1"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        if holder is not None:
            holder.release()
    assert result.returncode == EXIT_STARTUP_FAILED
    expected = f"(pid {os.getpid()})" if held else f"the directory {db.parent} of the SQLite"
    assert expected in result.stderr
    assert "embedded Kafka" not in result.stderr


def test_bad_configuration_exits_before_starting_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", "run", "--set", "max_pending_count=0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == EXIT_STARTUP_FAILED
    assert "max_pending_count: must be at least 1" in result.stderr


def test_config_command_prints_the_effective_configuration() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", "config", "--grpc-port", "6001",
         "--set", "grpc_shared_secret=topsecret", "--set", "mailbox.state.policy=fail"],
        capture_output=True, text=True, timeout=60, check=True,
        env={"TASKBROKER_KAFKA_TOPIC": "from-env", "PATH": ""},
    )  # fmt: skip
    assert "grpc_port = 6001" in result.stdout
    assert 'kafka_topic = "from-env"' in result.stdout
    assert "topsecret" not in result.stdout
    assert 'policy = "fail"' in result.stdout
