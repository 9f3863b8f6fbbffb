"""The activation codec: Kafka bytes → Record, retry activations, response framing."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.activation import (
    DECODE_REASONS,
    MAX_STORED_SECONDS,
    ActivationDecodeError,
    DecodeReason,
    build_retry,
    decode_record,
    encode_activation,
    get_task_response_bytes,
)
from actors.errors import BrokerError
from actors.records import OnAttemptsExceeded, Status
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

NOW = 1_700_000_000.25
HOUR = 3600
UINT32 = st.integers(min_value=0, max_value=2**32 - 1)
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)


def _parse(value: bytes) -> pb.TaskActivation:
    return pb.TaskActivation.FromString(value)


# --- decode_record ------------------------------------------------------------------


def test_decode_keeps_every_field_the_broker_uses() -> None:
    value = encode_activation(
        activation_id="a1",
        namespace="ns",
        taskname="tasks.add",
        args=[1, 2],
        received_at=NOW - 5.5,
        application="app",
        headers={"h": "v"},
        processing_deadline_duration_s=30,
        expires_s=600,
        attempts=2,
        max_attempts=5,
        on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER,
        at_most_once=True,
        delay_on_retry_s=7,
    )
    record = decode_record(value, 3, 42, NOW, max_delay_s=HOUR)
    assert (record.id, record.application, record.namespace, record.taskname) == (
        "a1",
        "app",
        "ns",
        "tasks.add",
    )
    assert record.status is Status.PENDING
    assert record.received_at == NOW - 5.5
    assert record.added_at == NOW
    assert (record.partition, record.offset) == (3, 42)
    assert record.activation is value
    assert record.processing_deadline_duration_s == 30
    assert record.expires_at == NOW - 5.5 + 600
    assert record.delay_until is None
    assert (record.attempts, record.max_attempts) == (2, 5)
    assert record.on_attempts_exceeded is OnAttemptsExceeded.DEADLETTER
    assert record.at_most_once is True
    assert record.delay_on_retry_s == 7
    # What the state machine sets later starts empty.
    assert (record.processing_deadline, record.processing_attempts) == (None, 0)


def test_decode_defaults_of_a_minimal_activation() -> None:
    value = pb.TaskActivation(id="a", namespace="n", taskname="t").SerializeToString()
    record = decode_record(value, 0, 0, NOW, max_delay_s=HOUR)
    assert record.received_at == NOW  # no timestamp: the broker's clock stands in
    assert record.application == ""
    assert record.status is Status.PENDING
    assert (record.attempts, record.max_attempts) == (0, 1)
    assert record.on_attempts_exceeded is OnAttemptsExceeded.DISCARD
    assert record.at_most_once is False
    assert record.delay_on_retry_s is None
    assert record.expires_at is None
    assert record.processing_deadline_duration_s == 0


@pytest.mark.parametrize(
    ("wire_value", "expected"),
    [
        (pb.ON_ATTEMPTS_EXCEEDED_UNSPECIFIED, OnAttemptsExceeded.DISCARD),
        (pb.ON_ATTEMPTS_EXCEEDED_DISCARD, OnAttemptsExceeded.DISCARD),
        (pb.ON_ATTEMPTS_EXCEEDED_DEADLETTER, OnAttemptsExceeded.DEADLETTER),
        (7, OnAttemptsExceeded.DISCARD),  # a value from a newer producer's enum
    ],
)
def test_decode_on_attempts_exceeded(wire_value: int, expected: OnAttemptsExceeded) -> None:
    message = pb.TaskActivation(id="a", namespace="n", taskname="t")
    message.retry_state.on_attempts_exceeded = wire_value  # type: ignore[assignment]
    record = decode_record(message.SerializeToString(), 0, 0, NOW, max_delay_s=HOUR)
    assert record.on_attempts_exceeded is expected


def test_decode_max_attempts_zero_means_one() -> None:
    value = encode_activation(max_attempts=0)
    assert decode_record(value, 0, 0, NOW, max_delay_s=HOUR).max_attempts == 1


@pytest.mark.parametrize(
    ("received_ago_s", "delay_s", "status", "delay_until_after_received_s"),
    [
        (0, None, Status.PENDING, None),
        (0, 0, Status.PENDING, None),
        (10, 30, Status.DELAY, 30),
        (100, 50, Status.PENDING, None),  # already due when consumed
        (50, 50, Status.PENDING, None),  # due exactly now
        (0, 10 * HOUR, Status.DELAY, HOUR),  # capped
        (2 * HOUR, 10 * HOUR, Status.PENDING, None),  # the cap, too, has passed
    ],
)
def test_decode_delay(
    received_ago_s: int,
    delay_s: int | None,
    status: Status,
    delay_until_after_received_s: int | None,
) -> None:
    received_at = NOW - received_ago_s
    value = encode_activation(received_at=received_at, delay_s=delay_s)
    record = decode_record(value, 0, 0, NOW, max_delay_s=HOUR)
    assert record.status is status
    expected = None
    if delay_until_after_received_s is not None:
        expected = received_at + delay_until_after_received_s
    assert record.delay_until == expected


@pytest.mark.parametrize(("expires_s", "expires_after_s"), [(None, None), (0, None), (60, 60)])
def test_decode_expires(expires_s: int | None, expires_after_s: int | None) -> None:
    value = encode_activation(received_at=NOW - 1, expires_s=expires_s)
    record = decode_record(value, 0, 0, NOW, max_delay_s=HOUR)
    expected = None if expires_after_s is None else NOW - 1 + expires_after_s
    assert record.expires_at == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xff", "not a TaskActivation"),
        (b"\x0a\x05ab", "not a TaskActivation"),  # truncated
        (b"\x0a\x01\xff", "not a TaskActivation"),  # id is not UTF-8
        (b"", "missing id"),
        (encode_activation(activation_id=""), "missing id"),
        (encode_activation(namespace=""), "missing namespace"),
        (encode_activation(taskname=""), "missing taskname"),
    ],
)
def test_decode_errors(value: bytes, reason: DecodeReason) -> None:
    with pytest.raises(ActivationDecodeError) as error:
        decode_record(value, 0, 0, NOW, max_delay_s=HOUR)
    assert error.value.reason == reason
    assert str(error.value) == reason
    assert isinstance(error.value, BrokerError)


def test_decode_reasons_are_a_closed_set() -> None:
    assert set(DECODE_REASONS) == {
        "not a TaskActivation",
        "missing id",
        "missing namespace",
        "missing taskname",
    }


# --- build_retry ----------------------------------------------------------------------


def _original() -> bytes:
    return encode_activation(
        activation_id="first",
        namespace="ns",
        taskname="tasks.add",
        args=[1],
        kwargs={"k": "v"},
        received_at=NOW - 100,
        application="app",
        headers={"compression-type": "none", "trace": "abc"},
        processing_deadline_duration_s=30,
        delay_s=5,
        expires_s=900,
        attempts=1,
        max_attempts=3,
        on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER,
        at_most_once=True,
        delay_on_retry_s=5,
    )


def test_retry_changes_only_id_attempts_time_and_retry_settings() -> None:
    original = _parse(_original())
    retry = _parse(
        build_retry(_original(), new_id="second", now=NOW, max_attempts=4, delay_on_retry_s=20)
    )
    assert retry.id == "second"
    assert retry.retry_state.attempts == 2
    assert retry.retry_state.max_attempts == 4
    assert retry.retry_state.delay_on_retry == 20
    assert retry.delay == 20
    assert (retry.received_at.seconds, retry.received_at.nanos) == (1_700_000_000, 250_000_000)
    # Everything else is the original's.
    for name in ("id", "received_at", "retry_state", "delay"):
        retry.ClearField(name)
        original.ClearField(name)
    assert retry == original
    assert original.expires == 900
    assert original.application == "app"


def test_retry_without_delay_clears_both_delays() -> None:
    retry = _parse(
        build_retry(_original(), new_id="second", now=NOW, max_attempts=3, delay_on_retry_s=None)
    )
    assert not retry.HasField("delay")
    assert not retry.retry_state.HasField("delay_on_retry")
    assert retry.retry_state.at_most_once is True
    assert retry.retry_state.on_attempts_exceeded == pb.ON_ATTEMPTS_EXCEEDED_DEADLETTER


def test_retry_of_an_activation_without_retry_state() -> None:
    value = pb.TaskActivation(id="a", namespace="n", taskname="t").SerializeToString()
    retry = _parse(build_retry(value, new_id="b", now=NOW, max_attempts=2, delay_on_retry_s=None))
    assert (retry.retry_state.attempts, retry.retry_state.max_attempts) == (1, 2)


def test_retry_decodes_as_a_delayed_record_counting_from_now() -> None:
    value = build_retry(_original(), new_id="second", now=NOW, max_attempts=3, delay_on_retry_s=20)
    record = decode_record(value, 0, 7, NOW + 1, max_delay_s=HOUR)
    assert record.id == "second"
    assert record.attempts == 2
    assert record.status is Status.DELAY
    assert record.delay_until == NOW + 20
    assert record.expires_at == NOW + 900


def test_retry_of_bad_bytes() -> None:
    with pytest.raises(ActivationDecodeError) as error:
        build_retry(b"\xff", new_id="x", now=NOW, max_attempts=1, delay_on_retry_s=None)
    assert error.value.reason == "not a TaskActivation"


# --- encode_activation ----------------------------------------------------------------


def test_encode_packs_parameters_as_msgpack() -> None:
    message = _parse(encode_activation(args=[1, "two"], kwargs={"three": 3.0}))
    assert msgpack.unpackb(message.parameters_bytes) == {
        "args": [1, "two"],
        "kwargs": {"three": 3.0},
    }
    assert message.parameters == ""


def test_encode_leaves_unset_optionals_absent() -> None:
    message = _parse(encode_activation())
    assert len(message.id) == 32  # a fresh uuid4, hex
    for name in ("delay", "expires", "application"):
        assert not message.HasField(name)
    assert not message.retry_state.HasField("at_most_once")
    assert not message.retry_state.HasField("delay_on_retry")
    assert message.HasField("received_at")


def test_encode_ids_differ() -> None:
    assert _parse(encode_activation()).id != _parse(encode_activation()).id


# --- get_task_response_bytes ----------------------------------------------------------


@pytest.mark.parametrize("payload_size", [0, 1, 100, 127, 128, 300, 16_383, 16_384, 70_000])
def test_response_bytes_equal_protobuf_serialization(payload_size: int) -> None:
    activation = encode_activation(activation_id="a", received_at=NOW, args=["x" * payload_size])
    framed = get_task_response_bytes(activation)
    task = _parse(activation)
    assert framed == pb.GetTaskResponse(task=task).SerializeToString(deterministic=True)
    assert framed == pb.SetTaskStatusResponse(task=task).SerializeToString(deterministic=True)
    parsed = pb.GetTaskResponse.FromString(framed)
    assert parsed.HasField("task")
    assert parsed.task.SerializeToString(deterministic=True) == activation


def test_response_bytes_of_no_task_and_of_an_empty_task() -> None:
    assert get_task_response_bytes(None) == pb.GetTaskResponse().SerializeToString() == b""
    assert not pb.SetTaskStatusResponse.FromString(get_task_response_bytes(None)).HasField("task")
    empty_task = pb.GetTaskResponse(task=pb.TaskActivation()).SerializeToString()
    assert get_task_response_bytes(b"") == empty_task == b"\x0a\x00"


def test_response_bytes_pass_the_activation_through_unparsed() -> None:
    # Fields out of canonical order, and one this schema does not know (field 99),
    # reach the worker exactly as the producer wrote them.
    activation = (
        pb.TaskActivation(taskname="t").SerializeToString()
        + pb.TaskActivation(id="a").SerializeToString()
        + b"\x98\x06\x01"
    )
    framed = get_task_response_bytes(activation)
    assert framed.endswith(activation)
    task = pb.GetTaskResponse.FromString(framed).task
    assert (task.id, task.taskname) == ("a", "t")


# --- round trip -----------------------------------------------------------------------

_names = st.text(min_size=1, max_size=20)
_parameters = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=10), st.booleans())


@given(
    activation_id=_names,
    namespace=_names,
    taskname=_names,
    application=st.none() | st.text(max_size=20),
    args=st.lists(_parameters, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=8), _parameters, max_size=4),
    headers=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    received_ago_s=st.floats(min_value=0, max_value=10 * HOUR),
    processing_deadline_duration_s=UINT64,
    delay_s=st.none() | UINT64,
    expires_s=st.none() | UINT64,
    attempts=UINT32,
    max_attempts=UINT32,
    on_attempts_exceeded=st.sampled_from(OnAttemptsExceeded),
    at_most_once=st.none() | st.booleans(),
    delay_on_retry_s=st.none() | UINT64,
)
def test_decode_of_encode_keeps_the_fields(
    activation_id: str,
    namespace: str,
    taskname: str,
    application: str | None,
    args: list[object],
    kwargs: dict[str, object],
    headers: dict[str, str],
    received_ago_s: float,
    processing_deadline_duration_s: int,
    delay_s: int | None,
    expires_s: int | None,
    attempts: int,
    max_attempts: int,
    on_attempts_exceeded: OnAttemptsExceeded,
    at_most_once: bool | None,
    delay_on_retry_s: int | None,
) -> None:
    value = encode_activation(
        activation_id=activation_id,
        namespace=namespace,
        taskname=taskname,
        args=args,
        kwargs=kwargs,
        received_at=NOW - received_ago_s,
        application=application,
        headers=headers,
        processing_deadline_duration_s=processing_deadline_duration_s,
        delay_s=delay_s,
        expires_s=expires_s,
        attempts=attempts,
        max_attempts=max_attempts,
        on_attempts_exceeded=on_attempts_exceeded,
        at_most_once=at_most_once,
        delay_on_retry_s=delay_on_retry_s,
    )
    record = decode_record(value, 1, 2, NOW, max_delay_s=HOUR)

    assert (record.id, record.namespace, record.taskname) == (activation_id, namespace, taskname)
    assert record.application == (application or "")
    assert record.received_at == pytest.approx(NOW - received_ago_s, abs=1e-6)
    assert record.activation == value
    # Durations the store cannot hold (above SQLite's signed 64-bit INTEGER) are capped.
    assert record.processing_deadline_duration_s == min(
        processing_deadline_duration_s, MAX_STORED_SECONDS
    )
    assert record.attempts == attempts
    assert record.max_attempts == (max_attempts or 1)
    assert record.on_attempts_exceeded is (
        OnAttemptsExceeded.DEADLETTER
        if on_attempts_exceeded is OnAttemptsExceeded.DEADLETTER
        else OnAttemptsExceeded.DISCARD
    )
    assert record.at_most_once is bool(at_most_once)
    assert record.delay_on_retry_s == (
        None if delay_on_retry_s is None else min(delay_on_retry_s, MAX_STORED_SECONDS)
    )
    if expires_s:
        assert record.expires_at == record.received_at + expires_s
    else:
        assert record.expires_at is None
    if record.status is Status.DELAY:
        assert delay_s
        assert record.delay_until == record.received_at + min(delay_s, HOUR)
        assert NOW < record.delay_until <= NOW + HOUR
    else:
        assert record.status is Status.PENDING
        assert record.delay_until is None
        assert not delay_s or record.received_at + min(delay_s, HOUR) <= NOW

    message = _parse(value)
    assert dict(message.headers) == headers
    assert msgpack.unpackb(message.parameters_bytes) == {"args": args, "kwargs": kwargs}
