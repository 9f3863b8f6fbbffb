"""One broker per database file: a second store, writer or `taskbroker run` on a file that
another one holds is refused, naming the file and the holder; a crash leaves no lock."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from actors.activation import encode_activation
from actors.direct import DirectStore
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import StoreError
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.runtime import MailboxConfig
from actors.statemachine import Limits
from actors.store import SqliteStore
from actors.supervisor import EXIT_STARTUP_FAILED
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from actors.writer import SqliteWriter, WriterConfig
from tests.broker_process import BrokerProcess, run_args, wait_for
from tests.recipients import Collector

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

STARTUP_TIMEOUT_S = 60.0


def in_use_message(db_path: Path, pid: int) -> str:
    return (
        f"SQLite store {db_path} is in use by another broker (pid {pid}); "
        "one broker per database file"
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.sqlite"


def open_store(path: Path) -> None:
    SqliteStore(path).close()


def open_direct_store(path: Path) -> None:
    DirectStore(path, Limits()).close()


def start_writer(path: Path) -> None:
    SqliteWriter.start(WriterConfig(path), Collector(), mailbox=MailboxConfig(size=4)).stop()


@pytest.mark.parametrize(
    "second", [open_store, open_direct_store, start_writer], ids=["store", "direct", "writer"]
)
def test_a_second_opener_of_a_held_file_is_refused_naming_it_and_the_holder(
    db_path: Path, second: Callable[[Path], None]
) -> None:
    holder = SqliteStore(db_path)
    try:
        with pytest.raises(StoreError) as refused:
            second(db_path)
        assert str(refused.value) == in_use_message(db_path, os.getpid())
    finally:
        holder.close()
    second(db_path)  # a clean close gave the lock back


def test_the_lock_file_names_the_holder_only_while_it_is_held(db_path: Path) -> None:
    lock_file = Path(f"{db_path}.lock")
    store = SqliteStore(db_path)
    assert lock_file.read_text() == f"{os.getpid()}\n"
    store.close()
    store.close()  # a second close must not close a descriptor someone else now owns
    assert lock_file.read_text() == ""


def test_a_refused_file_gives_its_lock_back(db_path: Path) -> None:
    db_path.write_bytes(b"not a database" * 200)
    for _ in range(2):
        with pytest.raises(StoreError, match="not a database"):
            SqliteStore(db_path)


def produce(kafka: EmbeddedKafka, topic: str, activation_id: str) -> None:
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    try:
        value = encode_activation(activation_id=activation_id, namespace="lock", taskname="t")
        report = producer.produce_many([OutgoingMessage(activation_id, topic, value)], timeout_s=30)
    finally:
        producer.close(timeout_s=5)
    assert report.all_acknowledged, report.failed


def stored_ids(db_path: Path) -> set[str]:
    # The broker holds the file's lock, so the test reads it as plain SQLite.
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        try:
            return {row[0] for row in conn.execute("SELECT id FROM activations")}
        except sqlite3.OperationalError:  # not migrated yet
            return set()


@pytest.mark.kafka
@pytest.mark.slow
def test_a_second_broker_exits_2_until_the_first_is_killed_then_one_serves_the_file(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> None:
    topic, dlq = kafka_topics()
    db_path = tmp_path / "broker.sqlite"
    first_port = free_port()
    with BrokerProcess(
        run_args(kafka, topic, dlq, db_path, first_port), tmp_path / "first.log"
    ) as first:
        first.start(STARTUP_TIMEOUT_S)
        produce(kafka, topic, "kept")
        wait_for(lambda: "kept" in stored_ids(db_path), 30, "the activation in the first's file")
        holder = int(Path(f"{db_path}.lock").read_text())
        command_line = Path(f"/proc/{holder}/cmdline").read_bytes().split(b"\0")
        assert str(first_port).encode() in command_line, "the lock names another process"

        second = subprocess.run(
            [sys.executable, "-m", "actors.cli", "run",
             *run_args(kafka, topic, dlq, db_path, free_port())],
            capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert second.returncode == EXIT_STARTUP_FAILED, second.stderr
        assert in_use_message(db_path, holder) in second.stderr
        first.kill()

    # SIGKILL closed no file by hand: the kernel released the lock with the process.
    third_port = free_port()
    with BrokerProcess(
        run_args(kafka, topic, dlq, db_path, third_port), tmp_path / "third.log"
    ) as third:
        third.start(STARTUP_TIMEOUT_S)
        with grpc.insecure_channel(f"127.0.0.1:{third_port}") as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            task = stub.GetTask(pb.GetTaskRequest(namespace="lock"), timeout=10).task
        assert task.id == "kept"  # restored from the file the first broker left
        assert third.stop() == 0, third.log
