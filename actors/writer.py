"""SqliteWriter: the actor that owns the only read-write SQLite connection.

A thin shell around `SqliteStore`. It commits each `Flush` from the state actor in one
transaction and answers `FlushDone` or `FlushFailed`; only after a commit does it tell the
Kafka consumer which offsets are durable. It never decides a state transition and never
holds a batch: after a failure the state actor folds the changes into its next flush.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from actors.errors import ConfigError, StoreUnavailable
from actors.messages import (
    Flush,
    FlushDone,
    FlushFailed,
    LoadAndRestore,
    Maintain,
    Persisted,
    Recipient,
    Restore,
    StoreSizesQuery,
)
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver, tell_if_alive
from actors.store import SqliteStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriterConfig:
    """The SQLite writer's settings.

    `full_vacuum` is what the periodic `Maintain` asks for; whoever sends it (the
    supervisor's ticker) reads it from here.
    """

    db_path: Path
    busy_timeout_ms: int = 5_000
    debug_commit_delay_ms: int = 0
    retry_backoff_min_ms: int = 50
    retry_backoff_max_ms: int = 2_000
    full_vacuum: bool = False

    def __post_init__(self) -> None:
        for key in ("busy_timeout_ms", "debug_commit_delay_ms"):
            if getattr(self, key) < 0:
                raise ConfigError(f"writer.{key} must be >= 0, got {getattr(self, key)}")
        if self.retry_backoff_min_ms < 1:
            raise ConfigError(
                f"writer.retry_backoff_min_ms must be >= 1, got {self.retry_backoff_min_ms}"
            )
        if self.retry_backoff_max_ms < self.retry_backoff_min_ms:
            raise ConfigError(
                f"writer.retry_backoff_max_ms ({self.retry_backoff_max_ms}) must be >= "
                f"retry_backoff_min_ms ({self.retry_backoff_min_ms})"
            )

    def retry_backoff_s(self, failures: int) -> float:
        """How long to wait after the `failures`-th consecutive failed flush (1-based)."""
        # The exponent is capped so a long outage never builds a huge integer.
        backoff_ms = self.retry_backoff_min_ms << min(failures - 1, 32)
        return min(backoff_ms, self.retry_backoff_max_ms) / 1000


class WriterObserver(Protocol):
    """Receives the writer's flush measurements, on the writer's thread."""

    def flushed(self, seconds: float, rows: int, bytes_written: int) -> None:
        """One flush committed: how long the transaction took, its row changes, and the
        activation bytes it wrote."""

    def flush_failed(self) -> None:
        """One flush was not committed (it is retried after a backoff)."""


class _SilentWriterObserver:
    def flushed(self, seconds: float, rows: int, bytes_written: int) -> None:
        pass

    def flush_failed(self) -> None:
        pass


@dataclass(slots=True)
class _Tally:
    """The flushes committed since the writer started, for the line it logs as it closes:
    after a shutdown's final flush, the operator's evidence that nothing was left behind."""

    flushes: int = 0
    stored: int = 0
    removed: int = 0
    last_seq: int | None = None
    last_stored: int = 0
    last_removed: int = 0

    def add(self, flush: Flush) -> None:
        self.flushes += 1
        self.last_seq = flush.seq
        self.last_stored, self.last_removed = len(flush.upserts), len(flush.deletes)
        self.stored += self.last_stored
        self.removed += self.last_removed

    def __str__(self) -> str:
        if self.last_seq is None:
            return "no flush since it started"
        return (
            f"the last flush (#{self.last_seq}) committed {self.last_stored} records stored "
            f"and {self.last_removed} removed ({self.flushes} flushes since it started: "
            f"{self.stored} stored, {self.removed} removed)"
        )


class SqliteWriter(BrokerActor):
    """Commits the state actor's flushes; restores the state at startup.

    Messages: `Flush` (tell), `LoadAndRestore` (ask → number of records), `Maintain`
    (ask → `StoreSizes`), `StoreSizesQuery` (ask → `StoreSizes`).
    """

    def __init__(
        self,
        config: WriterConfig,
        state: Recipient,
        *,
        mailbox: MailboxConfig,
        persisted_listener: Recipient | None = None,
        observer: MailboxObserver | None = None,
        flush_observer: WriterObserver | None = None,
        name: str = "sqlite-writer",
    ) -> None:
        super().__init__(name, mailbox, observer)
        self._flush_observer: WriterObserver = flush_observer or _SilentWriterObserver()
        # Opened here, in the caller's thread, so a corrupt or unreadable file, or one that
        # another broker holds, fails `SqliteWriter.start()` itself instead of killing the
        # actor later.
        self._store = SqliteStore(
            config.db_path,
            busy_timeout_ms=config.busy_timeout_ms,
            debug_commit_delay_ms=config.debug_commit_delay_ms,
        )
        self._config = config
        self._state = state
        self._persisted_listener = persisted_listener
        self._failures = 0  # consecutive failed flushes; 0 while the store accepts writes
        self._committed = _Tally()
        self._failure_report: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"<SqliteWriter {self.name} {self._store.path}>"

    def handle(self, message: object) -> object:
        match message:
            case Flush():
                self._flush(message)
            case LoadAndRestore():
                records = self._store.load()
                self._state.tell(Restore(tuple(records)))
                return len(records)
            case Maintain(full_vacuum):
                return self._store.maintenance_if_possible(full_vacuum)
            case StoreSizesQuery():
                return self._store.sizes()
            case _:
                raise TypeError(f"SQLite writer got an unknown message: {message!r}")
        return None

    def _flush(self, flush: Flush) -> None:
        started = time.monotonic()
        try:
            self._store.apply(flush)
        except StoreUnavailable as error:
            self._flush_observer.flush_failed()
            self._failed(flush.seq, error)
            return
        self._committed.add(flush)
        self._flush_observer.flushed(
            time.monotonic() - started,
            flush.row_changes,
            sum(len(activation) for _, activation in flush.new_blobs),
        )
        if self._failures:
            logger.info(
                "SQLite store %s accepts writes again after %d failed flushes",
                self._store.path,
                self._failures,
            )
            self._failures = 0
        # The consumer hears first: once the state has its FlushDone, a shutdown may stop the
        # consumer, and by then the Persisted must already be in the consumer's mailbox.
        if flush.offsets and self._persisted_listener is not None:
            tell_if_alive(self._persisted_listener, Persisted(flush.offsets))
        tell_if_alive(self._state, FlushDone(flush.seq))

    def _failed(self, seq: int, error: StoreUnavailable) -> None:
        self._failures += 1
        backoff_s = self._config.retry_backoff_s(self._failures)
        if self._failures == 1:
            logger.warning(
                "flush %d failed; flushes are retried with backoff until the store "
                "accepts writes again: %s",
                seq,
                error,
            )
        else:
            logger.debug("flush %d failed (%d in a row): %s", seq, self._failures, error)
        # The state sends the next batch as soon as it hears of the failure, so the
        # backoff delays the answer. A timer delays it without holding this thread:
        # a stop or a sizes query during an outage is served at once, not after the
        # backoff. Only one flush is outstanding, so at most one timer is pending.
        report = threading.Timer(
            backoff_s, tell_if_alive, (self._state, FlushFailed(seq, str(error)))
        )
        report.name = f"{self.name}-flush-{seq}-failed"
        report.daemon = True
        self._failure_report = report
        report.start()

    def release(self) -> None:
        if self._failure_report is not None:
            self._failure_report.cancel()
        self._store.close()
        logger.info("SQLite writer closed %s: %s", self._store.path, self._committed)
