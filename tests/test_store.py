"""SqliteStore against real files: batches, failures that leave nothing behind, restarts,
corrupt files, and a writer process killed at random moments."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from actors.errors import StoreError, StoreUnavailable
from actors.messages import Flush
from actors.records import (
    ActivationId,
    Offset,
    OnAttemptsExceeded,
    Partition,
    Record,
    Status,
)
from actors.store import SCHEMA_VERSION, SqliteStore
from tests import writer_crash_child
from tests.factories import make_record


def new_records_flush(seq: int, records: Iterable[Record]) -> Flush:
    """A flush that stores `records` for the first time, bytes included."""
    records = tuple(records)
    return Flush(
        seq=seq,
        upserts=tuple(record.row() for record in records),
        deletes=(),
        new_blobs=tuple((record.id, record.activation) for record in records),
        offsets=(),
    )


def by_id(records: Iterable[Record]) -> dict[str, Record]:
    return {record.id: record for record in records}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.sqlite"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(db_path)
    yield opened
    opened.close()


def test_a_new_file_gets_the_schema_and_its_settings(store: SqliteStore, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
    finally:
        conn.close()
    assert {"activations", "activation_blobs", "activations_status_added_at"} <= tables
    assert store.load() == []


def test_every_field_survives_a_round_trip(store: SqliteStore, db_path: Path) -> None:
    # Every field differs from its default and from the others, so a column stored in
    # the wrong place or read back as the wrong type cannot go unnoticed.
    record = Record(
        id=ActivationId("a-1"),
        application="app",
        namespace="ns",
        taskname="task",
        status=Status.RETRY,
        received_at=1700000000.25,
        added_at=1700000001.5,
        partition=Partition(7),
        offset=Offset(12345678901),
        activation=b"\x00\xffbytes",
        processing_deadline_duration_s=30,
        processing_deadline=1700000031.75,
        processing_attempts=2,
        at_most_once=True,
        on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER,
        expires_at=1700003600.125,
        delay_until=1700000100.0625,
        attempts=3,
        max_attempts=5,
        delay_on_retry_s=9,
    )
    store.apply(new_records_flush(1, [record]))
    store.close()
    reopened = SqliteStore(db_path)
    try:
        [loaded] = reopened.load()
    finally:
        reopened.close()
    assert loaded == record
    assert type(loaded.status) is Status
    assert type(loaded.on_attempts_exceeded) is OnAttemptsExceeded
    assert loaded.at_most_once is True


def test_batches_land_and_updates_keep_the_bytes(store: SqliteStore) -> None:
    records = [make_record(f"a-{i}") for i in range(5)]
    store.apply(new_records_flush(1, records))

    claimed = dataclasses.replace(
        records[0], status=Status.PROCESSING, processing_attempts=1, processing_deadline=2000.0
    )
    store.apply(
        Flush(2, upserts=(claimed.row(),), deletes=(records[1].id,), new_blobs=(), offsets=())
    )

    assert by_id(store.load()) == by_id([claimed, *records[2:]])


def test_deletes_apply_before_upserts_in_one_batch(store: SqliteStore) -> None:
    first = make_record("a-1", activation=b"first")
    store.apply(new_records_flush(1, [first]))

    again = make_record("a-1", activation=b"second", added_at=2000.0)
    store.apply(
        Flush(
            2,
            upserts=(again.row(),),
            deletes=(again.id,),
            new_blobs=((again.id, again.activation),),
            offsets=(),
        )
    )

    assert store.load() == [again]


def test_load_orders_by_status_then_age(store: SqliteStore) -> None:
    records = [
        make_record("late-pending", added_at=30.0),
        make_record("processing", status=Status.PROCESSING, added_at=10.0),
        make_record("early-pending", added_at=20.0),
    ]
    store.apply(new_records_flush(1, records))

    assert [record.id for record in store.load()] == ["early-pending", "late-pending", "processing"]


def test_counts_by_status_names_every_status(store: SqliteStore) -> None:
    store.apply(
        new_records_flush(
            1,
            [
                make_record("a"),
                make_record("b"),
                make_record("c", status=Status.DELAY),
            ],
        )
    )

    assert store.counts_by_status() == {
        Status.PENDING: 2,
        Status.PROCESSING: 0,
        Status.FAILURE: 0,
        Status.RETRY: 0,
        Status.COMPLETE: 0,
        Status.DELAY: 1,
        Status.CLAIMED: 0,
        Status.DEMOTED: 0,
    }


def test_a_full_disk_stores_nothing_of_the_batch_until_there_is_room(store: SqliteStore) -> None:
    stored = [make_record(f"old-{i}") for i in range(10)]
    store.apply(new_records_flush(1, stored))
    incoming = [make_record(f"new-{i}", activation=os.urandom(300)) for i in range(2_000)]
    batch = dataclasses.replace(new_records_flush(2, incoming), deletes=(stored[0].id,))
    # The file may not grow by a single page: the batch needs hundreds.
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")

    with pytest.raises(StoreUnavailable, match="full"):
        store.apply(batch)
    assert by_id(store.load()) == by_id(stored)

    store._conn.execute("PRAGMA max_page_count = 1073741823")
    store.apply(batch)
    assert by_id(store.load()) == by_id([*stored[1:], *incoming])


def test_a_locked_store_fails_the_batch_until_the_lock_is_released(db_path: Path) -> None:
    store = SqliteStore(db_path, busy_timeout_ms=50)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        record = make_record("a-1")
        other.execute("BEGIN IMMEDIATE")

        with pytest.raises(StoreUnavailable, match="locked"):
            store.apply(new_records_flush(1, [record]))
        assert store.load() == []

        other.execute("ROLLBACK")
        store.apply(new_records_flush(1, [record]))
        assert store.load() == [record]
    finally:
        other.close()
        store.close()


def test_a_batch_that_breaks_the_schema_is_not_worth_a_retry(store: SqliteStore) -> None:
    good = make_record("good")
    broken = make_record("broken", application=None)  # NOT NULL in the schema

    with pytest.raises(StoreError, match="NOT NULL"):
        store.apply(new_records_flush(1, [good, broken]))
    assert store.load() == []


def test_a_restart_restores_exactly_the_committed_state(db_path: Path) -> None:
    store = SqliteStore(db_path)
    records = [make_record(f"a-{i}", added_at=float(i)) for i in range(50)]
    store.apply(new_records_flush(1, records))
    done = dataclasses.replace(records[10], status=Status.COMPLETE)
    store.apply(Flush(2, upserts=(done.row(),), deletes=(records[0].id,), new_blobs=(), offsets=()))
    store.close()

    reopened = SqliteStore(db_path)
    try:
        assert by_id(reopened.load()) == by_id([*records[1:10], done, *records[11:]])
    finally:
        reopened.close()


def test_a_file_of_random_bytes_is_refused_naming_the_path(db_path: Path) -> None:
    db_path.write_bytes(random.Random(1).randbytes(64 * 1024))

    with pytest.raises(StoreError, match=str(db_path)):
        SqliteStore(db_path)


def test_a_truncated_database_is_refused_naming_the_path(db_path: Path) -> None:
    store = SqliteStore(db_path)
    store.apply(new_records_flush(1, (make_record(f"a-{i}") for i in range(3_000))))
    store.close()
    with db_path.open("r+b") as file:
        file.truncate(db_path.stat().st_size // 2)

    with pytest.raises(StoreError, match=str(db_path)):
        SqliteStore(db_path)


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(StoreError, match=rf"{db_path}.*newer"):
        SqliteStore(db_path)


def test_another_applications_database_is_refused(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.close()

    with pytest.raises(StoreError, match=str(db_path)):
        SqliteStore(db_path)


def test_metadata_without_its_bytes_is_corruption_naming_the_id(
    store: SqliteStore, db_path: Path
) -> None:
    store.apply(new_records_flush(1, [make_record("a-1"), make_record("a-2")]))
    other = sqlite3.connect(db_path)
    with other:
        other.execute("DELETE FROM activation_blobs WHERE id = 'a-2'")
    other.close()

    with pytest.raises(StoreError, match="'a-2'"):
        store.load()


def test_maintenance_gives_deleted_pages_back(store: SqliteStore) -> None:
    records = [make_record(f"a-{i}", activation=os.urandom(1_000)) for i in range(2_000)]
    store.apply(new_records_flush(1, records))
    full = store.maintenance(full_vacuum=False)
    store.apply(
        Flush(2, upserts=(), deletes=tuple(r.id for r in records), new_blobs=(), offsets=())
    )

    after = store.maintenance(full_vacuum=False)
    vacuumed = store.maintenance(full_vacuum=True)

    assert full.db_bytes > 2_000_000
    assert after.db_bytes < full.db_bytes / 4
    assert vacuumed.db_bytes <= after.db_bytes
    assert store.sizes() == vacuumed


def test_the_debug_commit_delay_holds_each_commit(db_path: Path) -> None:
    store = SqliteStore(db_path, debug_commit_delay_ms=200)
    try:
        started = time.monotonic()
        store.apply(new_records_flush(1, [make_record("a-1")]))
        assert time.monotonic() - started >= 0.2
    finally:
        store.close()


# --- A writer process killed at random moments --------------------------------------------


def _run_until_killed(db_path: Path, first_seq: int, kill_after_s: float) -> list[int]:
    """Start the child writer, SIGKILL it `kill_after_s` after it opened the store, and
    return the seqs it reported committed."""
    command = [sys.executable, writer_crash_child.__file__, str(db_path), str(first_seq)]
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        stdout = child.stdout
        reader = threading.Thread(target=lambda: lines.extend(line.strip() for line in stdout))
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while not lines and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert lines[:1] == ["ready"], f"the child did not start: {lines}"
            time.sleep(kill_after_s)
        finally:
            child.kill()
            child.wait(timeout=10)
            reader.join(timeout=10)
        assert child.returncode == -signal.SIGKILL, "the stream ended before the kill"
    return [int(line) for line in lines[1:]]


def test_a_killed_writer_leaves_exactly_a_prefix_of_its_batches(db_path: Path) -> None:
    """Each round a child applies the deterministic stream from where the file stands and
    is SIGKILLed at a random moment; the file must then hold the state after the last
    batch it reported, or after the next one (killed between commit and print)."""
    rng = random.Random(20240611)
    applied = 0  # batches in the file
    for _ in range(5):
        reported = _run_until_killed(db_path, applied + 1, rng.uniform(0.05, 0.4))
        assert reported == list(range(applied + 1, applied + 1 + len(reported)))
        last_reported = reported[-1] if reported else applied

        store = SqliteStore(db_path)
        try:
            loaded = by_id(store.load())
        finally:
            store.close()
        if loaded == writer_crash_child.expected_state(last_reported):
            applied = last_reported
        else:
            assert loaded == writer_crash_child.expected_state(last_reported + 1)
            applied = last_reported + 1
    assert applied >= 5
