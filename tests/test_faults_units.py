"""The plain pieces behind the fault promises, without a thread or a Kafka: when Kafka is
called silent, and when a wait on Kafka keeps upkeep's heartbeat fresh."""

from __future__ import annotations

import pytest

from actors.consumer import KafkaSilence
from actors.upkeep import Heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def statistics(**brokers: tuple[str, int]) -> dict[str, object]:
    """librdkafka's statistics, cut to what is read: each broker's state and rxidle (µs)."""
    return {"brokers": {name: {"state": s, "rxidle": idle} for name, (s, idle) in brokers.items()}}


def test_kafka_is_silent_from_the_start_until_something_is_received() -> None:
    clock = Clock()
    silence = KafkaSilence(unreachable_after_s=6.0, clock=clock)
    clock.now += 5.0
    silence.observe(statistics(bootstrap=("APIVERSION_QUERY", -1)))
    assert silence.answering()
    clock.now += 1.0
    assert silence.silent_s() == 6.0
    assert not silence.answering()


def test_the_most_recent_receive_of_any_connection_counts() -> None:
    clock = Clock()
    silence = KafkaSilence(unreachable_after_s=6.0, clock=clock)
    clock.now += 10.0
    # The leader answered 0.5 s ago; the coordinator has been quiet for 8 s.
    silence.observe(statistics(leader=("UP", 500_000), coordinator=("UP", 8_000_000)))
    assert silence.silent_s() == 0.5
    assert silence.answering()


def test_a_connection_that_is_not_up_does_not_count_as_an_answer() -> None:
    clock = Clock()
    silence = KafkaSilence(unreachable_after_s=6.0, clock=clock)
    clock.now += 7.0
    silence.observe(statistics(leader=("CONNECT", 0)))
    assert not silence.answering()


def test_a_hung_kafka_turns_silent_and_an_answer_ends_it() -> None:
    clock = Clock()
    silence = KafkaSilence(unreachable_after_s=6.0, clock=clock)
    silence.observe(statistics(leader=("UP", 10_000)))
    for _ in range(7):  # a hung Kafka: the connection stays UP, nothing is received
        clock.now += 1.0
        silence.observe(statistics(leader=("UP", int((clock.now - 100.0) * 1e6))))
    assert not silence.answering()
    clock.now += 1.0
    silence.observe(statistics(leader=("UP", 20_000)))
    assert silence.answering()
    # An older document, read late, never moves the last answer back.
    silence.observe(statistics(leader=("UP", 5_000_000)), now=clock.now - 1.0)
    assert silence.silent_s() == pytest.approx(0.02)


def test_idle_times_count_from_when_the_document_was_written() -> None:
    clock = Clock()
    silence = KafkaSilence(unreachable_after_s=6.0, clock=clock)
    # Written at 101 s with the leader heard 0.1 s before, read only at 108 s.
    document = statistics(leader=("UP", 100_000)) | {"ts": 101_000_000}
    clock.now = 108.0
    silence.observe(document)
    assert silence.silent_s() == pytest.approx(7.1)
    assert not silence.answering()
    # A stamp on some other clock is not trusted: read as written when it was read.
    silence.observe(statistics(leader=("UP", 100_000)) | {"ts": 5_000_000})
    assert silence.silent_s() == pytest.approx(0.1)


def test_statistics_without_brokers_change_nothing() -> None:
    clock = Clock()
    silence = KafkaSilence(unreachable_after_s=6.0, clock=clock)
    clock.now += 2.0
    silence.observe({"name": "consumer"})
    assert silence.silent_s() == 2.0


def test_an_announced_wait_on_kafka_keeps_the_heartbeat_fresh_until_it_is_over() -> None:
    clock = Clock()
    heartbeat = Heartbeat(clock)
    assert heartbeat.age_s() is None
    heartbeat.beat(waiting_s=10.0)
    clock.now += 9.0
    assert heartbeat.age_s() == 0.0
    clock.now += 3.0  # the wait overran what it announced by 2 s
    assert heartbeat.age_s() == 2.0
    heartbeat.beat()
    clock.now += 1.0
    assert heartbeat.age_s() == 1.0
