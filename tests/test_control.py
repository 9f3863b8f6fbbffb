"""The incident controls' sources: the rules file (reload on change, a bad file keeps the
old rules) and control actions (persisted beside the database, who/what/when), with the
rules in force told to a collector standing in for the state actor."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import pykka
import pytest

from actors.activation import decode_record, encode_activation
from actors.control import ControlFile, Controls, controls_path
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import ConfigError
from actors.messages import Claim, Ingest, Stats
from actors.producer import KafkaProducer, ProducerConfig
from actors.records import KafkaOffset, Status
from actors.runtime import MailboxConfig
from actors.runtime_rules import RuntimeRules, killswitch_entry
from actors.state import StateActor, StateConfig
from actors.upkeep import Upkeep, UpkeepConfig
from tests.broker_process import wait_for
from tests.kafka_support import read_values

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

TIMEOUT_S = 10.0


class Applied:
    """Records every rule set the controls tell the state."""

    def __init__(self) -> None:
        self.rules: list[RuntimeRules] = []

    def __call__(self, rules: RuntimeRules) -> None:
        self.rules.append(rules)


class Counted:
    def __init__(self) -> None:
        self.loaded = self.failed = 0

    def rules_loaded(self) -> None:
        self.loaded += 1

    def rules_load_failed(self) -> None:
        self.failed += 1


def write(path: Path, text: str) -> None:
    """Write and move the mtime on, so that a change within the clock's resolution shows."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def controls(
    tmp_path: Path, applied: Applied, observer: Counted | None = None, *, with_file: bool = True
) -> Controls:
    return Controls(
        rules_path=tmp_path / "rules.yaml" if with_file else None,
        control_file=ControlFile(controls_path(tmp_path / "broker.sqlite")),
        consumed_topics=["taskworker"],
        apply=applied,
        observer=observer,
        clock=lambda: 1_700_000_000.0,
    )


def test_the_file_is_read_at_start_and_again_when_it_changes(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    write(rules_file, "paused_namespaces: [a]\n")
    applied, counted = Applied(), Counted()
    source = controls(tmp_path, applied, counted)
    assert source.rules.paused_namespaces == {"a"}
    assert not source.check_file(), "an unchanged file is not read again"

    write(rules_file, "paused_namespaces: [b]\ndemoted_namespaces: [c]\n")
    assert source.check_file()
    assert applied.rules[-1].paused_namespaces == {"b"}
    assert applied.rules[-1].demoted_namespaces == {"c"}
    assert counted.loaded == 1


def test_a_bad_file_keeps_the_previous_rules_and_says_why_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules_file = tmp_path / "rules.yaml"
    write(rules_file, "drop_task_killswitch: [t]\n")
    applied, counted = Applied(), Counted()
    source = controls(tmp_path, applied, counted)
    for failures, bad in enumerate(
        ("drop_task_killswitch: [", "demoted_namespaces: [x]\ndemoted_topic: taskworker"), 1
    ):
        write(rules_file, bad)
        with caplog.at_level(logging.ERROR, logger="actors.control"):
            caplog.clear()
            assert not source.check_file()
            assert not source.check_file()
        assert counted.failed == failures, "the same bad file is not read again and again"
        assert source.rules.drop_task_killswitch == (killswitch_entry("t"),)
        assert applied.rules == []
        (line,) = [r.getMessage() for r in caplog.records]
        assert "previous rules stay" in line
        assert "\n" not in line
        assert source.document()["file"]["error"] is not None
    assert "would loop" in source.document()["file"]["error"]

    write(rules_file, "drop_task_killswitch: [u]\n")
    assert source.reload("SIGHUP")
    assert source.rules.drop_task_killswitch == (killswitch_entry("u"),)
    assert source.document()["file"]["error"] is None


def test_a_bad_file_at_start_refuses_to_start(tmp_path: Path) -> None:
    write(tmp_path / "rules.yaml", "paused_namespaces: nope")
    with pytest.raises(ConfigError, match="paused_namespaces: expected a list"):
        controls(tmp_path, Applied())


def test_control_actions_take_effect_and_survive_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    applied = Applied()
    source = controls(tmp_path, applied, with_file=False)
    with caplog.at_level(logging.WARNING, logger="actors.control"):
        source.act({"action": "pause", "namespace": "held"}, "alice")
        source.act(
            {"action": "kill", "taskname": "mail", "select_arg": {"0": "bad"}}, "bob from 10.0.0.1"
        )
        source.act({"action": "demote", "namespace": "noisy"}, "carol")
        again = source.act({"action": "demote", "namespace": "noisy"}, "carol")
    assert again["result"].startswith("already in force")
    assert applied.rules[-1] == RuntimeRules(
        drop_task_killswitch=(killswitch_entry("mail", {0: "bad"}),),
        demoted_namespaces=frozenset({"noisy"}),
        paused_namespaces=frozenset({"held"}),
    )
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3
    assert "by bob from 10.0.0.1 at 2023-11-14 22:13:20 UTC: in force: kill" in logged[1]

    restarted = controls(tmp_path, Applied(), with_file=False)
    assert restarted.rules == applied.rules[-1]
    assert [(a.kind, a.who) for a in restarted.actions] == [
        ("pause", "alice"),
        ("kill", "bob from 10.0.0.1"),
        ("demote", "carol"),
    ]

    answer = restarted.act({"action": "resume", "namespace": "held"}, "alice")
    assert answer["result"] == "resumed: pause namespace held"
    assert controls(tmp_path, Applied(), with_file=False).rules.paused_namespaces == frozenset()
    nothing = restarted.act({"action": "resume", "application": "x"}, "alice")
    assert nothing["result"] == "no control action on that target to resume"


def test_a_rule_the_file_states_outlives_the_resume_of_a_control(tmp_path: Path) -> None:
    write(tmp_path / "rules.yaml", "paused_namespaces: [held]\n")
    source = controls(tmp_path, Applied())
    source.act({"action": "pause", "namespace": "held"}, "alice")
    source.act({"action": "resume", "namespace": "held"}, "alice")
    assert source.rules.paused_namespaces == {"held"}
    document = source.document()
    assert document["effective"]["paused_namespaces"] == ["held"]
    assert document["controls"] == []


@pytest.mark.parametrize(
    ("request_body", "named"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"action": "kill", "taskname": "t"}', "who"),
        (b'{"action": "explode", "namespace": "n", "who": "w"}', "is not one of"),
        (b'{"action": "pause", "who": "w"}', "a namespace or an application"),
        (b'{"action": "pause", "namespace": "n", "application": "a", "who": "w"}', "one"),
        (b'{"action": "demote", "namespace": "n", "select_arg": {"0": 1}, "who": "w"}', "kill"),
        (b'{"action": "kill", "taskname": "t", "select_arg": {"x": 1}, "who": "w"}', "index"),
        (b'{"action": "resume", "who": "w"}', "needs one of"),
        (b'{"action": "kill", "taskname": "t", "colour": 1, "who": "w"}', "colour"),
    ],
)
def test_bad_requests_are_refused_with_a_reason_and_change_nothing(
    tmp_path: Path, request_body: bytes, named: str
) -> None:
    applied = Applied()
    source = controls(tmp_path, applied, with_file=False)
    code, body = source.handle_post(request_body, "127.0.0.1")
    assert code == HTTPStatus.BAD_REQUEST
    assert named in json.loads(body)["error"]
    assert applied.rules == []
    assert not controls_path(tmp_path / "broker.sqlite").exists()


def test_a_demote_to_a_consumed_topic_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "rules.yaml", "demoted_topic: taskworker\n")
    source = controls(tmp_path, Applied())  # no namespace demoted yet: no loop
    code, body = source.handle_post(
        b'{"action": "demote", "namespace": "n", "who": "w"}', "127.0.0.1"
    )
    assert code == HTTPStatus.BAD_REQUEST
    assert "would loop" in json.loads(body)["error"]
    assert source.rules.demoted_namespaces == frozenset()


def test_an_unreadable_control_file_refuses_to_start(tmp_path: Path) -> None:
    controls_path(tmp_path / "broker.sqlite").write_text("{")
    with pytest.raises(ConfigError, match=r"control actions .*broker\.sqlite\.controls\.json"):
        controls(tmp_path, Applied(), with_file=False)


# --- the watcher thread ---------------------------------------------------------------


def test_the_watcher_reloads_a_changed_file_by_itself(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    write(rules_file, "paused_namespaces: [a]\n")
    applied = Applied()
    source = Controls(
        rules_path=rules_file,
        control_file=ControlFile(controls_path(tmp_path / "broker.sqlite")),
        consumed_topics=["taskworker"],
        apply=applied,
        check_interval_s=0.05,
    )
    source.start()
    try:
        write(rules_file, "paused_namespaces: [b]\n")
        wait_for(lambda: bool(applied.rules), 10.0, "the watcher to reload the file")
        assert applied.rules[-1].paused_namespaces == {"b"}
    finally:
        source.stop()


# --- demotion through upkeep, against Kafka -------------------------------------------


@pytest.fixture
def actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


def demoting_state(topic: str) -> tuple[pykka.ActorRef[StateActor], bytes]:
    """A state actor demoting namespace "noisy" to `topic`, holding one such activation."""
    rules = RuntimeRules(demoted_namespaces=frozenset({"noisy"}), demoted_topic=topic)
    state = StateActor.start(StateConfig(), MailboxConfig(), rules=rules)
    value = encode_activation(activation_id="n1", namespace="noisy", kwargs={"k": [1, 2]})
    record = decode_record(value, 0, 0, time.time(), max_delay_s=3600)
    state.tell(Ingest((record,), (KafkaOffset(record.partition, record.offset),)))
    return state, value


def start_upkeep(state: pykka.ActorRef[StateActor], bootstrap: str) -> pykka.ActorRef[Upkeep]:
    config = UpkeepConfig(
        retry_topic="unused", deadletter_topic="unused", interval_ms=100, produce_timeout_ms=300
    )
    producer = KafkaProducer(ProducerConfig(bootstrap, delivery_timeout_ms=300))
    return Upkeep.start(config, state=state, producer=producer)


def demoted_count(state: pykka.ActorRef[StateActor]) -> int:
    stats = state.ask(Stats(), block=True, timeout=TIMEOUT_S)
    return int(stats.by_status[Status.DEMOTED])


@pytest.mark.kafka
@pytest.mark.usefixtures("actors")
def test_a_demoted_task_is_forwarded_unchanged_and_then_removed(
    kafka: EmbeddedKafka, kafka_topics: TopicFactory
) -> None:
    demoted_topic, _ = kafka_topics()
    state, original = demoting_state(demoted_topic)
    assert state.ask(Claim(), block=True, timeout=TIMEOUT_S) is None
    start_upkeep(state, kafka.bootstrap)
    wait_for(lambda: demoted_count(state) == 0, 20.0, "the forward to be acknowledged")
    assert read_values(kafka.bootstrap, demoted_topic, count=1) == [(original, [])]
    stats = state.ask(Stats(), block=True, timeout=TIMEOUT_S)
    assert stats.demoted_forwarded == 1


@pytest.mark.usefixtures("actors")
def test_a_demote_whose_produce_fails_keeps_the_task() -> None:
    state, _ = demoting_state("long")
    upkeep = start_upkeep(state, f"127.0.0.1:{free_port()}")  # nothing listens there
    time.sleep(1.5)  # several ticks, every produce fails
    upkeep.stop(timeout=TIMEOUT_S)
    assert demoted_count(state) == 1
    stats = state.ask(Stats(), block=True, timeout=TIMEOUT_S)
    assert stats.demoted_forwarded == 0
