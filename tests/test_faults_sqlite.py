"""SQLite failing under a running `taskbroker run`: a full disk, and a database another
process holds locked. The promise is the same for both: workers' claims and results are
still answered (from memory), flushes fail and back off, no Kafka offset is committed past
what is durable, and once the disk takes writes again everything lands: every task
completed, every offset committed, nothing left behind.
"""

from __future__ import annotations

import errno
import os
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.embedded_kafka import EmbeddedKafka
from tests.faults_support import (
    FaultBroker,
    Topics,
    Worker,
    broker_process,
    committed_offset,
    new_topics,
    produce,
)
from tests.ops_support import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BEFORE = 20
DURING = 30
# Bigger than the write-ahead log the first tasks leave, so the tasks that arrive during
# the fault cannot fit in WAL space already allocated: they need the disk to grow.
PAYLOAD = "x" * 8_000

FAILED_LINE = "failed; flushes are retried with backoff until the store accepts writes again"
RECOVERED_LINE = "accepts writes again after"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of this test's own, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "a full disk needs a small file system of the test's own and mounting one "
            f"needs root (CAP_SYS_ADMIN): mount said {mounted.stderr.strip()!r}"
        )
    try:
        yield mount_point
    finally:
        # The broker is stopped (or killed) by then; lazily, should a reader linger.
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> Path:
    """A ballast file that takes every free byte of `directory`'s file system."""
    ballast = directory / "ballast"
    chunk = b"\0" * 65_536
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            try:
                written = os.write(fd, chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
            else:
                if written < len(chunk):
                    chunk = chunk[: max(len(chunk) // 2, 1)]
    finally:
        os.close(fd)
    free = os.statvfs(directory).f_bavail
    assert free == 0, f"{free} blocks still free"
    return ballast


def stored_ids(db_path: Path) -> set[str]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT id FROM activations").fetchall()
    connection.close()
    return {task_id for (task_id,) in rows}


class Fault:
    """What a test checks while SQLite refuses writes, and after it takes them again."""

    def __init__(self, kafka: EmbeddedKafka, topics: Topics, broker: FaultBroker) -> None:
        self.kafka = kafka
        self.topics = topics
        self.broker = broker

    def before(self) -> list[str]:
        """Tasks held, durable and committed before the fault."""
        held = produce(self.kafka, self.topics.topic, BEFORE, tag="before")
        wait_until(lambda: self.broker.held("pending") == BEFORE, "the first tasks held")
        wait_until(
            lambda: committed_offset(self.kafka, self.topics) == BEFORE,
            "the first tasks' offsets committed",
        )
        return held

    def during(self, held: list[str]) -> list[str]:
        """Tasks that arrive while SQLite refuses writes: they are consumed, every held
        task is claimed and completed, and nothing is committed."""
        broker = self.broker
        failures_before = broker.counter("taskbroker_writer_flush_failures")
        arriving = produce(
            self.kafka, self.topics.topic, DURING, tag="during", kwargs={"pad": PAYLOAD}
        )
        wait_until(
            lambda: broker.counter("taskbroker_writer_flush_failures") >= failures_before + 2,
            "flushes to fail, and to be tried again",
        )
        with Worker(broker.grpc_target) as worker:
            wait_until(
                lambda: worker.outcomes.completed() == {*held, *arriving},
                "every task claimed and completed while SQLite refuses writes",
            )
        assert worker.outcomes.refused == []
        # Nothing that arrived during the fault is durable, so its offsets stay uncommitted.
        assert committed_offset(self.kafka, self.topics) == BEFORE
        assert FAILED_LINE in broker.process.log
        assert broker.readyz()[0] == 200
        return arriving

    def after(self, db_path: Path) -> None:
        """Everything lands: offsets committed, no record left held or stored."""
        broker = self.broker
        total = BEFORE + DURING
        wait_until(
            lambda: committed_offset(self.kafka, self.topics) == total,
            "every offset committed once SQLite takes writes",
        )
        wait_until(lambda: RECOVERED_LINE in broker.process.log, "the writer to say it recovered")
        wait_until(lambda: stored_ids(db_path) == set(), "the completed tasks gone from the file")
        statuses = ("pending", "processing", "retry", "failure", "complete")
        wait_until(
            lambda: all(broker.held(status) == 0 for status in statuses),
            "the broker to hold nothing",
        )
        failures = broker.counter("taskbroker_writer_flush_failures")
        # Backed off: a failed flush waits before the next (50 ms, doubling to 2 s), so a
        # fault of a few seconds is a handful of failures, not one per flush interval.
        assert failures < 40, failures


def test_a_full_disk_loses_nothing_and_everything_lands_once_space_returns(
    kafka: EmbeddedKafka, small_disk: Path, tmp_path: Path
) -> None:
    topics = new_topics(kafka)
    db_path = small_disk / "broker.sqlite"
    with broker_process(kafka, topics, db_path, tmp_path) as broker:
        fault = Fault(kafka, topics, broker)
        held = fault.before()
        ballast = fill(small_disk)
        fault.during(held)
        assert "database or disk is full" in broker.process.log
        ballast.unlink()
        fault.after(db_path)


def test_files_that_cannot_grow_lose_nothing_and_everything_lands_once_they_can(
    kafka: EmbeddedKafka, tmp_path: Path
) -> None:
    """The full disk without a file system of its own (no root needed): the broker's
    process may not grow a file past its current size (RLIMIT_FSIZE, set from outside with
    prlimit), so its writes fail as on a full disk (EFBIG; Python ignores SIGXFSZ)."""
    topics = new_topics(kafka)
    db_path = tmp_path / "broker.sqlite"
    with broker_process(kafka, topics, db_path, tmp_path) as broker:
        fault = Fault(kafka, topics, broker)
        held = fault.before()
        # The broker's pid, as its database lock names it.
        pid = int(Path(f"{db_path}.lock").read_text())
        unlimited = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        largest = max(
            os.stat(path).st_size
            for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"))
        )
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (largest, unlimited[1]))
        try:
            fault.during(held)
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, unlimited)
        fault.after(db_path)


# Holds the write lock of the database named on the command line until its stdin closes.
_LOCK_HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
connection.execute("COMMIT")
"""


def test_a_database_locked_by_another_process_loses_nothing(
    kafka: EmbeddedKafka, tmp_path: Path
) -> None:
    topics = new_topics(kafka)
    db_path = tmp_path / "broker.sqlite"
    # A flush gives up on the lock after 0.5 s (5 s by default) and backs off: the fault
    # then shows as failed flushes within a few seconds.
    with broker_process(kafka, topics, db_path, tmp_path, "store.busy_timeout_ms=500") as broker:
        fault = Fault(kafka, topics, broker)
        held = fault.before()
        with subprocess.Popen(
            [sys.executable, "-c", _LOCK_HOLDER, str(db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as holder:
            assert holder.stdin is not None
            assert holder.stdout is not None
            try:
                assert holder.stdout.readline() == "locked\n"
                fault.during(held)
                assert "database is locked" in broker.process.log
            finally:
                holder.stdin.close()  # the holder commits and exits
                assert holder.wait(10) == 0
        fault.after(db_path)
