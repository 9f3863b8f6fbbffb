"""The codec between a Kafka message value (a serialized `TaskActivation`) and a `Record`.

The broker keeps the activation bytes exactly as consumed and hands them to workers as
they are; it parses them once, at ingest, for the fields its transitions need, and once
more to build a retry. `get_task_response_bytes` frames stored bytes as a response without
parsing them at all.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Final, Literal, cast, get_args

import msgpack
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from actors.errors import BrokerError
from actors.records import ActivationId, Offset, OnAttemptsExceeded, Partition, Record, Status
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

DecodeReason = Literal[
    "not a TaskActivation", "missing id", "missing namespace", "missing taskname"
]

DECODE_REASONS: Final[tuple[DecodeReason, ...]] = get_args(DecodeReason)
"""Every `ActivationDecodeError.reason`: a fixed set, fit for a metric label."""

_NANOS_PER_SECOND: Final = 1_000_000_000

MAX_STORED_SECONDS: Final = 2**63 - 1
"""The longest duration the store keeps: SQLite's INTEGER is a signed 64-bit number, and
the wire's durations are uint64. Anything longer is forever in practice, so a longer one
is capped here rather than refused (a producer or worker sent a valid message)."""


def capped_seconds(seconds: int) -> int:
    """A wire uint64 duration as the store can keep it; see `MAX_STORED_SECONDS`."""
    return min(seconds, MAX_STORED_SECONDS)


# Field 1 (`task`), wire type 2 (length-delimited): the key byte of GetTaskResponse and
# SetTaskStatusResponse, whose only field is the activation.
_TASK_FIELD_KEY: Final = b"\x0a"


class ActivationDecodeError(BrokerError):
    """A Kafka message value that is not a usable `TaskActivation`.

    Never recoverable: the same bytes fail the same way, so the consumer dead-letters them.
    """

    def __init__(self, reason: DecodeReason) -> None:
        super().__init__(reason)
        self.reason: DecodeReason = reason


def decode_record(
    value: bytes, partition: int, offset: int, now: float, *, max_delay_s: int
) -> Record:
    """The record for one consumed activation, due now (PENDING) or later (DELAY).

    Times derived from the activation (`delay_until`, `expires_at`) count from its
    `received_at`, the producer's clock; `now` stands in when the producer set none.
    """
    activation = _parse(value)
    activation_id, namespace, taskname = activation.id, activation.namespace, activation.taskname
    if not activation_id:
        raise ActivationDecodeError("missing id")
    if not namespace:
        raise ActivationDecodeError("missing namespace")
    if not taskname:
        raise ActivationDecodeError("missing taskname")

    received_at = _seconds(activation.received_at) if activation.HasField("received_at") else now
    status = Status.PENDING
    delay_until: float | None = None
    delay = activation.delay
    if delay > 0:
        due = received_at + min(delay, max_delay_s)
        if due > now:
            status, delay_until = Status.DELAY, due
    expires = activation.expires
    expires_at = received_at + expires if expires > 0 else None

    # An absent retry state reads as all defaults: zero attempts, one allowed.
    retry_state = activation.retry_state
    # Positional, in Record's field order: keyword arguments cost a measurable share of
    # ingest, where every consumed message passes through here.
    return Record(
        ActivationId(activation_id),
        activation.application,
        namespace,
        taskname,
        status,
        received_at,
        now,  # added_at
        Partition(partition),
        Offset(offset),
        value,
        capped_seconds(activation.processing_deadline_duration),
        None,  # processing_deadline
        0,  # processing_attempts
        retry_state.at_most_once,
        _on_attempts_exceeded(retry_state.on_attempts_exceeded),
        expires_at,
        delay_until,
        retry_state.attempts,
        retry_state.max_attempts or 1,
        (
            capped_seconds(retry_state.delay_on_retry)
            if retry_state.HasField("delay_on_retry")
            else None
        ),
    )


def build_retry(
    activation: bytes,
    *,
    new_id: str,
    now: float,
    max_attempts: int,
    delay_on_retry_s: int | None,
) -> bytes:
    """The activation to produce for a retry of `activation`.

    `max_attempts` and `delay_on_retry_s` are the effective values (the stored retry
    state, already overridden by the worker's request); `delay_on_retry_s=None` means
    the retry is due at once, so both `delay` and `retry_state.delay_on_retry` are
    cleared. Everything else (parameters, headers, expiry, deadline) is kept.
    """
    message = _parse(activation)
    message.id = new_id
    _set_seconds(message.received_at, now)
    retry_state = message.retry_state
    retry_state.attempts += 1
    retry_state.max_attempts = max_attempts
    if delay_on_retry_s is None:
        retry_state.ClearField("delay_on_retry")
        message.ClearField("delay")
    else:
        retry_state.delay_on_retry = delay_on_retry_s
        message.delay = delay_on_retry_s
    return message.SerializeToString(deterministic=True)


def encode_activation(
    *,
    activation_id: str | None = None,
    namespace: str = "default",
    taskname: str = "examples.noop",
    args: Sequence[object] = (),
    kwargs: Mapping[str, object] | None = None,
    received_at: float | None = None,
    application: str | None = None,
    headers: Mapping[str, str] | None = None,
    processing_deadline_duration_s: int = 10,
    delay_s: int | None = None,
    expires_s: int | None = None,
    attempts: int = 0,
    max_attempts: int = 1,
    on_attempts_exceeded: OnAttemptsExceeded = OnAttemptsExceeded.DISCARD,
    at_most_once: bool | None = None,
    delay_on_retry_s: int | None = None,
) -> bytes:
    """A well-formed serialized `TaskActivation`, as a task producer would write it.

    Parameters are msgpack `{"args": [...], "kwargs": {...}}`, uncompressed. The id
    defaults to a random UUID and `received_at` to the current time; optional fields
    left as None are absent from the message.
    """
    message = pb.TaskActivation(
        id=activation_id if activation_id is not None else uuid.uuid4().hex,
        namespace=namespace,
        taskname=taskname,
        parameters_bytes=_pack_parameters(args, kwargs or {}),
        headers=headers or {},
        processing_deadline_duration=processing_deadline_duration_s,
        retry_state=pb.RetryState(
            attempts=attempts,
            max_attempts=max_attempts,
            on_attempts_exceeded=_WIRE_ON_ATTEMPTS_EXCEEDED[on_attempts_exceeded],
            at_most_once=at_most_once,
            delay_on_retry=delay_on_retry_s,
        ),
        delay=delay_s,
        expires=expires_s,
        application=application,
    )
    _set_seconds(message.received_at, received_at if received_at is not None else time.time())
    return message.SerializeToString(deterministic=True)


def get_task_response_bytes(activation: bytes | None) -> bytes:
    """A serialized GetTaskResponse (or SetTaskStatusResponse) carrying `activation`.

    Frames the stored bytes as field 1 instead of parsing and re-serializing them: the
    same bytes protobuf would write, at the cost of a concatenation. None: no task.
    """
    if activation is None:
        return b""
    return _TASK_FIELD_KEY + varint(len(activation)) + activation


def _parse(value: bytes) -> pb.TaskActivation:
    try:
        return pb.TaskActivation.FromString(value)
    except DecodeError as error:
        raise ActivationDecodeError("not a TaskActivation") from error


_WIRE_ON_ATTEMPTS_EXCEEDED: Final[Mapping[OnAttemptsExceeded, pb.OnAttemptsExceeded]] = {
    OnAttemptsExceeded.UNSPECIFIED: pb.ON_ATTEMPTS_EXCEEDED_UNSPECIFIED,
    OnAttemptsExceeded.DISCARD: pb.ON_ATTEMPTS_EXCEEDED_DISCARD,
    OnAttemptsExceeded.DEADLETTER: pb.ON_ATTEMPTS_EXCEEDED_DEADLETTER,
}


def _on_attempts_exceeded(value: pb.OnAttemptsExceeded) -> OnAttemptsExceeded:
    # Anything but an explicit DEADLETTER drops the task, as the wire contract says of
    # UNSPECIFIED; values from a newer producer's enum are treated the same way.
    if value == pb.ON_ATTEMPTS_EXCEEDED_DEADLETTER:
        return OnAttemptsExceeded.DEADLETTER
    return OnAttemptsExceeded.DISCARD


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / _NANOS_PER_SECOND


def _set_seconds(timestamp: Timestamp, seconds: float) -> None:
    whole = math.floor(seconds)
    timestamp.seconds = whole
    # Rounding may reach a full second; the field's range ends one nanosecond short.
    timestamp.nanos = min(round((seconds - whole) * _NANOS_PER_SECOND), _NANOS_PER_SECOND - 1)


def _pack_parameters(args: Sequence[object], kwargs: Mapping[str, object]) -> bytes:
    # msgpack ships no type hints; packb returns bytes.
    return cast(bytes, msgpack.packb({"args": list(args), "kwargs": dict(kwargs)}))


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint: seven bits a byte, low first, high bit = more follows."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
