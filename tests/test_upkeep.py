"""Upkeep against the embedded Kafka and a real state actor: retries and dead letters are
produced, confirmed only when Kafka acknowledged them, and health follows the heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pykka
import pytest

from actors.activation import decode_record, encode_activation
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.messages import Claim, Conclude, Ingest, Maintain, SetServing, Stats
from actors.producer import KafkaProducer, ProducerConfig
from actors.records import KafkaOffset, OnAttemptsExceeded, Record, Status
from actors.runtime import BrokerActor, MailboxConfig, MailboxPolicy
from actors.state import StateActor, StateConfig
from actors.statemachine import Limits
from actors.upkeep import HealthMonitor, Heartbeat, Upkeep, UpkeepConfig
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from tests.kafka_support import read_values
from tests.recipients import Collector

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

TIMEOUT_S = 10.0


@pytest.fixture
def actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


def ask(ref: pykka.ActorRef[Any], message: object) -> Any:
    return ref.ask(message, block=True, timeout=TIMEOUT_S)


def record(activation_id: str, **fields: Any) -> Record:
    value = encode_activation(activation_id=activation_id, namespace="ns", **fields)
    return decode_record(value, 0, 0, time.time(), max_delay_s=3600)


def concluded(state: pykka.ActorRef[Any], rec: Record, status: Status) -> None:
    state.tell(Ingest((rec,), (KafkaOffset(rec.partition, rec.offset),)))
    assert ask(state, Claim()) == rec.activation
    ask(state, Conclude(rec.id, status))


def start_upkeep(
    state: pykka.ActorRef[Any], bootstrap: str, topic: str, dlq: str, **settings: Any
) -> pykka.ActorRef[Upkeep]:
    defaults: dict[str, Any] = {"interval_ms": 100, "produce_timeout_ms": 5000}
    config = UpkeepConfig(retry_topic=topic, deadletter_topic=dlq, **(defaults | settings))
    producer = KafkaProducer(
        ProducerConfig(bootstrap_servers=bootstrap, delivery_timeout_ms=config.produce_timeout_ms)
    )
    return Upkeep.start(config, state=state, producer=producer)


def wait_until_gone(state: pykka.ActorRef[Any], status: Status) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (stats := ask(state, Stats())).by_status[status]:
        assert time.monotonic() < deadline, f"{status.name} records stayed: {stats}"
        time.sleep(0.05)


@pytest.mark.kafka
@pytest.mark.usefixtures("actors")
def test_retry_is_produced_with_a_new_id_and_then_finished(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory
) -> None:
    topic, dlq = kafka_topics()
    state = StateActor.start(StateConfig(), MailboxConfig())
    original = record("r1", max_attempts=3, delay_on_retry_s=4)
    concluded(state, original, Status.RETRY)
    start_upkeep(state, kafka.bootstrap, topic, dlq)
    wait_until_gone(state, Status.RETRY)
    ((value, _),) = read_values(kafka.bootstrap, topic, count=1)
    retry = pb.TaskActivation.FromString(value)
    assert retry.id != "r1"
    assert retry.retry_state.attempts == 1
    assert retry.delay == 4
    assert len(ask(state, Stats()).by_group) == 0


@pytest.mark.kafka
@pytest.mark.usefixtures("actors")
def test_dead_letter_carries_the_original_bytes(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory
) -> None:
    topic, dlq = kafka_topics()
    state = StateActor.start(StateConfig(), MailboxConfig())
    failed = record("d1", on_attempts_exceeded=OnAttemptsExceeded.DEADLETTER)
    concluded(state, failed, Status.FAILURE)
    start_upkeep(state, kafka.bootstrap, topic, dlq)
    wait_until_gone(state, Status.FAILURE)
    assert read_values(kafka.bootstrap, dlq, count=1) == [(failed.activation, [])]


@pytest.mark.usefixtures("actors")
def test_a_dead_kafka_leaves_the_records_for_the_next_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = StateActor.start(StateConfig(), MailboxConfig())
    concluded(state, record("r1", max_attempts=3), Status.RETRY)
    dead = f"127.0.0.1:{free_port()}"
    upkeep = start_upkeep(state, dead, "t", "t-dlq", produce_timeout_ms=200)
    with caplog.at_level(logging.WARNING, logger="actors.upkeep"):
        time.sleep(1.5)  # several ticks, every produce fails
        upkeep.stop(timeout=TIMEOUT_S)
    assert ask(state, Stats()).by_status[Status.RETRY] == 1
    warnings = [r for r in caplog.records if "not acknowledged" in r.getMessage()]
    assert len(warnings) == 1  # once per failure streak, not once per tick


@pytest.mark.usefixtures("actors")
def test_deadline_resets_wait_for_the_startup_grace() -> None:
    state = StateActor.start(StateConfig(), MailboxConfig())
    rec = record("p1", processing_deadline_duration_s=0)
    state.tell(Ingest((rec,), ()))
    ask(state, Claim())
    dead = f"127.0.0.1:{free_port()}"
    start_upkeep(state, dead, "t", "t-dlq", deadline_reset_skip_after_startup_s=3600)
    time.sleep(0.5)
    assert ask(state, Stats()).by_status[Status.PROCESSING] == 1


@pytest.mark.usefixtures("actors")
def test_deadline_resets_run_after_the_grace() -> None:
    state = StateActor.start(
        StateConfig(limits=Limits(processing_deadline_grace_s=0)),
        MailboxConfig(),
    )
    rec = record("p1", processing_deadline_duration_s=0)
    state.tell(Ingest((rec,), ()))
    ask(state, Claim())
    dead = f"127.0.0.1:{free_port()}"
    start_upkeep(state, dead, "t", "t-dlq", deadline_reset_skip_after_startup_s=0)
    deadline = time.monotonic() + TIMEOUT_S
    while ask(state, Stats()).by_status[Status.PENDING] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ask(state, Claim()) == rec.activation  # handed out again


@pytest.mark.usefixtures("actors")
def test_maintenance_is_asked_of_the_writer_on_its_interval() -> None:
    state = StateActor.start(StateConfig(), MailboxConfig())
    writer = Collector()
    config = UpkeepConfig(
        retry_topic="t",
        deadletter_topic="t-dlq",
        interval_ms=50,
        maintenance_interval_s=0.1,
        full_vacuum_interval_s=0.25,
    )
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=f"127.0.0.1:{free_port()}"))
    Upkeep.start(config, state=state, producer=producer, writer=writer)
    told = writer.wait_for(Maintain, 4)
    assert any(m.full_vacuum for m in told)
    assert not told[0].full_vacuum


def test_health_follows_readiness_and_the_heartbeat() -> None:
    now = [0.0]
    heartbeat = Heartbeat(clock=lambda: now[0])
    frontend = Collector()
    monitor = HealthMonitor(heartbeat, frontend, unhealthy_after_s=5.0)
    monitor.check()
    heartbeat.beat()
    monitor.check()  # beating, but not ready yet
    monitor.set_ready(True)
    now[0] = 4.0
    monitor.check()  # still fresh: no news
    now[0] = 6.0
    monitor.check()  # stale
    heartbeat.beat()
    monitor.check()
    assert [m.serving for m in frontend.wait_for(SetServing, 4)] == [False, True, False, True]


class StuckState(BrokerActor):
    """A state actor that never gets through its mailbox (size 1, policy fail)."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        super().__init__("stuck-state", MailboxConfig(size=1, policy=MailboxPolicy.FAIL))
        self._entered = entered
        self._release = release

    def handle(self, message: object) -> object:
        self._entered.set()
        self._release.wait(TIMEOUT_S)
        return None


@pytest.mark.usefixtures("actors")
def test_an_overloaded_state_sheds_ticks_without_killing_upkeep(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered, release = threading.Event(), threading.Event()
    state = StuckState.start(entered, release)
    state.tell("occupy the actor")
    assert entered.wait(TIMEOUT_S)
    state.tell("fill the mailbox")
    dead = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="actors.upkeep"):
        upkeep = start_upkeep(state, dead, "t", "t-dlq", interval_ms=50)
        time.sleep(0.5)
    assert upkeep.is_alive()
    assert any("tick skipped" in r.getMessage() for r in caplog.records)
    release.set()


def test_health_waits_for_the_first_partition_assignment() -> None:
    heartbeat, frontend, consuming = Heartbeat(), Collector(), threading.Event()
    monitor = HealthMonitor(heartbeat, frontend, unhealthy_after_s=5.0, consuming=consuming)
    heartbeat.beat()
    monitor.set_ready(True)  # restored and started, but no partition yet
    consuming.set()
    monitor.check()
    assert [m.serving for m in frontend.wait_for(SetServing, 2)] == [False, True]
