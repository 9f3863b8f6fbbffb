"""The SQLite store behind the writer actor: schema, migrations, batched flushes, restore.

A plain class with no threads: the `SqliteWriter` actor is its only caller, and tests call
it directly. Every sqlite3 error is translated here, at this one boundary, into
`StoreError` (the file cannot be used) or `StoreUnavailable` (a write failed for now).

Two tables: `activation_blobs` holds the activation bytes, written once and deleted once,
so large payloads are never rewritten; `activations` holds every other field of a record,
the small rows that change with each transition.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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

logger = logging.getLogger(__name__)

# Each step takes the schema from version N to N + 1 (its index + 1), in one transaction
# with the `PRAGMA user_version` bump. Steps are append-only: a released step never changes.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE activation_blobs (
            id TEXT PRIMARY KEY NOT NULL,
            activation BLOB NOT NULL
        )
        """,
        # WITHOUT ROWID: the id is the only key, so the row lives in the primary-key
        # b-tree itself instead of a rowid table plus a separate id index.
        """
        CREATE TABLE activations (
            id TEXT PRIMARY KEY NOT NULL,
            application TEXT NOT NULL,
            namespace TEXT NOT NULL,
            taskname TEXT NOT NULL,
            status INTEGER NOT NULL,
            received_at REAL NOT NULL,
            added_at REAL NOT NULL,
            kafka_partition INTEGER NOT NULL,
            kafka_offset INTEGER NOT NULL,
            processing_deadline_duration_s INTEGER NOT NULL,
            processing_deadline REAL,
            processing_attempts INTEGER NOT NULL,
            at_most_once INTEGER NOT NULL,
            on_attempts_exceeded INTEGER NOT NULL,
            expires_at REAL,
            delay_until REAL,
            attempts INTEGER NOT NULL,
            max_attempts INTEGER NOT NULL,
            delay_on_retry_s INTEGER
        ) WITHOUT ROWID
        """,
        # Serves the restore order and the per-status counts (a covering scan on status).
        "CREATE INDEX activations_status_added_at ON activations (status, added_at)",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)

_METADATA_COLUMNS = (
    "id",
    "application",
    "namespace",
    "taskname",
    "status",
    "received_at",
    "added_at",
    "kafka_partition",
    "kafka_offset",
    "processing_deadline_duration_s",
    "processing_deadline",
    "processing_attempts",
    "at_most_once",
    "on_attempts_exceeded",
    "expires_at",
    "delay_until",
    "attempts",
    "max_attempts",
    "delay_on_retry_s",
)

# The statements are module constants so that sqlite3's statement cache (keyed by the SQL
# text) prepares each one once per connection and every flush reuses it.
_UPSERT_METADATA = (
    f"INSERT INTO activations ({', '.join(_METADATA_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _METADATA_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _METADATA_COLUMNS[1:])
)
# Bytes are written once; a conflict only happens when the same activation is sent again
# (a redelivery), and then the newest bytes win rather than failing the whole batch.
_INSERT_BLOB = (
    "INSERT INTO activation_blobs (id, activation) VALUES (?, ?) "
    "ON CONFLICT (id) DO UPDATE SET activation = excluded.activation"
)
_DELETE_METADATA = "DELETE FROM activations WHERE id = ?"
_DELETE_BLOB = "DELETE FROM activation_blobs WHERE id = ?"
_LOAD_METADATA = f"SELECT {', '.join(_METADATA_COLUMNS)} FROM activations ORDER BY status, added_at"
_LOAD_BLOBS = "SELECT id, activation FROM activation_blobs"

# Result codes (primary, the low byte of the extended code) that no retry can fix: the
# file is damaged or the batch itself is invalid. Everything else (full, I/O, busy,
# locked, out of memory, read-only) may pass, so the flush is worth sending again.
_UNRECOVERABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_CONSTRAINT,
        sqlite3.SQLITE_MISMATCH,
    }
)

_STATUSES = {status.value: status for status in Status}
_ON_ATTEMPTS_EXCEEDED = {value.value: value for value in OnAttemptsExceeded}


@dataclass(frozen=True, slots=True)
class StoreSizes:
    """Bytes on disk: the database file and its write-ahead log."""

    db_bytes: int
    wal_bytes: int


class DatabaseLock:
    """One broker per database file: an exclusive lock on `<db>.lock`, held from open to close.

    Two brokers on one file would both restore its rows and hand out the same tasks. The
    lock is `flock` because the kernel drops it with the process's last descriptor of the
    file, so a broker killed with SIGKILL leaves nothing behind and its restart takes the
    lock at once; and it is `LOCK_NB` so a second broker fails at startup instead of
    waiting. It is on a file of its own because the database's POSIX locks belong to
    SQLite, and a close() of any descriptor of that file by this process (a second
    connection, a test reading the file) silently drops every POSIX lock the process holds
    on it.

    The file holds the holder's pid while it is held, written after the lock is taken, so
    a refusal can name the process. The file itself is never deleted: were it unlinked on
    exit, a broker that had just opened it could lock the unlinked inode while a third
    broker creates and locks a new file of the same name, and both would run.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}.lock")
        try:
            # Python descriptors are not inherited, so a child process (the embedded Kafka)
            # never keeps the lock alive after the broker dies.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file of SQLite store {db_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StoreError(
                f"SQLite store {db_path} is in use by another broker (pid {holder}); "
                "one broker per database file"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock SQLite store {db_path} ({self.path}): {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot write the lock file {self.path}: {exc}") from exc
        self._fd: int | None = fd

    def __repr__(self) -> str:
        return f"DatabaseLock({str(self.path)!r}, held={self._fd is not None})"

    def release(self) -> None:
        """Give the lock up; a second call does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Emptied first, so a pid in the file names the holder, or one that was killed.
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def _read_pid(fd: int) -> str:
    # Empty between the holder's flock and its write, or after its clean release.
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text or "unknown"


class SqliteStore:
    """One read-write connection to the broker's SQLite file.

    Opening takes the file's `DatabaseLock` first, so a second store on the same file, in
    this process or another, is refused with the holder's pid; `close` gives it back.
    Opening validates and migrates the file, so a bad file fails in the constructor.
    Not thread-safe: one thread at a time (the connection may be opened in one thread and
    then used only by another, which is how the writer actor uses it).
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 5_000,
        debug_commit_delay_ms: int = 0,
    ) -> None:
        self._path = path
        self._debug_commit_delay_s = debug_commit_delay_ms / 1000
        # Rows bind their enums and bools as they are. Without an adapter sqlite3 looks for
        # __conform__ on every such value, which doubled the cost of binding a row.
        for int_like in (Status, OnAttemptsExceeded, bool):
            sqlite3.register_adapter(int_like, int)
        # Before the first connection: a second broker must not migrate or checkpoint the file.
        self._db_lock = DatabaseLock(path)
        try:
            self._connect_and_open(path, busy_timeout_ms)
        except BaseException:
            self._db_lock.release()
            raise

    def _connect_and_open(self, path: Path, busy_timeout_ms: int) -> None:
        try:
            # isolation_level=None: the module opens no implicit transactions; apply()
            # brackets each batch itself. check_same_thread=False: see the class docstring.
            self._conn = sqlite3.connect(
                path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from exc
        try:
            self._open()
        except StoreError:
            self._conn.close()
            raise
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot use SQLite store {path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    @property
    def path(self) -> Path:
        return self._path

    def _open(self) -> None:
        version = self._scalar("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite store {self._path} has schema version {version}, newer than "
                f"this broker's {SCHEMA_VERSION}"
            )
        if version == 0:
            if self._scalar("SELECT count(*) FROM sqlite_schema") != 0:
                raise StoreError(
                    f"SQLite store {self._path} holds tables but no schema version: "
                    "not a task broker store"
                )
            # Only takes effect before the first table exists; later it is a no-op.
            self._conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        journal_mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if journal_mode != "wal":
            raise StoreError(
                f"SQLite store {self._path} cannot use WAL mode (got {journal_mode!r})"
            )
        # In WAL mode NORMAL fsyncs only at checkpoints: a killed process loses no
        # committed transaction, but a power loss or kernel crash can roll back the last
        # commits, whose offsets may already be committed to Kafka. That is the price
        # of a commit that does not wait for the disk; FULL would close the gap.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        for step_version in range(version + 1, SCHEMA_VERSION + 1):
            self._migrate(step_version)
        # A truncated or damaged file can open and migrate fine and fail only on the
        # pages it lost; checking the b-trees now turns that into a refusal to start.
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(f"SQLite store {self._path} is corrupt: {'; '.join(problems[:5])}")

    def _migrate(self, to_version: int) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[to_version - 1]:
                self._conn.execute(statement)
            # PRAGMA arguments cannot be bound; the value is our own integer.
            self._conn.execute(f"PRAGMA user_version = {to_version:d}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        logger.info("SQLite store %s migrated to schema version %d", self._path, to_version)

    def _scalar(self, sql: str) -> int:
        row = self._conn.execute(sql).fetchone()
        return int(row[0])

    def _rollback(self) -> None:
        # SQLite already rolled back by itself after some errors (full disk, I/O).
        if not self._conn.in_transaction:
            return
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("rollback failed on SQLite store %s", self._path)

    def _translate(self, exc: sqlite3.Error, doing: str) -> StoreError | StoreUnavailable:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _UNRECOVERABLE_CODES:
            return StoreError(f"{doing} on SQLite store {self._path}: {exc}")
        return StoreUnavailable(f"{doing} on SQLite store {self._path}: {exc}")

    def apply(self, flush: Flush) -> None:
        """Commit one batch in one transaction: deletes, then upserts, then new bytes.

        Raises StoreUnavailable (nothing of the batch is stored) when the write failed
        for now; StoreError when no retry can help: the file is damaged, or the batch
        breaks the schema.
        """
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._write(flush)
                if self._debug_commit_delay_s > 0:
                    time.sleep(self._debug_commit_delay_s)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise self._translate(exc, f"flush {flush.seq}") from exc

    def _write(self, flush: Flush) -> None:
        if flush.deletes:
            deleted = [(activation_id,) for activation_id in flush.deletes]
            self._conn.executemany(_DELETE_METADATA, deleted)
            self._conn.executemany(_DELETE_BLOB, deleted)
        if flush.upserts:
            # A RecordRow is in column order; enums and bools bind as the ints they are.
            self._conn.executemany(_UPSERT_METADATA, flush.upserts)
        if flush.new_blobs:
            self._conn.executemany(_INSERT_BLOB, flush.new_blobs)

    def load(self) -> list[Record]:
        """Every stored record with its bytes, by status then age.

        Raises StoreError when a record has no bytes (the file lost a row it promised).
        """
        try:
            # One read transaction, so both scans see the same commit. Two sequential
            # scans matched in a dict beat a join, which searches the blob index per row.
            self._conn.execute("BEGIN")
            try:
                blobs: dict[str, bytes] = dict(self._conn.execute(_LOAD_BLOBS).fetchall())
                rows = self._conn.execute(_LOAD_METADATA).fetchall()
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"load from SQLite store {self._path}: {exc}") from exc
        records = []
        for row in rows:
            activation = blobs.get(row[0])
            if activation is None:
                raise StoreError(
                    f"SQLite store {self._path} is corrupt: activation {row[0]!r} has "
                    "metadata but no bytes"
                )
            # Positional, in the order of Record's fields: a keyword call per row is
            # measurably slower over a 100,000-record restore.
            records.append(
                Record(
                    ActivationId(row[0]),
                    row[1],  # application
                    row[2],  # namespace
                    row[3],  # taskname
                    _STATUSES[row[4]],
                    row[5],  # received_at
                    row[6],  # added_at
                    Partition(row[7]),
                    Offset(row[8]),
                    activation,
                    row[9],  # processing_deadline_duration_s
                    row[10],  # processing_deadline
                    row[11],  # processing_attempts
                    bool(row[12]),  # at_most_once
                    _ON_ATTEMPTS_EXCEEDED[row[13]],
                    row[14],  # expires_at
                    row[15],  # delay_until
                    row[16],  # attempts
                    row[17],  # max_attempts
                    row[18],  # delay_on_retry_s
                )
            )
        return records

    def counts_by_status(self) -> dict[Status, int]:
        """Stored records per status; every status is present, zero when none."""
        counts = dict.fromkeys(Status, 0)
        try:
            rows = self._conn.execute(
                "SELECT status, count(*) FROM activations GROUP BY status"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._translate(exc, "count by status") from exc
        for status, count in rows:
            counts[_STATUSES[status]] = count
        return counts

    def maintenance(self, full_vacuum: bool) -> StoreSizes:
        """Give free pages back to the file system and checkpoint the WAL.

        The checkpoint is PASSIVE: it never waits for readers. A full VACUUM rewrites the
        whole file and holds the write lock meanwhile, so it is for quiet times only.
        """
        try:
            # The pragma frees one page per step and its steps yield zero-column rows,
            # which execute() takes for "done" after the first; executescript() steps a
            # statement to its end.
            self._conn.executescript("PRAGMA incremental_vacuum;")
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if full_vacuum:
                self._conn.execute("VACUUM")
        except sqlite3.Error as exc:
            raise self._translate(exc, "maintenance") from exc
        return self.sizes()

    def maintenance_if_possible(self, full_vacuum: bool) -> StoreSizes:
        """`maintenance`, best effort: a busy or full store stays usable, the failure is
        logged, and the next pass tries again."""
        try:
            return self.maintenance(full_vacuum)
        except StoreUnavailable as error:
            logger.warning("SQLite maintenance skipped: %s", error)
            return self.sizes()

    def sizes(self) -> StoreSizes:
        return StoreSizes(
            db_bytes=_file_size(self._path),
            wal_bytes=_file_size(Path(f"{self._path}-wal")),
        )

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints and removes the WAL),
        then give the file's lock back."""
        try:
            self._conn.close()
        except sqlite3.Error as exc:
            raise self._translate(exc, "close") from exc
        finally:
            # After the close, so the final checkpoint still runs under the lock.
            self._db_lock.release()


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
