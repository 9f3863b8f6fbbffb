"""The supervisor's lifecycle: ready, a clean stop, an actor that dies, a startup that fails,
and what it logs on the way."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import Consumer, TopicPartition

from actors import config
from actors.cli import ActivationSpec, produce_activations
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import ConfigError
from actors.logs import RepeatFilter
from actors.messages import ConsumerStatsQuery
from actors.producer import KafkaProducer, ProducerConfig
from actors.runtime import ask
from actors.store import DatabaseLock
from actors.supervisor import (
    EXIT_ACTOR_DIED,
    EXIT_OK,
    EXIT_STARTUP_FAILED,
    Broker,
    ReadinessLog,
    Supervisor,
    check_ports,
)
from tests import kafka_support

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
    return kafka_support.broker_config(kafka.bootstrap, topic, dlq, db)


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


def dead_kafka_config(db: Path) -> config.Config:
    return config.load(
        overrides={
            "kafka_cluster": f"127.0.0.1:{free_port()}",
            "grpc_addr": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "db_path": str(db),
        }
    )


def test_with_no_kafka_the_broker_starts_says_so_once_and_is_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh filter: an earlier test's dead Kafka must not have used up the first line.
    client_log = logging.getLogger("actors.consumer.librdkafka")
    monkeypatch.setattr(client_log, "filters", [RepeatFilter()])
    settings = dead_kafka_config(tmp_path / "b.db")
    caplog.set_level(logging.INFO)
    runner = SupervisorThread(Supervisor(settings))
    broker = runner.start()
    try:
        plainly = f"no Kafka answers at {settings.kafka_cluster} (the bootstrap servers)"
        deadline = time.monotonic() + 5.0
        while plainly not in caplog.text:
            assert time.monotonic() < deadline, "the dead Kafka was not reported in 5 s"
            time.sleep(0.05)
        time.sleep(2.0)  # librdkafka reports it again and again meanwhile
        messages = [r.getMessage() for r in caplog.records]
        assert sum(plainly in m for m in messages) == 1
        assert any(m.startswith("taskbroker started: ") for m in messages)
        assert not any(m.startswith("taskbroker ready") for m in messages)
        assert not broker.is_ready()
    finally:
        runner.supervisor.request_stop()
    assert runner.join() == EXIT_OK


def test_readiness_is_logged_once_ready_and_rarely_while_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker(dead_kafka_config(tmp_path / "b.db"), "kafka-host:9092", grpc_port=50123)
    log = ReadinessLog(broker, started_at=100.0, first_s=10.0, every_s=60.0)
    caplog.set_level(logging.INFO, logger="actors.supervisor")
    for now in (100.0, 105.0, 110.0, 140.0, 169.0, 170.0):
        log.observe(False, now)
    log.observe(True, 171.0)
    log.observe(True, 172.0)
    log.observe(False, 300.0)  # after the first readiness, health changes are the front end's
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in logged] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert logged[0][1].startswith("taskbroker not ready after 10 s: Kafka kafka-host:9092 ")
    assert logged[1][1].startswith("taskbroker not ready after 70 s")
    assert logged[2][1] == (
        "taskbroker ready: consuming taskworker from Kafka kafka-host:9092, "
        "serving gRPC on 127.0.0.1:50123"
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that something listens on, on every address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("key", ["grpc_port", "metrics_port", "embedded_kafka_port"])
def test_a_port_in_use_is_refused_naming_its_flag_and_key(key: str, busy_port: int) -> None:
    others = {"grpc_port": 0, "metrics_port": 0, "embedded_kafka_port": free_port()}
    settings = config.load(overrides={**others, key: busy_port})
    with pytest.raises(ConfigError) as refused:
        check_ports(settings)
    flag = "--" + key.replace("_", "-")
    message = str(refused.value)
    assert message.startswith(f"{key} ({flag}): port {busy_port} on ")
    assert "another taskbroker may be running" in message
    assert f"choose another port with {flag} or {key}" in message
    assert "free_port" not in message


def test_two_keys_on_one_port_are_refused() -> None:
    port = free_port()
    settings = config.load(overrides={"grpc_port": port, "metrics_port": port})
    with pytest.raises(ConfigError, match=f"grpc_port and metrics_port are both {port}"):
        check_ports(settings)


def test_ports_that_are_free_or_picked_or_off_pass() -> None:
    check_ports(
        config.load(
            overrides={"grpc_port": 0, "metrics_port": 0, "embedded_kafka_port": free_port()}
        )
    )
    # A configured Kafka: the embedded one's port is not wanted, even if it is taken.
    check_ports(
        config.load(
            overrides={
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                "kafka_cluster": "127.0.0.1:1",
                "embedded_kafka_port": 1,
            }
        )
    )


def test_a_grpc_port_in_use_fails_at_once_before_kafka_and_grpc_start(
    tmp_path: Path, busy_port: int
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", "run", "--db", str(tmp_path / "b.db"),
         "--grpc-port", str(busy_port), "--metrics-port", "0",
         "--embedded-kafka-port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 5.0
    assert result.returncode == EXIT_STARTUP_FAILED
    assert f"grpc_port (--grpc-port): port {busy_port} on 0.0.0.0 is already in use" in (
        result.stderr
    )
    assert "embedded" not in result.stderr  # no Kafka was started
    assert "add_port" not in result.stderr  # nor grpc's server, which logs its own failure


def group_offsets(bootstrap: str, group: str, topic: str) -> int:
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (found,) = reader.committed([TopicPartition(topic, 0)], timeout=TIMEOUT_S)
    finally:
        reader.close()
    offset: int = found.offset
    return offset


def test_shutdown_logs_the_last_flush_and_the_final_offsets_kafka_then_holds(
    kafka: EmbeddedKafka,
    kafka_topics: TopicFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = broker_config(kafka, kafka_topics, tmp_path / "b.db")
    caplog.set_level(logging.INFO)
    runner = SupervisorThread(Supervisor(settings))
    broker = runner.start()
    try:
        wait_until(broker.is_ready)  # auto.offset.reset is latest: produce once assigned
        producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
        try:
            outcome = produce_activations(
                producer, settings.kafka_topic, ActivationSpec("n", "t"), 5, TIMEOUT_S
            )
        finally:
            producer.close(timeout_s=TIMEOUT_S)
        assert outcome.acknowledged == 5
        consumer = broker.ref("consumer")
        wait_until(lambda: ask(consumer, ConsumerStatsQuery(), TIMEOUT_S).ingested == 5)
    finally:
        runner.supervisor.request_stop()
    assert runner.join() == EXIT_OK

    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("taskbroker ready: consuming ") for m in messages)
    committed = group_offsets(kafka.bootstrap, settings.kafka_consumer_group, settings.kafka_topic)
    assert committed > 0
    assert (
        f"committed the final offsets of {settings.kafka_topic} (next to read): "
        f"partition 0 at {committed}"
    ) in messages
    (closed,) = [m for m in messages if m.startswith("SQLite writer closed")]
    assert re.search(r"the last flush \(#\d+\) committed \d+ records stored and 0 removed", closed)
    assert closed.endswith(": 5 stored, 0 removed)")


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
