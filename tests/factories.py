"""Records for tests, with every field defaulted so a test names only what it is about."""

from __future__ import annotations

import itertools
from typing import Any

from actors.records import ActivationId, Offset, OnAttemptsExceeded, Partition, Record, Status

_offsets = itertools.count()


def make_record(activation_id: str, **fields: Any) -> Record:
    values: dict[str, Any] = {
        "application": "app",
        "namespace": "ns",
        "taskname": "task",
        "status": Status.PENDING,
        "received_at": 1000.0,
        "added_at": 1000.0,
        "partition": Partition(0),
        "offset": Offset(next(_offsets)),
        "activation": f"bytes-of-{activation_id}".encode(),
        "processing_deadline_duration_s": 10,
        "on_attempts_exceeded": OnAttemptsExceeded.DISCARD,
        "max_attempts": 3,
    }
    values.update(fields)
    return Record(id=ActivationId(activation_id), **values)
