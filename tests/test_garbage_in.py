"""Garbage in: random and mutated bytes at every worker-facing gRPC method of a running
`taskbroker run`, and random payloads on its Kafka topic.

The promises: the broker never crashes and no actor gets stuck (gRPC health, /healthz,
/readyz and a claim through the state actor answer after every burst, and the broker stops
cleanly at the end), every call is answered with a status code WIRE.md gives that method
(with request signing on, every call not signed under one of the keys is UNAUTHENTICATED),
and every Kafka message that is not a usable activation lands in the dead-letter topic,
byte for byte, with its reason.

The examples are derandomized (the same ones every run, no example database), so a CI
failure is reproducible here; hypothesis still shrinks a failure to its smallest form.
`max_examples` keeps the file well under two minutes on a loaded two-core machine.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import grpc
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.activation import DECODE_REASONS, encode_activation, varint
from actors.auth import SIGNATURE_METADATA_KEY, sign
from actors.consumer import (
    DECODE_ERROR_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from actors.embedded_kafka import EmbeddedKafka, TopicSpec, free_port
from actors.records import OnAttemptsExceeded
from actors.services import NO_PENDING_ACTIVATIONS, PUSH_MODE_REFUSAL
from actors.wire.grpc.health.v1 import health_pb2, health_pb2_grpc
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.taskbroker_actors.v1 import batch_pb2
from tests.broker_process import BrokerProcess, run_args, wait_for
from tests.ops_support import http_get, sample, scrape

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

_log = logging.getLogger(__name__)

CALL_TIMEOUT_S: Final = 10.0
UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1
INT64_MAX: Final = 2**63 - 1
NAMESPACE: Final = "garbage-in"
SEEDED_TASKS: Final = 200
"""Real tasks on the topic before the fuzzing, so that claims hand out live tasks."""

# What WIRE.md gives each method without signing: OK; NOT_FOUND for a claim that finds
# nothing ("No pending activations"); INVALID_ARGUMENT for a request the broker refuses
# (bytes that are not the request message, a status other than FAILURE, RETRY or COMPLETE,
# a missing id). TaskBatchService's codes are "as for ConsumerService" (batch.proto): a
# fetch that finds nothing is OK with no tasks. In push delivery every claim is
# PERMISSION_DENIED. Neither UNAVAILABLE nor RESOURCE_EXHAUSTED is accepted: a handful of
# calls at a time must not overload the state.
_REFUSABLE: Final = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT})


@dataclass(frozen=True, slots=True)
class Method:
    path: str
    request: type[Message]
    response: type[Message]
    claims: bool
    """Hands out tasks: refused in push delivery."""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    def wire_codes(self, pulls: bool) -> frozenset[grpc.StatusCode]:
        if not self.claims:
            return _REFUSABLE
        if not pulls:
            return frozenset({grpc.StatusCode.PERMISSION_DENIED})
        if self.request is pb.GetTaskRequest:
            return _REFUSABLE | {grpc.StatusCode.NOT_FOUND}
        return _REFUSABLE


_CONSUMER: Final = "/sentry_protos.taskbroker.v1.ConsumerService/"
_BATCH: Final = "/taskbroker_actors.v1.TaskBatchService/"
METHODS: Final = (
    Method(f"{_CONSUMER}GetTask", pb.GetTaskRequest, pb.GetTaskResponse, claims=True),
    Method(
        f"{_CONSUMER}SetTaskStatus",
        pb.SetTaskStatusRequest,
        pb.SetTaskStatusResponse,
        claims=False,  # its fetch_next_task is ignored in push delivery
    ),
    Method(
        f"{_CONSUMER}SetBatchActivationStatus",
        pb.SetBatchActivationStatusRequest,
        pb.SetBatchActivationStatusResponse,
        claims=False,
    ),
    Method(
        f"{_BATCH}FetchTasks",
        batch_pb2.FetchTasksRequest,
        batch_pb2.FetchTasksResponse,
        claims=True,
    ),
    Method(
        f"{_BATCH}ReportResults",
        batch_pb2.ReportResultsRequest,
        batch_pb2.ReportResultsResponse,
        claims=False,
    ),
    Method(
        f"{_BATCH}ReportAndFetch",
        batch_pb2.ReportAndFetchRequest,
        batch_pb2.FetchTasksResponse,
        claims=True,
    ),
)


# --- the broker under fire ------------------------------------------------------------------


@dataclass
class Target:
    kafka: EmbeddedKafka
    topic: str
    dlq: str
    metrics_url: str
    channel: grpc.Channel
    seeded_ids: tuple[str, ...]
    secrets: tuple[str, ...] = ()
    """The broker's signing keys; none: it signs nothing."""
    pulls: bool = True
    """False in push delivery."""
    handed_out: list[str] = field(default_factory=list)
    """Ids of the tasks the fuzzing's own claims received: results for live tasks."""

    def with_live_ids(self, request: bytes) -> bytes:
        """`request` with each id placeholder replaced by the id of a task handed out
        lately (or a seeded one). Drawn data cannot depend on the broker (hypothesis
        replays it), so the strategies draw placeholders and the ids are put in here.
        Every id is 32 characters, like a placeholder, so mutated bytes stay as drawn."""
        live = [*reversed(self.handed_out[-_ID_SLOTS:]), *self.seeded_ids]
        return _PLACEHOLDER.sub(lambda slot: live[int(slot[1]) % len(live)].encode(), request)

    def call(
        self, method: Method, request: bytes, signature: str | None = None
    ) -> tuple[grpc.StatusCode, str, bytes]:
        """Raw bytes in, (code, details, response bytes) out."""
        # No serializers: the bytes go out exactly as given.
        stub = self.channel.unary_unary(method.path)
        metadata = None if signature is None else ((SIGNATURE_METADATA_KEY, signature),)
        try:
            response: bytes = stub(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            return error.code(), error.details() or "", b""
        return grpc.StatusCode.OK, "", response

    def assert_healthy(self) -> None:
        """The process answers and no actor is stuck: health, liveness, readiness, and a
        claim that has to go through the state actor."""
        health = health_pb2_grpc.HealthStub(self.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert http_get(f"{self.metrics_url}/healthz")[0] == 200
        wait_for(
            lambda: http_get(f"{self.metrics_url}/readyz")[0] == 200, 30, "/readyz to answer 200"
        )
        # A result for no task: answered by the state actor in either delivery mode.
        probe = pb.SetBatchActivationStatusRequest(
            updates=[
                pb.SetTaskStatusRequest(
                    id="no-such-task", status=pb.TASK_ACTIVATION_STATUS_COMPLETE
                )
            ]
        ).SerializeToString()
        method = METHODS[2]
        signature = None if not self.secrets else sign(self.secrets[0], method.path, probe)
        code, details, _ = self.call(method, probe, signature)
        assert code is grpc.StatusCode.OK, details

    def check_answer(
        self, method: Method, code: grpc.StatusCode, details: str, response: bytes
    ) -> None:
        """Asserts the answer is one WIRE.md allows; remembers the tasks it handed out."""
        assert code in method.wire_codes(self.pulls), (
            f"{method.name} answered {code.name}: {details}"
        )
        if code is grpc.StatusCode.NOT_FOUND:
            assert details == NO_PENDING_ACTIVATIONS
        if code is grpc.StatusCode.PERMISSION_DENIED:
            assert details == PUSH_MODE_REFUSAL
        if code is not grpc.StatusCode.OK:
            return
        # An answer a worker can read, with a whole activation in every task.
        parsed = method.response.FromString(response)
        tasks: list[pb.TaskActivation] = []
        if isinstance(parsed, batch_pb2.FetchTasksResponse):
            tasks = list(parsed.tasks)
        elif isinstance(parsed, pb.GetTaskResponse | pb.SetTaskStatusResponse) and parsed.HasField(
            "task"
        ):
            tasks = [parsed.task]
        assert self.pulls or not tasks, "push delivery handed out a task on a pull"
        for task in tasks:
            assert task.id
            assert task.namespace
            assert task.taskname
        self.handed_out += [task.id for task in tasks]


@contextmanager
def _running(
    kafka: EmbeddedKafka, tmp_path: Path, secrets: tuple[str, ...] = (), *, pulls: bool = True
) -> Iterator[Target]:
    """A `taskbroker run` on fresh topics that already hold `SEEDED_TASKS` tasks. In push
    delivery its worker is a port nothing listens on: every push fails, and the tasks go
    back to pending, where late results still apply to them."""
    topic = f"garbage-{uuid.uuid4().hex[:12]}"
    dlq = f"{topic}-dlq"
    kafka.create_topics([TopicSpec(topic, 1), TopicSpec(dlq, 1)])
    seeded_ids = tuple(uuid.uuid4().hex for _ in range(SEEDED_TASKS))
    _produce(
        kafka,
        topic,
        [
            KafkaMessage(
                encode_activation(
                    activation_id=activation_id,
                    namespace=NAMESPACE,
                    max_attempts=3,
                    on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER,
                )
            )
            for activation_id in seeded_ids
        ],
    )
    grpc_port, metrics_port = free_port(), free_port()
    args = [
        *run_args(kafka, topic, dlq, tmp_path / "broker.sqlite", grpc_port, metrics_port),
        # A fetch that finds nothing waits at most this long, whatever wait_ms asks for.
        "--set", "batch.max_wait_ms=20",
    ]  # fmt: skip
    if secrets:
        args += ["--set", f"grpc_shared_secret={','.join(secrets)}"]
    if not pulls:
        args += ["--set", "delivery_mode=push", "--set", f"worker_map.=127.0.0.1:{free_port()}"]
    with BrokerProcess(args, tmp_path / "broker.log") as broker:
        broker.start()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            running = Target(
                kafka,
                topic,
                dlq,
                f"http://127.0.0.1:{metrics_port}",
                channel,
                seeded_ids,
                secrets,
                pulls,
            )
            running.assert_healthy()
            yield running
        # A clean stop's exit code: 0 only if no actor died on the way.
        assert broker.stop() == 0, broker.log
        assert "Traceback" not in broker.log, broker.log
        assert " ERROR " not in broker.log, broker.log


@pytest.fixture(scope="module")
def target(kafka: EmbeddedKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with _running(kafka, tmp_path_factory.mktemp("garbage-in")) as running:
        yield running


@dataclass(frozen=True, slots=True)
class KafkaMessage:
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def _produce(kafka: EmbeddedKafka, topic: str, messages: list[KafkaMessage]) -> list[int]:
    """Produce `messages` in order; their offsets, once Kafka acknowledged every one."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 0}, logger=_log)
    offsets: dict[int, int] = {}

    def delivered(index: int) -> Callable[[Any, Any], None]:
        def record(error: Any, message: Any) -> None:
            assert error is None, error
            offsets[index] = message.offset()

        return record

    for index, message in enumerate(messages):
        producer.produce(
            topic,
            value=message.value,
            key=message.key,
            headers=list(message.headers),
            on_delivery=delivered(index),
        )
    assert producer.flush(30) == 0
    return [offsets[index] for index in range(len(messages))]


# --- strategies: valid requests, then broken ----------------------------------------------------

_ID_SLOTS: Final = 64
_PLACEHOLDER: Final = re.compile(rb"live-task-id-slot-(\d{14})")


def _placeholder(slot: int) -> str:
    return f"live-task-id-slot-{slot:014d}"  # 32 characters, as a uuid's hex


_texts = st.text(max_size=24)
_uint32s = st.one_of(st.integers(0, UINT32_MAX), st.sampled_from([0, 1, UINT32_MAX]))
_uint64s = st.one_of(
    st.integers(0, UINT64_MAX), st.sampled_from([0, 1, INT64_MAX, INT64_MAX + 1, UINT64_MAX])
)
_conclusion_statuses = st.sampled_from(
    [
        pb.TASK_ACTIVATION_STATUS_COMPLETE,
        pb.TASK_ACTIVATION_STATUS_RETRY,
        pb.TASK_ACTIVATION_STATUS_FAILURE,
    ]
)
# Open proto3 enums take any int32; only FAILURE, RETRY and COMPLETE are results, and they
# are drawn most often, so that results apply.
_statuses = st.one_of(
    _conclusion_statuses,
    _conclusion_statuses,
    st.sampled_from(list(pb.TaskActivationStatus.values())),
    st.integers(-(2**31), 2**31 - 1),
)


_live_ids = st.integers(0, _ID_SLOTS - 1).map(_placeholder)
# Mostly live ids, so that results apply; now and then unknown or empty ones.
_ids = st.one_of(_live_ids, _live_ids, _live_ids, _texts, st.just(""))


def _filters() -> st.SearchStrategy[dict[str, str]]:
    # Mostly the seeded tasks' namespace, so claims hand out real tasks to conclude.
    return st.fixed_dictionaries(
        {}, optional={"namespace": st.one_of(st.just(NAMESPACE), _texts), "application": _texts}
    )


def _results(message: type[Message]) -> st.SearchStrategy[Any]:
    fields = {
        "id": _ids,
        "status": _statuses,
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "max_attempts": _uint32s,
        "delay_on_retry": _uint64s,
    }
    if message is pb.SetTaskStatusRequest:
        optional["fetch_next_task"] = _filters().map(lambda f: pb.FetchNextTask(**f))
    return st.fixed_dictionaries(fields, optional=optional).map(lambda f: message(**f))


def _fetches() -> st.SearchStrategy[batch_pb2.FetchTasksRequest]:
    return st.builds(
        lambda filters, max_tasks, wait_ms: batch_pb2.FetchTasksRequest(
            **filters, max_tasks=max_tasks, wait_ms=wait_ms
        ),
        _filters(),
        _uint32s,
        _uint32s,
    )


def _valid_requests(method: Method) -> st.SearchStrategy[Message]:
    builders: dict[str, st.SearchStrategy[Message]] = {
        "GetTask": _filters().map(lambda f: pb.GetTaskRequest(**f)),
        "SetTaskStatus": _results(pb.SetTaskStatusRequest),
        "SetBatchActivationStatus": st.lists(_results(pb.SetTaskStatusRequest), max_size=3).map(
            lambda updates: pb.SetBatchActivationStatusRequest(updates=updates)
        ),
        "FetchTasks": _fetches(),
        "ReportResults": st.lists(_results(batch_pb2.TaskResult), max_size=3).map(
            lambda results: batch_pb2.ReportResultsRequest(results=results)
        ),
        "ReportAndFetch": st.builds(
            lambda results, fetch: batch_pb2.ReportAndFetchRequest(results=results, fetch=fetch),
            st.lists(_results(batch_pb2.TaskResult), max_size=3),
            _fetches(),
        ),
    }
    return builders[method.name]


@st.composite
def _foreign_field(draw: st.DrawFn) -> bytes:
    """A field with a number the message may use, under any wire type, with any payload:
    a string sent as a varint, a nested message as fixed64, a group that never ends."""
    number = draw(st.integers(1, 20))
    wire_type = draw(st.integers(0, 7))
    key = varint(number << 3 | wire_type)
    payloads = {
        0: st.integers(0, UINT64_MAX).map(varint),
        1: st.binary(min_size=8, max_size=8),
        2: st.binary(max_size=16).map(lambda b: varint(len(b)) + b),
        5: st.binary(min_size=4, max_size=4),
    }
    # Wire types 3 and 4 (groups) and 6, 7 (none) take whatever follows.
    payload = draw(payloads.get(wire_type, st.binary(max_size=8)))
    return key + payload


@st.composite
def _truncated(draw: st.DrawFn, valid: bytes) -> bytes:
    return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]


@st.composite
def _bit_flipped(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid or b"\x00")
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def _spliced(draw: st.DrawFn, valid: bytes) -> bytes:
    at = draw(st.integers(0, len(valid)))
    return valid[:at] + draw(st.binary(min_size=1, max_size=16)) + valid[at:]


@st.composite
def _overlong(draw: st.DrawFn, valid: bytes) -> bytes:
    """A length-delimited field that claims far more bytes than follow."""
    key = varint(draw(st.integers(1, 5)) << 3 | 2)
    return valid + key + varint(draw(st.integers(2**20, 2**31)))


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        _truncated(valid),
        _bit_flipped(valid),
        _spliced(valid),
        _foreign_field().map(lambda field: valid + field),
        _overlong(valid),
    )


def _request_bytes(method: Method) -> st.SearchStrategy[bytes]:
    valid = _valid_requests(method).map(lambda m: m.SerializeToString())
    # Well-formed requests twice as often as either kind of garbage: their odd values
    # (huge numbers, bad enums, live or unknown ids) reach the state, past the parsing.
    return st.one_of(st.binary(max_size=256), valid, valid, valid.flatmap(_mutated))


_FUZZ: Final = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- Kafka ---------------------------------------------------------------------------------------


def expected_reason(value: bytes | None) -> str | None:
    """Why the broker must dead-letter `value` (DECODE_REASONS, checked in the order WIRE.md
    implies: a TaskActivation at all, then the fields every transition needs), or None for
    an activation it must ingest. No value at all (a tombstone) is an empty activation."""
    try:
        activation = pb.TaskActivation.FromString(value or b"")
    except DecodeError:
        return "not a TaskActivation"
    for required in ("id", "namespace", "taskname"):
        if not getattr(activation, required):
            return f"missing {required}"
    return None


@st.composite
def _activations(draw: st.DrawFn) -> bytes:
    """Activations with every field drawn: empty required ones, extreme numbers, bad enums."""
    message = pb.TaskActivation(
        id=draw(st.one_of(st.just(""), st.uuids().map(str), _texts)),
        namespace=draw(st.one_of(st.just(""), _texts)),
        taskname=draw(st.one_of(st.just(""), _texts)),
        application=draw(_texts),
        parameters_bytes=draw(st.binary(max_size=32)),
        headers=draw(st.dictionaries(_texts, _texts, max_size=3)),
        processing_deadline_duration=draw(_uint64s),
        retry_state=pb.RetryState(
            attempts=draw(_uint32s),
            max_attempts=draw(_uint32s),
            # Open enums: a newer producer's value, or any int32.
            on_attempts_exceeded=draw(st.integers(-(2**31), 2**31 - 1)),  # type: ignore[arg-type]
            at_most_once=draw(st.booleans()),
            delay_on_retry=draw(_uint64s),
        ),
    )
    if draw(st.booleans()):
        message.expires = draw(_uint64s)
    if draw(st.booleans()):
        message.delay = draw(_uint64s)
    if draw(st.booleans()):
        message.received_at.seconds = draw(st.integers(-(2**63), INT64_MAX))
        message.received_at.nanos = draw(st.integers(-(2**31), 2**31 - 1))
    return message.SerializeToString()


# A string field whose bytes are not UTF-8: protobuf refuses the whole message.
_NOT_UTF8: Final = b"\x0a\x02\xff\xfe" + b"\x12\x01n\x1a\x01t"

_kafka_values = st.one_of(
    st.binary(max_size=256),
    st.none(),
    st.just(_NOT_UTF8),
    _activations(),
    _activations().flatmap(_mutated),
)
# WIRE.md: "key and Kafka headers are not used"; any of them must change nothing.
_kafka_messages = st.builds(
    KafkaMessage,
    _kafka_values,
    st.none() | st.binary(max_size=16),
    st.lists(st.tuples(_texts, st.binary(max_size=16)), max_size=3).map(tuple),
)


def test_kafka_garbage_is_dead_lettered_with_its_reason_and_the_rest_ingested(
    target: Target,
) -> None:
    produced: dict[int, tuple[bytes, str | None]] = {}

    @settings(_FUZZ, max_examples=60)
    @given(messages=st.lists(_kafka_messages, min_size=1, max_size=6))
    # Each reason at least once, whatever the draws bring.
    @example(
        messages=[
            KafkaMessage(value)
            for value in (
                encode_activation(activation_id=""),
                encode_activation(namespace=""),
                encode_activation(taskname=""),
                b"\xff",
                encode_activation(),
            )
        ]
    )
    def burst(messages: list[KafkaMessage]) -> None:
        offsets = _produce(target.kafka, target.topic, messages)
        for offset, message in zip(offsets, messages, strict=True):
            produced[offset] = (message.value or b"", expected_reason(message.value))
        target.assert_healthy()

    burst()
    bad = {offset: pair for offset, pair in produced.items() if pair[1] is not None}
    # The mix exercised every reason, and some messages that are fine.
    assert {reason for _, reason in bad.values()} == set(DECODE_REASONS)
    assert len(bad) < len(produced)

    dead_letters: dict[int, tuple[bytes, dict[str, bytes]]] = {}

    def all_dead_lettered() -> bool:
        dead_letters.update(_decode_dead_letters(target))
        return bad.keys() <= dead_letters.keys()

    wait_for(all_dead_lettered, 60, "every bad message in the dead-letter topic")
    # Only the bad ones: a usable activation is ingested, never dead-lettered for decoding.
    assert dead_letters.keys() == bad.keys()
    for offset, (value, reason) in bad.items():
        letter_value, headers = dead_letters[offset]
        assert letter_value == value, f"offset {offset}: the bytes changed"
        assert headers[DECODE_ERROR_HEADER].decode() == reason, f"offset {offset}"
        assert headers[SOURCE_TOPIC_HEADER].decode() == target.topic
        assert headers[SOURCE_PARTITION_HEADER] == b"0"
    target.assert_healthy()


def _decode_dead_letters(target: Target) -> dict[int, tuple[bytes, dict[str, bytes]]]:
    """The dead letters of decoding (those with the reason header) by source offset; the
    dead-letter topic also holds tasks that failed, which carry no such header."""
    consumer = Consumer(
        {
            "bootstrap.servers": target.kafka.bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        },
        logger=_log,
    )
    letters: dict[int, tuple[bytes, dict[str, bytes]]] = {}
    try:
        consumer.assign([TopicPartition(target.dlq, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                break  # the end of the partition
            # A consumed message's headers are a list of (str, bytes) pairs.
            pairs = cast(list[tuple[str, bytes]], message.headers() or [])
            headers = dict(pairs)
            if DECODE_ERROR_HEADER in headers:
                offset = int(headers[SOURCE_OFFSET_HEADER])
                letters[offset] = (message.value() or b"", headers)
    finally:
        consumer.close()
    return letters


# --- gRPC ----------------------------------------------------------------------------------------


def _fuzz_every_method(target: Target, max_examples: int) -> None:
    @settings(_FUZZ, max_examples=max_examples)
    @given(data=st.data())
    def burst(data: st.DataObject) -> None:
        calls = data.draw(
            st.lists(
                st.sampled_from(METHODS).flatmap(lambda m: _request_bytes(m).map(lambda b: (m, b))),
                min_size=1,
                max_size=8,
            ),
            label="burst",
        )
        for method, request in calls:
            code, details, response = target.call(method, target.with_live_ids(request))
            target.check_answer(method, code, details, response)
        target.assert_healthy()

    burst()


def _conclusions(target: Target, outcome: str) -> float:
    value = sample(
        scrape(target.metrics_url),
        "taskbroker_state_conclusions",
        "taskbroker_state_conclusions_total",
        outcome=outcome,
    )
    return value or 0.0


def test_every_grpc_method_answers_garbage_with_a_wire_status(target: Target) -> None:
    # After the Kafka garbage (tests run in file order): the claims also hand out the
    # odd activations it left, and results and retries apply to them.
    _fuzz_every_method(target, max_examples=300)
    # Not a vacuous run: mutated results met live tasks (claimed by the bursts' own
    # fetches), not only unknown ids.
    assert _conclusions(target, "applied") > 0


@pytest.fixture(scope="module")
def push_target(kafka: EmbeddedKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with _running(kafka, tmp_path_factory.mktemp("garbage-in-push"), pulls=False) as running:
        yield running


def test_in_push_delivery_every_method_answers_garbage_with_a_wire_status(
    push_target: Target,
) -> None:
    _fuzz_every_method(push_target, max_examples=100)


SECRETS: Final = ("old-key", "new-key")
"""Two keys, as during a rotation: a request signed under either one is accepted."""


@pytest.fixture(scope="module")
def signed_target(
    kafka: EmbeddedKafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    with _running(kafka, tmp_path_factory.mktemp("garbage-in-signed"), SECRETS) as running:
        yield running


# How a call is signed, and whether the broker must accept the signature.
_SIGNINGS: Final = {
    "unsigned": False,
    "old key": True,
    "new key": True,
    "another key": False,
    "another method's": False,
    "garbage": False,
}


def _signature(method: Method, request: bytes, signing: str, garbage: str) -> str | None:
    if signing == "unsigned":
        return None
    if signing == "garbage":
        return garbage
    if signing == "another method's":
        other = METHODS[(METHODS.index(method) + 1) % len(METHODS)]
        return sign(SECRETS[0], other.path, request)
    key = {"old key": SECRETS[0], "new key": SECRETS[1], "another key": "not-a-key"}[signing]
    return sign(key, method.path, request)


# Metadata values a client can send at all: printable ASCII.
_garbage_signatures = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)


def test_a_signing_broker_refuses_every_bad_signature_and_answers_signed_garbage(
    signed_target: Target,
) -> None:
    @settings(_FUZZ, max_examples=100)
    @given(data=st.data())
    def burst(data: st.DataObject) -> None:
        calls = data.draw(
            st.lists(
                st.tuples(
                    st.sampled_from(METHODS).flatmap(
                        lambda m: _request_bytes(m).map(lambda b: (m, b))
                    ),
                    st.sampled_from(sorted(_SIGNINGS)),
                    _garbage_signatures,
                ),
                min_size=1,
                max_size=6,
            ),
            label="burst",
        )
        for (method, drawn), signing, garbage in calls:
            request = signed_target.with_live_ids(drawn)
            code, details, response = signed_target.call(
                method, request, _signature(method, request, signing, garbage)
            )
            if _SIGNINGS[signing]:
                signed_target.check_answer(method, code, details, response)
            else:
                assert code is grpc.StatusCode.UNAUTHENTICATED, f"{signing}: {details}"
        signed_target.assert_healthy()

    burst()


def _flushes(target: Target) -> float:
    count = sample(
        scrape(target.metrics_url),
        "taskbroker_writer_flush_rows",
        "taskbroker_writer_flush_rows_count",
    )
    return count or 0.0


def _wait_for_a_flush(target: Target) -> None:
    before = _flushes(target)
    wait_for(lambda: _flushes(target) > before, 30, "the writer to commit a flush")


def test_durations_beyond_what_sqlite_holds_are_kept_capped(target: Target) -> None:
    """Found by the fuzzing: uint64 durations above 2**63 - 1 (valid on the wire) stopped
    the writer ("Python int too large to convert to SQLite INTEGER"), and with it the
    broker. A deterministic case of each way in: the activation's own fields from Kafka,
    and a worker's RETRY with such a delay_on_retry."""
    namespace = f"huge-{uuid.uuid4().hex[:8]}"
    activation = pb.TaskActivation(
        id=uuid.uuid4().hex,
        namespace=namespace,
        taskname="huge.durations",
        processing_deadline_duration=UINT64_MAX,
        retry_state=pb.RetryState(max_attempts=3, delay_on_retry=UINT64_MAX),
    )
    _produce(target.kafka, target.topic, [KafkaMessage(activation.SerializeToString())])
    claim = pb.GetTaskRequest(namespace=namespace).SerializeToString()

    def claimed() -> bool:
        code, _, response = target.call(METHODS[0], claim)
        return code is grpc.StatusCode.OK and pb.GetTaskResponse.FromString(response).task.id == (
            activation.id
        )

    wait_for(claimed, 30, "the activation to be handed out")
    _wait_for_a_flush(target)
    target.assert_healthy()

    retry = pb.SetTaskStatusRequest(
        id=activation.id, status=pb.TASK_ACTIVATION_STATUS_RETRY, delay_on_retry=UINT64_MAX
    )
    code, details, _ = target.call(METHODS[1], retry.SerializeToString())
    assert code is grpc.StatusCode.OK, details
    _wait_for_a_flush(target)
    target.assert_healthy()
