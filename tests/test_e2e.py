"""The broker end to end: the embedded Kafka, `taskbroker run` as a child process, and a
small worker pool over gRPC. Every activation's fate is checked; restarts lose nothing."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import grpc
import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage

from actors.activation import encode_activation
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from actors.records import OnAttemptsExceeded
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from tests.broker_process import BrokerProcess, run_args, wait_for
from tests.kafka_support import read_values

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# How many activations of each kind; the worker acts on the task name.
MIX = {
    "ok": 600,
    "retry": 100,
    "deadletter": 50,
    "discard": 50,
    "overrun": 50,
    "at_most_once": 50,
    "expired": 50,
    "delayed": 50,
}
DELAY_S = 3
RUN_TIMEOUT_S = 90.0

# What a real worker retries: the broker is stopping, restarting or overloaded.
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)

Status: TypeAlias = pb.TaskActivationStatus


@dataclass
class Ledger:
    """What the workers saw: every hand-out, by id, with its time and retry attempt."""

    handed_out: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    taskname_of: dict[str, str] = field(default_factory=dict)
    attempts_of: dict[str, int] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, task: pb.TaskActivation) -> int:
        with self.lock:
            self.handed_out[task.id].append(time.time())
            self.taskname_of[task.id] = task.taskname
            self.attempts_of[task.id] = task.retry_state.attempts
            return len(self.handed_out[task.id])


class Workers:
    """Threads that GetTask, act by task name, and SetTaskStatus with fetch_next."""

    def __init__(self, target: str, ledger: Ledger, threads: int = 4) -> None:
        self._target = target
        self._ledger = ledger
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Workers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _decide(self, task: pb.TaskActivation, seen: int) -> Status | None:
        """The status to report, or None to act like a worker that died or skipped it."""
        name = task.taskname
        if name == "retry" and task.retry_state.attempts == 0:
            return pb.TASK_ACTIVATION_STATUS_RETRY
        if name in ("deadletter", "discard"):
            return pb.TASK_ACTIVATION_STATUS_FAILURE
        if name == "at_most_once" or (name == "overrun" and seen == 1):
            return None
        return pb.TASK_ACTIVATION_STATUS_COMPLETE

    def _run(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            task: pb.TaskActivation | None = None
            while not self._stopping.is_set():
                if task is None:
                    task = self._get(stub)
                    if task is None:
                        continue
                status = self._decide(task, self._ledger.record(task))
                if status is None:
                    task = None
                    continue
                task = self._set(stub, task.id, status)

    def _get(self, stub: pb_grpc.ConsumerServiceStub) -> pb.TaskActivation | None:
        try:
            return stub.GetTask(pb.GetTaskRequest(), timeout=5).task
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.NOT_FOUND and error.code() not in TRANSIENT:
                raise
            time.sleep(0.05)
            return None

    def _set(
        self, stub: pb_grpc.ConsumerServiceStub, task_id: str, status: Status
    ) -> pb.TaskActivation | None:
        request = pb.SetTaskStatusRequest(
            id=task_id, status=status, fetch_next_task=pb.FetchNextTask()
        )
        while not self._stopping.is_set():
            try:
                response = stub.SetTaskStatus(request, timeout=5)
            except grpc.RpcError as error:
                if error.code() not in TRANSIENT:
                    raise
                time.sleep(0.1)  # workers retry, as real ones do
                continue
            if status == pb.TASK_ACTIVATION_STATUS_COMPLETE:
                with self._ledger.lock:
                    self._ledger.completed.add(task_id)
            return response.task if response.HasField("task") else None
        return None


@dataclass
class Scenario:
    topic: str
    dlq: str
    ids_by_kind: dict[str, set[str]]
    produced_at: dict[str, float]


def produce_mix(kafka: EmbeddedKafka, topic: str, dlq: str) -> Scenario:
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
    ids_by_kind: dict[str, set[str]] = defaultdict(set)
    produced_at: dict[str, float] = {}
    messages = []
    now = time.time()
    for kind, count in MIX.items():
        for _ in range(count):
            activation_id = f"{kind}-{uuid.uuid4().hex[:10]}"
            ids_by_kind[kind].add(activation_id)
            produced_at[activation_id] = now
            fields: dict[str, object] = {"processing_deadline_duration_s": 60}
            if kind == "retry":
                fields.update(max_attempts=2)
            elif kind == "deadletter":
                fields.update(on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER)
            elif kind in ("overrun", "at_most_once"):
                fields.update(processing_deadline_duration_s=1, at_most_once=kind == "at_most_once")
            elif kind == "expired":
                fields.update(received_at=now - 60, expires_s=30)
            elif kind == "delayed":
                fields.update(delay_s=DELAY_S)
            value = encode_activation(
                activation_id=activation_id,
                namespace="e2e",
                taskname=kind,
                **fields,  # type: ignore[arg-type]
            )
            messages.append(OutgoingMessage(activation_id, topic, value))
    report = producer.produce_many(messages, timeout_s=30)
    producer.close(timeout_s=5)
    assert report.all_acknowledged, report.failed
    return Scenario(topic, dlq, ids_by_kind, produced_at)


@pytest.fixture
def broker_args(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> tuple[list[str], str, str, str]:
    topic, dlq = kafka_topics(partitions=2)
    grpc_port = free_port()
    args = run_args(kafka, topic, dlq, tmp_path / "broker.sqlite", grpc_port)
    return args, f"127.0.0.1:{grpc_port}", topic, dlq


def settled(scenario: Scenario, ledger: Ledger) -> bool:
    """Every kind that ends in a completion has completed; retries ran their second try."""
    with ledger.lock:
        completed = set(ledger.completed)
        retried = [
            i
            for i, name in ledger.taskname_of.items()
            if name == "retry" and ledger.attempts_of[i] == 1
        ]
    kinds = scenario.ids_by_kind
    done = all(kinds[k] <= completed for k in ("ok", "overrun", "delayed"))
    return done and len([i for i in retried if i in completed]) >= MIX["retry"]


def check_fates(
    scenario: Scenario, ledger: Ledger, kafka: EmbeddedKafka, *, exactly_once: bool
) -> int:
    """Assert every activation's fate; returns how many hand-outs were duplicates."""
    kinds = scenario.ids_by_kind
    handed = ledger.handed_out
    duplicates = 0
    for activation_id in kinds["ok"] | kinds["delayed"]:
        assert handed[activation_id], f"{activation_id} never ran"
        duplicates += len(handed[activation_id]) - 1
    for activation_id in kinds["delayed"]:
        first = handed[activation_id][0]
        assert first >= scenario.produced_at[activation_id] + DELAY_S - 0.5, "handed out early"
    for activation_id in kinds["expired"]:
        assert not handed.get(activation_id), f"expired {activation_id} was handed out"
    for activation_id in kinds["overrun"]:
        assert len(handed[activation_id]) >= 2, "an overrun task was not run again"
    for activation_id in kinds["at_most_once"]:
        assert len(handed[activation_id]) >= 1
        duplicates += len(handed[activation_id]) - 1
    retries = [
        i
        for i, name in ledger.taskname_of.items()
        if name == "retry" and ledger.attempts_of[i] == 1
    ]
    assert len(set(retries) & ledger.completed) >= MIX["retry"]
    assert not set(retries) & kinds["retry"], "a retry kept its original id"
    dead = read_values(kafka.bootstrap, scenario.dlq, count=MIX["deadletter"], partitions=2)
    dead_ids = {pb.TaskActivation.FromString(value).id for value, _ in dead}
    assert kinds["deadletter"] <= dead_ids
    assert not kinds["discard"] & dead_ids
    if exactly_once:
        assert duplicates == 0, f"{duplicates} duplicate executions in a clean run"
        for activation_id in kinds["at_most_once"]:
            assert len(handed[activation_id]) == 1, "an at_most_once task ran twice"
    return duplicates


def test_every_activation_reaches_its_fate(
    kafka: EmbeddedKafka, broker_args: tuple[list[str], str, str, str], tmp_path: Path
) -> None:
    args, target, topic, dlq = broker_args
    ledger = Ledger()
    with BrokerProcess(args, tmp_path / "broker.log") as broker:
        broker.start()
        scenario = produce_mix(kafka, topic, dlq)
        with Workers(target, ledger):
            wait_for(lambda: settled(scenario, ledger), RUN_TIMEOUT_S, "every fate")
            time.sleep(2.5)  # past the at_most_once deadlines: they must not come back
        check_fates(scenario, ledger, kafka, exactly_once=True)
        assert broker.stop() == 0, broker.log


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_a_restart_in_the_middle_of_the_load_loses_nothing(
    kafka: EmbeddedKafka,
    broker_args: tuple[list[str], str, str, str],
    tmp_path: Path,
    crash: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, target, topic, dlq = broker_args
    ledger = Ledger()
    with BrokerProcess(args, tmp_path / "broker.log") as broker:
        broker.start()
        scenario = produce_mix(kafka, topic, dlq)
        with Workers(target, ledger):
            wait_for(lambda: len(ledger.completed) >= 200, RUN_TIMEOUT_S, "some progress")
            if crash:
                broker.kill()
            else:
                assert broker.stop() == 0, broker.log
            broker.start()  # the same database file
            wait_for(lambda: settled(scenario, ledger), RUN_TIMEOUT_S, "every fate after restart")
            time.sleep(2.5)
        duplicates = check_fates(scenario, ledger, kafka, exactly_once=False)
        assert broker.stop() == 0, broker.log
    with capsys.disabled():
        print(f"\n{'SIGKILL' if crash else 'SIGTERM'} restart: {duplicates} duplicate executions")


def assigned_partitions(metrics_port: int) -> int:
    """How many partitions the broker's consumer holds, as its /status last saw them."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/status", timeout=5) as page:
            status = json.load(page)
    except OSError:
        return 0
    return int(status["headline"].get("kafka_assigned_partitions", 0))


def test_two_brokers_in_one_group_split_the_partitions_and_run_every_task_once(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory, tmp_path: Path
) -> None:
    partitions = 4
    topic, dlq = kafka_topics(partitions=partitions)
    with ExitStack() as stack:
        brokers: list[tuple[BrokerProcess, str, int]] = []
        for name in ("a", "b"):
            grpc_port, metrics_port = free_port(), free_port()
            args = run_args(kafka, topic, dlq, tmp_path / f"{name}.sqlite", grpc_port, metrics_port)
            broker = stack.enter_context(BrokerProcess(args, tmp_path / f"{name}.log"))
            broker.start()
            brokers.append((broker, f"127.0.0.1:{grpc_port}", metrics_port))

        def split() -> bool:
            held = [assigned_partitions(metrics_port) for _, _, metrics_port in brokers]
            return sum(held) == partitions and min(held) > 0

        # Produced only once the group is stable: a rebalance with records in flight is the
        # revoke path's business, not this test's.
        wait_for(split, RUN_TIMEOUT_S, "both brokers to hold partitions")
        producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
        ids = {f"split-{uuid.uuid4().hex[:10]}" for _ in range(300)}
        values = {
            i: encode_activation(activation_id=i, namespace="e2e", taskname="ok") for i in ids
        }
        report = producer.produce_many(
            [OutgoingMessage(i, topic, v, key=i.encode()) for i, v in values.items()],
            timeout_s=30,
        )
        producer.close(timeout_s=5)
        assert report.all_acknowledged, report.failed

        ledgers = [Ledger() for _ in brokers]
        with ExitStack() as workers:
            for (_, target, _), ledger in zip(brokers, ledgers, strict=True):
                workers.enter_context(Workers(target, ledger, threads=2))
            wait_for(
                lambda: set().union(*(ledger.completed for ledger in ledgers)) == ids,
                RUN_TIMEOUT_S,
                "every task completed by one broker or the other",
            )
            time.sleep(0.5)  # room for a second hand-out to show
        claimed = [set(ledger.handed_out) for ledger in ledgers]
        assert all(claimed), f"a broker handed out nothing: {[len(c) for c in claimed]}"
        assert not claimed[0] & claimed[1], "both brokers handed out the same task"
        assert claimed[0] | claimed[1] == ids
        runs = {i: len(times) for ledger in ledgers for i, times in ledger.handed_out.items()}
        assert set(runs.values()) == {1}, "a task ran more than once"
        for broker, _, _ in brokers:
            assert broker.stop() == 0, broker.log


def produce_acknowledged(kafka: EmbeddedKafka, topic: str, activation_id: str) -> float:
    """Produce one activation; the monotonic time at which Kafka acknowledged it."""
    acknowledged: list[float] = []

    def delivered(error: KafkaError | None, _message: KafkaMessage) -> None:
        assert error is None, error
        acknowledged.append(time.monotonic())

    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 0})
    value = encode_activation(activation_id=activation_id, namespace="e2e", taskname="latency")
    producer.produce(topic, value, key=activation_id, on_delivery=delivered)
    assert producer.flush(10) == 0, "the produce was not acknowledged"
    return acknowledged[0]


def claim_until(stub: pb_grpc.ConsumerServiceStub, timeout_s: float) -> tuple[str, float]:
    """GetTask in a tight loop: the id handed out and the monotonic time it came."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            task = stub.GetTask(pb.GetTaskRequest(namespace="e2e"), timeout=5).task
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            time.sleep(0.002)
            continue
        return task.id, time.monotonic()
    raise AssertionError(f"nothing claimable in {timeout_s} s")


def test_an_activation_is_claimable_within_200_ms_of_kafka_acknowledging_it(
    kafka: EmbeddedKafka, broker_args: tuple[list[str], str, str, str], tmp_path: Path
) -> None:
    args, target, topic, _ = broker_args
    latencies_s: list[float] = []
    with BrokerProcess(args, tmp_path / "broker.log") as broker:
        broker.start()
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ConsumerServiceStub(channel)
            # The first one waits for the consumer group join; the time measured is not it.
            produce_acknowledged(kafka, topic, "warm-up")
            assert claim_until(stub, RUN_TIMEOUT_S)[0] == "warm-up"
            for attempt in range(3):
                time.sleep(0.3)  # idle: nothing read, nothing in a batch
                acknowledged_at = produce_acknowledged(kafka, topic, f"idle-{attempt}")
                claimed, claimed_at = claim_until(stub, 5.0)
                assert claimed == f"idle-{attempt}"
                latencies_s.append(claimed_at - acknowledged_at)
        assert broker.stop() == 0, broker.log
    # An ingest batch timer (db_insert_batch_max_time_ms, 1000 by default) held each of
    # these back for about a second.
    assert max(latencies_s) < 0.2, latencies_s
