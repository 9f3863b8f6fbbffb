"""A writer process for the crash test: `python writer_crash_child.py DB_PATH FIRST_SEQ`.

It applies the deterministic batch stream from FIRST_SEQ on, printing `ready` once the
store is open and then each batch's seq after its commit, until it is killed. The test
imports `expected_state` to know what the file must hold after any prefix of the stream.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

from actors.messages import Flush
from actors.records import ActivationId, KafkaOffset, Offset, Partition, Record, Status
from actors.store import SqliteStore

_RECORDS_PER_BATCH = 200
_BLOB_BYTES = 500
_STREAM_LENGTH = 1_000_000  # far more than a test lets the child run


def _new_records(seq: int) -> list[Record]:
    rng = random.Random(seq)
    return [
        Record(
            id=ActivationId(f"s{seq}-{index}"),
            application="app",
            namespace=f"ns-{index % 4}",
            taskname="task",
            status=Status.PENDING,
            received_at=float(seq),
            added_at=float(seq) + index / 1000,
            partition=Partition(0),
            offset=Offset(seq * _RECORDS_PER_BATCH + index),
            activation=rng.randbytes(_BLOB_BYTES),
        )
        for index in range(_RECORDS_PER_BATCH)
    ]


def _claimed(record: Record) -> Record:
    return dataclasses.replace(
        record,
        status=Status.PROCESSING,
        processing_attempts=1,
        processing_deadline=record.added_at + 60,
    )


def batch(seq: int) -> Flush:
    """Batch `seq` (from 1): new records, claims of batch seq-1's, deletes of seq-2's."""
    new = _new_records(seq)
    claimed = [_claimed(record) for record in _new_records(seq - 1)] if seq > 1 else []
    deleted = [record.id for record in _new_records(seq - 2)] if seq > 2 else []
    return Flush(
        seq=seq,
        upserts=tuple(record.row() for record in (*new, *claimed)),
        deletes=tuple(deleted),
        new_blobs=tuple((record.id, record.activation) for record in new),
        offsets=(KafkaOffset(Partition(0), Offset(seq * _RECORDS_PER_BATCH - 1)),),
    )


def expected_state(applied: int) -> dict[str, Record]:
    """What the store holds after batches 1..`applied`, replayed in memory.

    Every batch touches only its own records and those of the two batches before it, so
    replaying the last three batches gives the same state as replaying them all.
    """
    first = max(1, applied - 2)
    # A claim in batch `first` updates a record created in the batch before it.
    blobs = {r.id: r.activation for seq in (first - 1, first) for r in _new_records(seq)}
    state: dict[str, Record] = {}
    for seq in range(first, applied + 1):
        flush = batch(seq)
        blobs.update(flush.new_blobs)
        for activation_id in flush.deletes:
            state.pop(activation_id, None)
        for row in flush.upserts:
            state[row.id] = Record.from_row(row, blobs[row.id])
    return state


def main(argv: list[str]) -> int:
    db_path, first_seq = Path(argv[1]), int(argv[2])
    store = SqliteStore(db_path)
    print("ready", flush=True)
    for seq in range(first_seq, first_seq + _STREAM_LENGTH):
        store.apply(batch(seq))
        print(seq, flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
