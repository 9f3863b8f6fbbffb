"""The comparison design (`store_mode = "sqlite-direct"`): every claim and every result is a
SQLite transaction on the request path.

This is the classic broker this project exists to beat, built to be a fair opponent: the
same schema, WAL and pragmas as the writer's store (`DirectStore` extends `SqliteStore`);
one write connection guarded by one lock; a claim is one `UPDATE … RETURNING` over the
(status, added_at) index, oldest first; a result and the claim of the next task share one
transaction; a batch of results is one transaction. The front end's threads run the SQL
themselves through `SqliteDirectStateClient`, with no actor hop. Ingest, ticks and produced
confirmations go through `SqliteDirectState`, an actor that writes to the same store under
the same lock and tells the consumer `Persisted` as soon as an ingest commits.

Semantics are WIRE.md's and the in-memory `StateMachine`'s, with one difference in timing:
a delayed task becomes pending at the next tick, not at the first claim after it is due.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from actors.errors import ActorUnavailable, StoreUnavailable
from actors.messages import (
    Claim,
    Conclude,
    ConcludeOutcome,
    ConcludeResult,
    Connect,
    Drain,
    Flush,
    Ingest,
    IngestBackpressure,
    Maintain,
    Persisted,
    Produced,
    ProduceKind,
    ProduceOrder,
    Recipient,
    StateStats,
    Stats,
    StoreSizesQuery,
    Tick,
    TickResult,
)
from actors.records import ActivationId, OnAttemptsExceeded, Partition, Record, Status
from actors.runtime import BrokerActor, MailboxConfig, MailboxObserver, Ticker, tell_if_alive
from actors.statemachine import IngestResult, Limits, admit
from actors.store import SqliteStore, StoreSizes

logger = logging.getLogger(__name__)

_PENDING, _PROCESSING, _FAILURE, _RETRY, _DELAY = (
    int(Status.PENDING),
    int(Status.PROCESSING),
    int(Status.FAILURE),
    int(Status.RETRY),
    int(Status.DELAY),
)


def _claim_sql(application: bool, namespace: bool) -> str:
    filters = "".join(
        clause
        for clause, wanted in (
            (" AND application = ?", application),
            (" AND namespace = ?", namespace),
        )
        if wanted
    )
    # The subquery walks the (status, added_at) index from the oldest pending row; the
    # blob comes back in the same statement through a correlated subquery in RETURNING.
    return (
        f"UPDATE activations SET status = {_PROCESSING}, "
        "processing_deadline = ? + processing_deadline_duration_s "
        "WHERE id = (SELECT id FROM activations "
        f"WHERE status = {_PENDING} AND (expires_at IS NULL OR expires_at > ?){filters} "
        "ORDER BY added_at LIMIT 1) "
        "RETURNING (SELECT activation FROM activation_blobs "
        "WHERE activation_blobs.id = activations.id)"
    )


# By (application given, namespace given); module constants so each is prepared once.
_CLAIMS = {(a, n): _claim_sql(a, n) for a in (False, True) for n in (False, True)}

_SELECT_FOR_CONCLUDE = (
    "SELECT status, attempts, max_attempts, on_attempts_exceeded FROM activations WHERE id = ?"
)
_SET_STATUS = "UPDATE activations SET status = ? WHERE id = ?"
_SET_RETRY_STATE = (
    "UPDATE activations SET max_attempts = ?, "
    "delay_on_retry_s = coalesce(?, delay_on_retry_s) WHERE id = ?"
)
_DELETE_ROW = "DELETE FROM activations WHERE id = ?"
_DELETE_BLOB = "DELETE FROM activation_blobs WHERE id = ?"
_SELECT_EXISTING = "SELECT id FROM activations WHERE id IN ({})"
_PROMOTE_DELAYS = (
    f"UPDATE activations SET status = {_PENDING} WHERE status = {_DELAY} AND delay_until <= ?"
)
_EXPIRE = f"DELETE FROM activations WHERE status = {_PENDING} AND expires_at <= ? RETURNING id"
_PAST_DEADLINE = (
    "SELECT id, processing_attempts, at_most_once, on_attempts_exceeded FROM activations "
    f"WHERE status = {_PROCESSING} AND processing_deadline <= ?"
)
_RESET_TO_PENDING = (
    f"UPDATE activations SET status = {_PENDING}, processing_deadline = NULL, "
    "processing_attempts = processing_attempts + 1 WHERE id = ?"
)
_DEADLINE_TO_FAILURE = (
    f"UPDATE activations SET status = {_FAILURE}, processing_deadline = NULL, "
    "processing_attempts = processing_attempts + 1 WHERE id = ?"
)
_PRODUCE_ORDERS = (
    "SELECT a.id, a.status, b.activation, a.max_attempts, a.delay_on_retry_s "
    "FROM activations AS a JOIN activation_blobs AS b ON b.id = a.id "
    f"WHERE a.status IN ({_RETRY}, {_FAILURE}) ORDER BY a.status DESC, a.added_at"
)
_DELETE_PRODUCED = (
    f"DELETE FROM activations WHERE id = ? AND status IN ({_RETRY}, {_FAILURE}) RETURNING id"
)
_COUNT_STATUS = "SELECT count(*) FROM activations WHERE status = ?"
_COUNT_GROUPS = (
    "SELECT application, namespace, status, count(*) FROM activations "
    "GROUP BY application, namespace, status"
)
_COUNT_PARTITIONS = "SELECT kafka_partition, count(*) FROM activations GROUP BY kafka_partition"
_OLDEST_PENDING = f"SELECT min(added_at) FROM activations WHERE status = {_PENDING}"

# SQLite's default cap on bound parameters is far above this; one chunk per ingest batch.
_IN_CHUNK = 500
_RESULTS = frozenset({Status.COMPLETE, Status.RETRY, Status.FAILURE})


class DirectStore(SqliteStore):
    """The broker's SQLite store used as the state itself: thread-safe, one lock around the
    one connection, every transition one transaction that takes `now` as an argument."""

    def __init__(
        self,
        path: Path,
        limits: Limits,
        *,
        lock_timeout_s: float = 5.0,
        busy_timeout_ms: int = 5_000,
        debug_commit_delay_ms: int = 0,
    ) -> None:
        super().__init__(
            path, busy_timeout_ms=busy_timeout_ms, debug_commit_delay_ms=debug_commit_delay_ms
        )
        self.limits = limits
        self._lock = threading.Lock()
        self._lock_timeout_s = lock_timeout_s
        self._claims: Counter[str] = Counter()
        self._conclusions: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"DirectStore({str(self.path)!r})"

    # --- the request path -------------------------------------------------------------

    def claim(self, now: float, application: str | None, namespace: str | None) -> bytes | None:
        """Mark the oldest pending activation within the filter processing; its bytes."""
        with self._transaction("claim"):
            return self._claim(now, application, namespace)

    def conclude(self, now: float, conclude: Conclude) -> ConcludeResult:
        """Apply one worker result and, when asked, claim the next task: one transaction."""
        with self._transaction("conclude"):
            outcome = self._conclude(conclude)
            next_task = None
            if conclude.fetch_next is not None:
                fetch = conclude.fetch_next
                next_task = self._claim(now, fetch.application, fetch.namespace)
        return ConcludeResult(outcome, next_task)

    def conclude_all(self, conclusions: Sequence[Conclude]) -> tuple[ConcludeResult, ...]:
        """A batch of results in one transaction; fetch_next is not honoured in a batch."""
        with self._transaction("conclude batch"):
            return tuple(ConcludeResult(self._conclude(c)) for c in conclusions)

    # --- ingest, ticks, produce confirmations (the actor's calls) ------------------------

    def ingest(self, records: Sequence[Record], now: float) -> IngestResult:
        """Store new activations; an id already stored, or twice in the batch, is a duplicate."""
        with self._transaction("ingest"):
            existing = self._existing_ids([r.id for r in records])
            accepted: dict[ActivationId, Record] = {}
            for record in records:
                if record.id in existing or record.id in accepted:
                    continue
                admit(record, now, self.limits)
                accepted[record.id] = record
            rows = tuple(accepted.values())
            # The store's own batch writer: the same statements the memory design flushes with.
            blobs = tuple((r.id, r.activation) for r in rows)
            self._write(Flush(0, tuple(r.row() for r in rows), (), blobs, ()))
        return IngestResult(accepted=len(accepted), duplicates=len(records) - len(accepted))

    def tick(self, now: float, *, deadline_resets: bool = True) -> TickResult:
        """Delays due → pending, expired pending dropped, past deadlines reset or failed,
        and the retries and dead letters still waiting for Kafka."""
        with self._transaction("tick"):
            conn = self._conn
            delays_due = conn.execute(_PROMOTE_DELAYS, (now,)).rowcount
            expired_ids = conn.execute(_EXPIRE, (now,)).fetchall()
            conn.executemany(_DELETE_BLOB, expired_ids)
            resets = failed = 0
            if deadline_resets:
                resets, failed = self._handle_deadlines(now)
            orders = tuple(
                ProduceOrder(
                    id=ActivationId(row[0]),
                    kind=ProduceKind.RETRY if row[1] == _RETRY else ProduceKind.DEADLETTER,
                    activation=row[2],
                    max_attempts=row[3],
                    delay_on_retry_s=row[4],
                )
                for row in conn.execute(_PRODUCE_ORDERS)
            )
        return TickResult(
            to_produce=orders,
            deadline_resets=resets,
            expired=len(expired_ids),
            delays_due=delays_due,
            failed_by_deadline=failed,
        )

    def produced(self, ids: Sequence[ActivationId]) -> int:
        """Kafka acknowledged these retries and dead letters: their rows go."""
        with self._transaction("produced"):
            finished = [
                row
                for activation_id in ids
                for row in self._conn.execute(_DELETE_PRODUCED, (activation_id,)).fetchall()
            ]
            self._conn.executemany(_DELETE_BLOB, finished)
        return len(finished)

    # --- counting --------------------------------------------------------------------------

    def count(self, status: Status) -> int:
        with self._locked("count"):
            return int(self._conn.execute(_COUNT_STATUS, (int(status),)).fetchone()[0])

    def ingest_should_pause(self) -> bool:
        limits = self.limits
        with self._locked("count"):
            return (
                self._count(Status.PENDING) >= limits.max_pending_count
                or self._count(Status.PROCESSING) >= limits.max_processing_count
                or self._count(Status.DELAY) >= limits.max_delay_count
            )

    def stats(self, ingest_paused: bool) -> StateStats:
        with self._locked("stats"):
            conn = self._conn
            groups = conn.execute(_COUNT_GROUPS).fetchall()
            partitions = conn.execute(_COUNT_PARTITIONS).fetchall()
            oldest = conn.execute(_OLDEST_PENDING).fetchone()[0]
            claims, conclusions = dict(self._claims), dict(self._conclusions)
        by_status: dict[Status, int] = {s: 0 for s in Status if s is not Status.COMPLETE}
        by_group: dict[tuple[str, str, Status], int] = {}
        for application, namespace, status, n in groups:
            by_status[Status(status)] += n
            by_group[(application, namespace, Status(status))] = n
        return StateStats(
            by_status=by_status,
            by_group=by_group,
            by_partition={Partition(p): n for p, n in partitions},
            dirty=0,
            flush_outstanding=False,
            ingest_paused=ingest_paused,
            oldest_pending_added_at=oldest,
            claims=claims,
            conclusions=conclusions,
        )

    def counts_by_status(self) -> dict[Status, int]:
        with self._locked("count by status"):
            return super().counts_by_status()

    def maintenance(self, full_vacuum: bool) -> StoreSizes:
        with self._locked("maintenance"):
            return super().maintenance(full_vacuum)

    def close(self) -> None:
        with self._locked("close"):
            super().close()

    # --- internals -----------------------------------------------------------------------

    @contextmanager
    def _locked(self, doing: str) -> Iterator[None]:
        # The wait is bounded like an ask of the state actor in the memory design: a
        # handler gives up after the same timeout, and the worker sees UNAVAILABLE.
        if not self._lock.acquire(timeout=self._lock_timeout_s):
            raise StoreUnavailable(
                f"{doing}: the SQLite write lock was not free within "
                f"{self._lock_timeout_s * 1000:.0f} ms"
            )
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _transaction(self, doing: str) -> Iterator[None]:
        with self._locked(doing):
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    if self._debug_commit_delay_s > 0:
                        time.sleep(self._debug_commit_delay_s)
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise self._translate(exc, doing) from exc

    def _count(self, status: Status) -> int:
        return int(self._conn.execute(_COUNT_STATUS, (int(status),)).fetchone()[0])

    def _claim(self, now: float, application: str | None, namespace: str | None) -> bytes | None:
        params: list[object] = [now + self.limits.processing_deadline_grace_s, now]
        if application is not None:
            params.append(application)
        if namespace is not None:
            params.append(namespace)
        sql = _CLAIMS[(application is not None, namespace is not None)]
        row = self._conn.execute(sql, params).fetchone()
        self._claims["hit" if row is not None else "miss"] += 1
        return None if row is None else bytes(row[0])

    def _conclude(self, conclude: Conclude) -> ConcludeOutcome:
        if conclude.status not in _RESULTS:
            raise ValueError(f"a result is COMPLETE, RETRY or FAILURE, not {conclude.status!r}")
        conn, activation_id = self._conn, conclude.id
        row = conn.execute(_SELECT_FOR_CONCLUDE, (activation_id,)).fetchone()
        if row is None or row[0] not in (_PENDING, _PROCESSING):
            outcome = ConcludeOutcome.UNKNOWN
        else:
            status, attempts, max_attempts, on_attempts_exceeded = row
            outcome = ConcludeOutcome.LATE if status == _PENDING else ConcludeOutcome.APPLIED
            if conclude.status is Status.COMPLETE:
                self._delete(activation_id)
            elif conclude.status is Status.FAILURE:
                self._fail(activation_id, on_attempts_exceeded)
            else:
                if conclude.max_attempts is not None:
                    max_attempts = conclude.max_attempts
                if conclude.max_attempts is not None or conclude.delay_on_retry_s is not None:
                    conn.execute(
                        _SET_RETRY_STATE, (max_attempts, conclude.delay_on_retry_s, activation_id)
                    )
                if attempts + 1 < max_attempts:
                    conn.execute(_SET_STATUS, (_RETRY, activation_id))
                else:
                    self._fail(activation_id, on_attempts_exceeded)
        self._conclusions[outcome.value] += 1
        return outcome

    def _fail(self, activation_id: str, on_attempts_exceeded: int) -> None:
        if on_attempts_exceeded == OnAttemptsExceeded.DEADLETTER:
            self._conn.execute(_SET_STATUS, (_FAILURE, activation_id))
        else:
            self._delete(activation_id)

    def _delete(self, activation_id: str) -> None:
        self._conn.execute(_DELETE_ROW, (activation_id,))
        self._conn.execute(_DELETE_BLOB, (activation_id,))

    def _handle_deadlines(self, now: float) -> tuple[int, int]:
        conn, limits = self._conn, self.limits
        resets: list[tuple[str]] = []
        failures: list[tuple[str]] = []
        discards: list[tuple[str]] = []
        for activation_id, attempts, at_most_once, on_exceeded in conn.execute(
            _PAST_DEADLINE, (now,)
        ).fetchall():
            if at_most_once or attempts + 1 >= limits.max_processing_attempts:
                deadletter = on_exceeded == OnAttemptsExceeded.DEADLETTER
                (failures if deadletter else discards).append((activation_id,))
            else:
                resets.append((activation_id,))
        conn.executemany(_RESET_TO_PENDING, resets)
        conn.executemany(_DEADLINE_TO_FAILURE, failures)
        conn.executemany(_DELETE_ROW, discards)
        conn.executemany(_DELETE_BLOB, discards)
        return len(resets), len(failures) + len(discards)

    def _existing_ids(self, ids: list[ActivationId]) -> set[str]:
        existing: set[str] = set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            sql = _SELECT_EXISTING.format(", ".join("?" * len(chunk)))
            existing.update(row[0] for row in self._conn.execute(sql, chunk))
        return existing


# --- The handlers' side ---------------------------------------------------------------------


class SqliteDirectStateClient:
    """The front end's `BlockingStateClient` in sqlite-direct mode: each call runs its
    transaction on one of the front end's state threads, with no actor hop."""

    def __init__(self, store: DirectStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def __repr__(self) -> str:
        return f"<SqliteDirectStateClient {self._store!r}>"

    def claim(self, claim: Claim) -> bytes | None:
        with _unavailable_to_callers():
            return self._store.claim(self._clock(), claim.application, claim.namespace)

    def conclude(self, conclude: Conclude) -> ConcludeResult:
        with _unavailable_to_callers():
            return self._store.conclude(self._clock(), conclude)

    def conclude_all(self, conclusions: tuple[Conclude, ...]) -> Sequence[ConcludeResult]:
        with _unavailable_to_callers():
            return self._store.conclude_all(conclusions)


@contextmanager
def _unavailable_to_callers() -> Iterator[None]:
    # The front end answers ActorUnavailable with UNAVAILABLE, which workers retry, and
    # upkeep skips a tick on it: the state is out of reach for now, whether it lives in an
    # actor or behind a lock.
    try:
        yield
    except StoreUnavailable as error:
        raise ActorUnavailable(str(error)) from None


# --- The actor ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CheckBackpressure:
    """The backpressure timer fired: count rows and tell the consumer if that changed."""


@dataclass(frozen=True, slots=True)
class _RetryIngest:
    """A stored-for-later ingest is due for another try."""


_INGEST_RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class SqliteDirectState(BrokerActor):
    """Ingest, ticks and produced confirmations of the sqlite-direct design.

    Messages: `Ingest`, `Produced`, `Connect(consumer=...)` (tell); `Tick` (ask →
    `TickResult`), `Drain` (ask → True once every ingest is committed), `Stats` (ask);
    and the writer's `Maintain` and `StoreSizesQuery` (ask → `StoreSizes`), since this
    actor also stands in for the writer.
    Claims change the row counts from handler threads, so backpressure is re-counted on a
    timer as well as after every ingest and tick. An ingest that fails to commit is kept,
    with ingest paused, and tried again with backoff: its offsets are never reported
    durable before it commits.
    """

    def __init__(
        self,
        store: DirectStore,
        mailbox: MailboxConfig,
        *,
        backpressure_check_interval_ms: int = 250,
        observer: MailboxObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("state", mailbox, observer)
        self._store = store
        self._check_interval_s = backpressure_check_interval_ms / 1000
        self._clock = clock
        self._consumer: Recipient | None = None
        self._ingest_paused = False
        self._unstored: list[Ingest] = []
        self._ingest_failures = 0
        self._retry_timer: threading.Timer | None = None
        self._ticker: Ticker | None = None

    def __repr__(self) -> str:
        return f"<SqliteDirectState {self._store!r} paused={self._ingest_paused}>"

    def on_start(self) -> None:
        self._ticker = Ticker(
            self.actor_ref, _CheckBackpressure(), self._check_interval_s, "direct-backpressure"
        )
        self._ticker.start()

    def handle(self, message: object) -> object:  # noqa: PLR0912 - one branch per message
        match message:
            case Ingest():
                self._unstored.append(message)
                if len(self._unstored) == 1:
                    self._store_ingests()
            case _RetryIngest():
                self._store_ingests()
            case Tick(now, deadline_resets):
                with _unavailable_to_callers():
                    result = self._store.tick(now, deadline_resets=deadline_resets)
                self._check_backpressure()
                return result
            case Produced(ids):
                try:
                    self._store.produced(ids)
                except StoreUnavailable as error:
                    # The rows stay RETRY/FAILURE: the next tick produces them again, under
                    # the same retry ids, which ingest deduplicates.
                    logger.warning("produced confirmations not stored: %s", error)
            case _CheckBackpressure():
                self._check_backpressure()
            case Connect(_, consumer):
                self._consumer = consumer if consumer is not None else self._consumer
                if self._consumer is not None:
                    self._consumer.tell(IngestBackpressure(pause=self._ingest_paused))
            case Drain():
                return not self._unstored
            case Stats():
                return self._store.stats(self._ingest_paused)
            case Maintain(full_vacuum):
                return self._store.maintenance_if_possible(full_vacuum)
            case StoreSizesQuery():
                return self._store.sizes()
            case _:
                raise TypeError(f"sqlite-direct state got an unknown message: {message!r}")
        return None

    def _store_ingests(self) -> None:
        while self._unstored:
            ingest = self._unstored[0]
            try:
                self._store.ingest(ingest.records, self._clock())
            except StoreUnavailable as error:
                self._ingest_failed(error)
                return
            self._unstored.pop(0)
            if self._ingest_failures:
                logger.info("SQLite store accepts ingests again")
                self._ingest_failures = 0
            if ingest.offsets and self._consumer is not None:
                tell_if_alive(self._consumer, Persisted(ingest.offsets))
        self._check_backpressure()

    def _ingest_failed(self, error: StoreUnavailable) -> None:
        self._ingest_failures += 1
        if self._ingest_failures == 1:
            logger.warning("ingest not stored; ingest paused and retried with backoff: %s", error)
        self._set_paused(True)
        backoff_s = _INGEST_RETRY_BACKOFF_S[
            min(self._ingest_failures, len(_INGEST_RETRY_BACKOFF_S)) - 1
        ]
        self._retry_timer = threading.Timer(
            backoff_s, tell_if_alive, (self.actor_ref, _RetryIngest())
        )
        self._retry_timer.daemon = True
        self._retry_timer.start()

    def _check_backpressure(self) -> None:
        if self._unstored:
            return  # paused until the retry stores them
        try:
            paused = self._store.ingest_should_pause()
        except StoreUnavailable as error:
            logger.debug("backpressure not re-counted: %s", error)
            return
        self._set_paused(paused)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._ingest_paused:
            return
        self._ingest_paused = paused
        if self._consumer is not None:
            tell_if_alive(self._consumer, IngestBackpressure(pause=paused))

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._store.close()
