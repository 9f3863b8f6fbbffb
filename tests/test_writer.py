"""The SQLite writer actor over real pykka threads and real files: what it tells the state
and the consumer, how it backs off and logs a failing store, and how it shuts down."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.errors import ConfigError, StoreError
from actors.messages import (
    Flush,
    FlushDone,
    FlushFailed,
    LoadAndRestore,
    Maintain,
    Persisted,
    Restore,
    StoreSizesQuery,
)
from actors.records import KafkaOffset, Offset, Partition, Record
from actors.runtime import MailboxConfig
from actors.store import SqliteStore, StoreSizes
from actors.writer import SqliteWriter, WriterConfig
from tests.factories import make_record

TIMEOUT_S = 5.0


class Recorder:
    """A recipient that keeps what it is told, and when, and lets a test wait for it."""

    def __init__(self) -> None:
        self.messages: list[object] = []
        self.received_at: list[float] = []
        self._changed = threading.Condition()

    def tell(self, message: object) -> None:
        with self._changed:
            self.messages.append(message)
            self.received_at.append(time.monotonic())
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[object]:
        deadline = time.monotonic() + TIMEOUT_S
        with self._changed:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{len(self.messages)} of {count} messages: {self.messages}"
                self._changed.wait(remaining)
            return list(self.messages)


@pytest.fixture
def actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.sqlite"


def start_writer(
    config: WriterConfig, state: Recorder, listener: Recorder | None = None
) -> pykka.ActorRef[SqliteWriter]:
    return SqliteWriter.start(
        config, state, mailbox=MailboxConfig(size=100), persisted_listener=listener
    )


def ask(writer: pykka.ActorRef[SqliteWriter], message: object) -> Any:
    return writer.ask(message, block=True, timeout=TIMEOUT_S)


def flush_of(seq: int, *records: Record) -> Flush:
    return Flush(
        seq=seq,
        upserts=tuple(record.row() for record in records),
        deletes=(),
        new_blobs=tuple((record.id, record.activation) for record in records),
        offsets=tuple(KafkaOffset(record.partition, record.offset) for record in records),
    )


def stored(db_path: Path) -> list[Record]:
    store = SqliteStore(db_path)
    try:
        return store.load()
    finally:
        store.close()


# --- Configuration, no threads ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"busy_timeout_ms": -1}, "busy_timeout_ms"),
        ({"debug_commit_delay_ms": -1}, "debug_commit_delay_ms"),
        ({"retry_backoff_min_ms": 0}, "retry_backoff_min_ms"),
        ({"retry_backoff_min_ms": 100, "retry_backoff_max_ms": 50}, "retry_backoff_max_ms"),
    ],
)
def test_an_invalid_setting_is_refused_by_name(
    settings: dict[str, Any], key: str, db_path: Path
) -> None:
    with pytest.raises(ConfigError, match=key):
        WriterConfig(db_path, **settings)


def test_the_backoff_doubles_per_failure_up_to_its_cap(db_path: Path) -> None:
    config = WriterConfig(db_path, retry_backoff_min_ms=50, retry_backoff_max_ms=300)

    backoffs = [config.retry_backoff_s(failures) for failures in (1, 2, 3, 4, 1_000)]

    assert backoffs == [0.05, 0.1, 0.2, 0.3, 0.3]


# --- The actor ------------------------------------------------------------------------


@pytest.mark.usefixtures("actors")
def test_a_bad_file_fails_the_start_in_the_callers_thread(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database, it is a text file" * 100)

    with pytest.raises(StoreError, match=str(db_path)):
        start_writer(WriterConfig(db_path), Recorder())
    assert pykka.ActorRegistry.get_all() == []


@pytest.mark.usefixtures("actors")
def test_a_committed_flush_is_told_to_the_consumer_then_to_the_state(db_path: Path) -> None:
    state, consumer = Recorder(), Recorder()
    writer = start_writer(WriterConfig(db_path), state, consumer)
    records = [make_record("a-1", partition=Partition(3), offset=Offset(41))]

    writer.tell(flush_of(1, *records))
    writer.tell(Flush(2, upserts=(), deletes=(records[0].id,), new_blobs=(), offsets=()))

    assert state.wait_for(2) == [FlushDone(1), FlushDone(2)]
    assert consumer.wait_for(1) == [Persisted((KafkaOffset(Partition(3), Offset(41)),))]
    assert consumer.received_at[0] <= state.received_at[0]
    writer.stop(timeout=TIMEOUT_S)
    assert consumer.messages == [Persisted((KafkaOffset(Partition(3), Offset(41)),))]
    assert stored(db_path) == []


@pytest.mark.usefixtures("actors")
def test_load_and_restore_tells_the_state_every_stored_record(db_path: Path) -> None:
    records = [make_record(f"a-{i}", added_at=float(i)) for i in range(3)]
    store = SqliteStore(db_path)
    store.apply(flush_of(1, *records))
    store.close()
    state = Recorder()
    writer = start_writer(WriterConfig(db_path), state)

    assert ask(writer, LoadAndRestore()) == 3
    assert state.wait_for(1) == [Restore(tuple(records))]


@pytest.mark.usefixtures("actors")
def test_a_locked_store_fails_flushes_with_backoff_and_logs_once_per_streak(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="actors.writer")
    state, consumer = Recorder(), Recorder()
    config = WriterConfig(
        db_path, busy_timeout_ms=10, retry_backoff_min_ms=100, retry_backoff_max_ms=200
    )
    writer = start_writer(config, state, consumer)
    record = make_record("a-1")
    lock = sqlite3.connect(db_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        # The state re-sends the changes after each failure, as the state actor does.
        for attempt in range(1, 4):
            sent_at = time.monotonic()
            writer.tell(flush_of(attempt, record))
            [*_, failed] = state.wait_for(attempt)
            assert isinstance(failed, FlushFailed)
            assert failed.seq == attempt
            assert "locked" in failed.error
            assert state.received_at[-1] - sent_at >= config.retry_backoff_s(attempt)
        lock.execute("ROLLBACK")
        writer.tell(flush_of(4, record))
        assert state.wait_for(4)[-1] == FlushDone(4)
    finally:
        lock.close()

    assert consumer.wait_for(1) == [Persisted((KafkaOffset(record.partition, record.offset),))]
    # Read before the stop, whose closing line is not about the streak.
    notices = [r for r in caplog.records if r.levelno >= logging.INFO]
    writer.stop(timeout=TIMEOUT_S)
    assert [r.levelno for r in notices] == [logging.WARNING, logging.INFO]
    assert "flush 1 failed" in notices[0].getMessage()
    assert "after 3 failed flushes" in notices[1].getMessage()
    assert stored(db_path) == [record]


@pytest.mark.usefixtures("actors")
def test_the_backoff_does_not_hold_the_actor(db_path: Path) -> None:
    state = Recorder()
    config = WriterConfig(
        db_path, busy_timeout_ms=10, retry_backoff_min_ms=10_000, retry_backoff_max_ms=10_000
    )
    writer = start_writer(config, state)
    lock = sqlite3.connect(db_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        writer.tell(flush_of(1, make_record("a-1")))
        started = time.monotonic()

        assert isinstance(ask(writer, StoreSizesQuery()), StoreSizes)
        writer.stop(timeout=TIMEOUT_S)

        assert time.monotonic() - started < 2.0
        assert state.messages == []  # the stop cancelled the pending failure report
    finally:
        lock.close()


@pytest.mark.usefixtures("actors")
def test_flushes_queued_before_stop_are_committed(db_path: Path) -> None:
    state = Recorder()
    writer = start_writer(WriterConfig(db_path, debug_commit_delay_ms=100), state)
    records = [make_record(f"a-{i}") for i in range(3)]

    for seq, record in enumerate(records, start=1):
        writer.tell(flush_of(seq, record))
    writer.stop(timeout=TIMEOUT_S)

    assert state.messages == [FlushDone(1), FlushDone(2), FlushDone(3)]
    assert {r.id for r in stored(db_path)} == {r.id for r in records}
    assert not Path(f"{db_path}-wal").exists()  # closed: the last connection removes its WAL


@pytest.mark.usefixtures("actors")
def test_maintenance_answers_the_sizes_after_it(db_path: Path) -> None:
    writer = start_writer(WriterConfig(db_path), Recorder())
    writer.tell(flush_of(1, *(make_record(f"a-{i}") for i in range(100))))

    sizes = ask(writer, Maintain(full_vacuum=True))

    assert isinstance(sizes, StoreSizes)
    assert sizes.db_bytes > 0
    assert ask(writer, StoreSizesQuery()) == sizes


@pytest.mark.usefixtures("actors")
def test_an_unknown_message_is_refused_to_the_asker(db_path: Path) -> None:
    writer = start_writer(WriterConfig(db_path), Recorder())

    with pytest.raises(TypeError, match="unknown message"):
        ask(writer, "compact please")
    assert ask(writer, StoreSizesQuery()).db_bytes > 0


@pytest.mark.usefixtures("actors")
def test_maintenance_on_a_locked_store_is_skipped_not_fatal(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = start_writer(WriterConfig(db_path, busy_timeout_ms=10), Recorder())
    lock = sqlite3.connect(db_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")

        sizes = ask(writer, Maintain(full_vacuum=False))
    finally:
        lock.close()

    assert sizes == ask(writer, StoreSizesQuery())
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"SQLite maintenance skipped: maintenance on SQLite store {db_path}: database is locked"
    ]


class _StoppedState(pykka.ThreadingActor):
    def on_receive(self, message: object) -> None:
        raise AssertionError(f"a stopped actor got {message!r}")


@pytest.mark.usefixtures("actors")
def test_a_state_actor_stopped_first_does_not_take_the_writer_down(db_path: Path) -> None:
    state = _StoppedState.start()
    state.stop(timeout=TIMEOUT_S)
    writer = SqliteWriter.start(WriterConfig(db_path), state, mailbox=MailboxConfig(size=10))
    record = make_record("a-1")

    writer.tell(flush_of(1, record))

    assert ask(writer, StoreSizesQuery()).db_bytes > 0
    writer.stop(timeout=TIMEOUT_S)
    assert stored(db_path) == [record]
