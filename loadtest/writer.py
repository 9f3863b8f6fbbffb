"""Benchmark of the SQLite store alone: flush throughput and restore time.

Run with `python -m loadtest.writer --json writer.json`. It measures `SqliteStore`
without the actor around it, so the numbers are the disk path's ceiling:

- flush: batches of mixed row changes (half of them new records: metadata and bytes; a
  quarter updates of live records; a quarter deletes), in row changes per second;
- restore: opening a file of 100,000 records and loading them all, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from actors.messages import Flush
from actors.records import ActivationId, Offset, Partition, Record, Status
from actors.store import SqliteStore

_APPLICATIONS = ("sentry", "getsentry")
_NAMESPACES = ("ingest", "issues", "replays", "crons")


class _RecordFactory:
    """Records that look like ingested activations, with fresh ids."""

    def __init__(self, blob_bytes: int, rng: random.Random) -> None:
        self._blob_bytes = blob_bytes
        self._rng = rng
        self._next = 0

    def new(self) -> Record:
        self._next += 1
        now = time.time()
        return Record(
            id=ActivationId(f"activation-{self._next:09d}"),
            application=self._rng.choice(_APPLICATIONS),
            namespace=self._rng.choice(_NAMESPACES),
            taskname="sentry.tasks.process_event",
            status=Status.PENDING,
            received_at=now,
            added_at=now,
            partition=Partition(self._next % 16),
            offset=Offset(self._next),
            activation=self._rng.randbytes(self._blob_bytes),
            processing_deadline_duration_s=60,
            expires_at=now + 3600,
            max_attempts=3,
        )


def _insert_flush(seq: int, records: list[Record]) -> Flush:
    return Flush(
        seq=seq,
        upserts=tuple(record.row() for record in records),
        deletes=(),
        new_blobs=tuple((record.id, record.activation) for record in records),
        offsets=(),
    )


def measure_flush(
    path: Path, batches: int, batch_size: int, blob_bytes: int, rng: random.Random
) -> tuple[float, list[float]]:
    """Row changes per second over `batches` flushes, and each flush's seconds."""
    factory = _RecordFactory(blob_bytes, rng)
    per_kind = batch_size // 4  # new records count twice: metadata and bytes
    live = [factory.new() for _ in range(per_kind * 8)]
    store = SqliteStore(path)
    try:
        store.apply(_insert_flush(0, live))
        flushes = []
        for seq in range(1, batches + 1):
            new = [factory.new() for _ in range(per_kind)]
            rng.shuffle(live)
            deleted, updated, kept = (
                live[:per_kind],
                live[per_kind : 2 * per_kind],
                live[2 * per_kind :],
            )
            for record in updated:
                record.status = Status.PROCESSING
                record.processing_attempts += 1
                record.processing_deadline = time.time() + 60
            flushes.append(
                Flush(
                    seq=seq,
                    upserts=tuple(record.row() for record in (*new, *updated)),
                    deletes=tuple(record.id for record in deleted),
                    new_blobs=tuple((record.id, record.activation) for record in new),
                    offsets=(),
                )
            )
            live = kept + updated + new
        durations = []
        for flush in flushes:
            started = time.perf_counter()
            store.apply(flush)
            durations.append(time.perf_counter() - started)
    finally:
        store.close()
    row_changes = sum(flush.row_changes for flush in flushes)
    return row_changes / sum(durations), durations


def measure_restore(
    path: Path, records: int, blob_bytes: int, rng: random.Random
) -> tuple[float, float]:
    """Seconds to open a file of `records` records, and to load them all."""
    factory = _RecordFactory(blob_bytes, rng)
    store = SqliteStore(path)
    try:
        chunk = 10_000
        for seq, start in enumerate(range(0, records, chunk)):
            store.apply(
                _insert_flush(seq, [factory.new() for _ in range(min(chunk, records - start))])
            )
    finally:
        store.close()
    started = time.perf_counter()
    store = SqliteStore(path)
    opened = time.perf_counter()
    try:
        loaded = store.load()
    finally:
        store.close()
    finished = time.perf_counter()
    if len(loaded) != records:
        raise RuntimeError(f"restored {len(loaded)} records, expected {records}")
    return opened - started, finished - opened


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtest.writer", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1_000, help="row changes per flush")
    parser.add_argument("--blob-bytes", type=int, default=300)
    parser.add_argument("--restore-records", type=int, default=100_000)
    parser.add_argument(
        "--dir", type=Path, help="where the database files go (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        rows_per_s, durations = measure_flush(
            Path(directory) / "flush.sqlite", args.batches, args.batch_size, args.blob_bytes, rng
        )
        open_s, load_s = measure_restore(
            Path(directory) / "restore.sqlite", args.restore_records, args.blob_bytes, rng
        )

    quantiles = statistics.quantiles(durations, n=100)
    print(
        f"flush: {rows_per_s:,.0f} row changes/s over {args.batches} batches of "
        f"{args.batch_size} ({args.blob_bytes}-byte blobs); per batch p50 "
        f"{quantiles[49] * 1000:.1f} ms, p99 {quantiles[98] * 1000:.1f} ms"
    )
    print(
        f"restore: {args.restore_records:,} records in {open_s + load_s:.3f} s "
        f"(open and check {open_s:.3f} s, load {load_s:.3f} s)"
    )
    if args.json is not None:
        result = {"flush_rows_per_s": rows_per_s, "restore_100k_s": open_s + load_s}
        args.json.write_text(json.dumps(result) + os.linesep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
