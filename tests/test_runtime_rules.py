"""The runtime rules file and its killswitch selectors, on real encoded activations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import msgpack
import pytest
import zstandard

from actors.activation import encode_activation
from actors.runtime_rules import (
    DEFAULT_DEMOTED_TOPIC,
    RulesError,
    RuntimeRules,
    decode_parameters,
    killswitch_entry,
    load_rules_file,
    parse_rules,
)
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

FULL_FILE = """
drop_task_killswitch:
  - examples.broken
  - name: examples.mail
    select_arg: {0: "bad@example.com"}
    select_kwarg: {tenant: 42}
demoted_namespaces: [noisy]
demoted_topic: taskworker-slow
paused_namespaces: [held]
paused_applications: [getsentry]
"""


def zstd_activation(taskname: str, args: Sequence[object], kwargs: Mapping[str, object]) -> bytes:
    """An activation as sentry writes one with compressed parameters."""
    message = pb.TaskActivation.FromString(encode_activation(taskname=taskname))
    packed = msgpack.packb({"args": list(args), "kwargs": dict(kwargs)})
    message.parameters_bytes = zstandard.ZstdCompressor().compress(packed)
    message.headers["compression-type"] = "zstd"
    return message.SerializeToString()


def test_the_file_states_every_rule() -> None:
    rules = parse_rules(FULL_FILE, "test")
    assert rules.drop_task_killswitch == (
        killswitch_entry("examples.broken"),
        killswitch_entry("examples.mail", {0: "bad@example.com"}, {"tenant": 42}),
    )
    assert rules.demoted_namespaces == {"noisy"}
    assert rules.demoted_topic == "taskworker-slow"
    assert rules.is_paused("any", "held")
    assert rules.is_paused("getsentry", "other")
    assert not rules.is_paused("any", "other")
    assert rules.to_document()["drop_task_killswitch"][1] == {
        "name": "examples.mail",
        "select_arg": {0: "bad@example.com"},
        "select_kwarg": {"tenant": 42},
    }


def test_an_empty_file_is_no_rules() -> None:
    rules = parse_rules("", "test")
    assert rules.empty
    assert rules.demoted_topic == DEFAULT_DEMOTED_TOPIC


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("drop_task_killswitch: [", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("paused_namespace: [x]", "paused_namespace: unknown key"),
        ("demoted_namespaces: noisy", "demoted_namespaces: expected a list"),
        ("paused_applications: [1]", "paused_applications: expected names"),
        ("demoted_topic: ''", "demoted_topic"),
        ("drop_task_killswitch: [{select_arg: {0: 1}}]", "drop_task_killswitch[0]: name"),
        ("drop_task_killswitch: [{name: t, select_arg: {x: 1}}]", "not an argument index"),
        ("drop_task_killswitch: [{name: t, selector: 1}]", "selector: unknown key"),
    ],
)
def test_a_bad_file_is_refused_with_the_key_named(text: str, named: str) -> None:
    with pytest.raises(RulesError, match=r"^where: .*") as raised:
        parse_rules(text, "where")
    assert named in str(raised.value)


def test_an_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"runtime_config_path .*missing\.yaml"):
        load_rules_file(tmp_path / "missing.yaml")


def test_a_demoted_topic_that_is_consumed_is_refused() -> None:
    rules = RuntimeRules(demoted_namespaces=frozenset({"n"}), demoted_topic="taskworker")
    with pytest.raises(RulesError, match="would loop"):
        rules.check_demoted_topic(["taskworker", "retries"])
    rules.check_demoted_topic(["other"])
    RuntimeRules(demoted_topic="taskworker").check_demoted_topic(["taskworker"])  # none demoted


@pytest.mark.parametrize("compressed", [False, True], ids=["msgpack", "zstd"])
def test_selectors_match_decoded_parameters(compressed: bool) -> None:
    rules = parse_rules(FULL_FILE, "test")

    def activation(args: Sequence[object], kwargs: Mapping[str, object]) -> bytes:
        if compressed:
            return zstd_activation("examples.mail", args, kwargs)
        return encode_activation(taskname="examples.mail", args=args, kwargs=kwargs)

    matching = activation(["bad@example.com", 1], {"tenant": 42, "x": []})
    entry = rules.killswitch_entry("examples.mail", matching)
    assert entry is not None
    assert entry.taskname == "examples.mail"
    for args, kwargs in [
        (["good@example.com"], {"tenant": 42}),  # another arg
        (["bad@example.com"], {"tenant": 43}),  # another kwarg
        (["bad@example.com"], {}),  # kwarg missing
        ([], {"tenant": 42}),  # arg missing
    ]:
        assert rules.killswitch_entry("examples.mail", activation(args, kwargs)) is None


def test_a_name_alone_matches_any_parameters_and_other_tasks_never() -> None:
    rules = parse_rules(FULL_FILE, "test")
    assert rules.killswitch_entry("examples.broken", b"not even protobuf") is not None
    assert rules.killswitch_entry("examples.fine", encode_activation()) is None


def test_true_is_not_one() -> None:
    rules = RuntimeRules(drop_task_killswitch=(killswitch_entry("t", {0: True}),))
    assert rules.killswitch_entry("t", encode_activation(taskname="t", args=[1])) is None
    assert rules.killswitch_entry("t", encode_activation(taskname="t", args=[True])) is not None


def test_parameters_that_do_not_decode_match_no_selector() -> None:
    """Fail open: bad zstd, unknown compression, bad msgpack, not a mapping, not protobuf."""
    rules = RuntimeRules(drop_task_killswitch=(killswitch_entry("t", None, {"a": 1}),))
    good = pb.TaskActivation.FromString(encode_activation(taskname="t", kwargs={"a": 1}))
    assert rules.killswitch_entry("t", good.SerializeToString()) is not None

    bad_zstd = pb.TaskActivation()
    bad_zstd.CopyFrom(good)
    bad_zstd.headers["compression-type"] = "zstd"  # but the bytes are plain msgpack
    unknown = pb.TaskActivation()
    unknown.CopyFrom(good)
    unknown.headers["compression-type"] = "brotli"
    bad_msgpack = pb.TaskActivation()
    bad_msgpack.CopyFrom(good)
    bad_msgpack.parameters_bytes = b"\xc1"  # never used by msgpack
    not_a_mapping = pb.TaskActivation()
    not_a_mapping.CopyFrom(good)
    not_a_mapping.parameters_bytes = msgpack.packb([1, 2])
    for message in (bad_zstd, unknown, bad_msgpack, not_a_mapping):
        assert decode_parameters(message.SerializeToString()) is None
        assert rules.killswitch_entry("t", message.SerializeToString()) is None
    assert rules.killswitch_entry("t", b"\xff\xff") is None


def test_deprecated_json_parameters_are_read() -> None:
    message = pb.TaskActivation(id="i", namespace="n", taskname="t")
    message.parameters = '{"args": [5], "kwargs": {"k": "v"}}'
    parameters = decode_parameters(message.SerializeToString())
    assert parameters is not None
    assert list(parameters.args) == [5]
    assert dict(parameters.kwargs) == {"k": "v"}


def test_union_keeps_both_sets_once() -> None:
    file_rules = parse_rules(FULL_FILE, "test")
    control = RuntimeRules(
        drop_task_killswitch=(killswitch_entry("examples.broken"), killswitch_entry("other")),
        paused_namespaces=frozenset({"ops"}),
    )
    both = file_rules.union(control)
    assert [e.taskname for e in both.drop_task_killswitch] == [
        "examples.broken",
        "examples.mail",
        "other",
    ]
    assert both.paused_namespaces == {"held", "ops"}
    assert both.demoted_topic == "taskworker-slow"
