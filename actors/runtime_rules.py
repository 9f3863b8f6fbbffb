"""Runtime rules: the incident controls an operator changes while the broker runs.

A rule set is plain data (`RuntimeRules`) that the state machine applies at ingest and to
what it already holds; nothing here does I/O but `load_rules_file`. The file is
taskbroker's runtime config (YAML, `runtime_config_path`) with our two extra keys:

    drop_task_killswitch:          # dropped at ingest and from what is pending
      - examples.broken_task       # every activation of that task
      - name: examples.send_mail   # only those whose decoded parameters match
        select_arg: {0: "bad@example.com"}      # args[0] == value
        select_kwarg: {tenant: 42}              # kwargs["tenant"] == value
    demoted_namespaces: [noisy]    # forwarded unchanged to demoted_topic
    demoted_topic: taskworker-long
    paused_namespaces: [held]      # kept, never handed out while listed (ours)
    paused_applications: [getsentry]

Every selector of an entry must match. Parameters are msgpack `{"args", "kwargs"}`,
zstd-compressed when the activation header `compression-type` is `zstd`; parameters that
do not decode match no selector (fail open: a broken rule must not drop good work).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import yaml
import zstandard
from google.protobuf.message import DecodeError

from actors.errors import ConfigError
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb

DEFAULT_DEMOTED_TOPIC: Final = "taskworker-long"
COMPRESSION_HEADER: Final = "compression-type"
"""The activation header that says how `parameters_bytes` is compressed (sentry's name)."""

# A compressed parameter blob that inflates past this is not decoded (it does not match):
# a selector must not let one activation take the broker's memory.
_MAX_DECOMPRESSED_BYTES: Final = 64 * 1024 * 1024

_KEYS: Final = (
    "drop_task_killswitch",
    "demoted_namespaces",
    "demoted_topic",
    "paused_namespaces",
    "paused_applications",
)


class RulesError(ConfigError):
    """A runtime rules file or control action that cannot be applied; the message names the
    key and the source."""


@dataclass(frozen=True, slots=True)
class Parameters:
    """An activation's decoded parameters."""

    args: Sequence[object]
    kwargs: Mapping[str, object]


def _same(left: object, right: object) -> bool:
    # True == 1 in Python; a selector for `true` must not match the integer 1.
    return isinstance(left, bool) == isinstance(right, bool) and left == right


@dataclass(frozen=True, slots=True)
class KillswitchEntry:
    """One `drop_task_killswitch` entry: a task name, optionally narrowed by parameters."""

    taskname: str
    select_args: tuple[tuple[int, object], ...] = ()
    select_kwargs: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.taskname:
            raise RulesError("drop_task_killswitch: an entry needs a task name")
        for index, _ in self.select_args:
            if index < 0:
                raise RulesError(f"drop_task_killswitch.{self.taskname}: negative arg index")

    @property
    def selects_parameters(self) -> bool:
        return bool(self.select_args or self.select_kwargs)

    def matches(self, parameters: Parameters | None) -> bool:
        """Whether parameters of an activation of `taskname` match every selector; None
        (parameters that did not decode) matches only an entry without selectors."""
        if not self.selects_parameters:
            return True
        if parameters is None:
            return False
        args, kwargs = parameters.args, parameters.kwargs
        for index, value in self.select_args:
            if index >= len(args) or not _same(args[index], value):
                return False
        return all(key in kwargs and _same(kwargs[key], value) for key, value in self.select_kwargs)

    def to_document(self) -> str | dict[str, Any]:
        """The entry as it is written in the file: a name, or a mapping with selectors."""
        if not self.selects_parameters:
            return self.taskname
        document: dict[str, Any] = {"name": self.taskname}
        if self.select_args:
            document["select_arg"] = dict(self.select_args)
        if self.select_kwargs:
            document["select_kwarg"] = dict(self.select_kwargs)
        return document

    def label(self) -> str:
        """A short, stable name for logs and counters."""
        if not self.selects_parameters:
            return self.taskname
        return json.dumps(self.to_document(), sort_keys=True, default=repr)


@dataclass(frozen=True, slots=True)
class RuntimeRules:
    """The rules in force. The empty default changes nothing."""

    drop_task_killswitch: tuple[KillswitchEntry, ...] = ()
    demoted_namespaces: frozenset[str] = frozenset()
    demoted_topic: str = DEFAULT_DEMOTED_TOPIC
    paused_namespaces: frozenset[str] = frozenset()
    paused_applications: frozenset[str] = frozenset()
    _by_taskname: dict[str, tuple[KillswitchEntry, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if not self.demoted_topic:
            raise RulesError("demoted_topic: must not be empty")
        by_taskname: dict[str, list[KillswitchEntry]] = {}
        for entry in self.drop_task_killswitch:
            by_taskname.setdefault(entry.taskname, []).append(entry)
        self._by_taskname.update({name: tuple(e) for name, e in by_taskname.items()})

    @property
    def empty(self) -> bool:
        return not (
            self.drop_task_killswitch
            or self.demoted_namespaces
            or self.paused_namespaces
            or self.paused_applications
        )

    def killswitch_entry(self, taskname: str, activation: bytes) -> KillswitchEntry | None:
        """The first entry that drops this activation, or None. Parameters are decoded
        only for a task named by an entry with selectors, once."""
        entries = self._by_taskname.get(taskname)
        if not entries:
            return None
        decoded = False
        parameters: Parameters | None = None
        for entry in entries:
            if entry.selects_parameters and not decoded:
                parameters, decoded = decode_parameters(activation), True
            if entry.matches(parameters):
                return entry
        return None

    def is_paused(self, application: str, namespace: str) -> bool:
        return namespace in self.paused_namespaces or application in self.paused_applications

    def union(self, other: RuntimeRules) -> RuntimeRules:
        """Both rule sets at once; `other`'s demoted_topic wins when it is not the default."""
        topic = other.demoted_topic
        if topic == DEFAULT_DEMOTED_TOPIC:
            topic = self.demoted_topic
        # Compared, not hashed: a selector's value may be a list.
        entries = list(self.drop_task_killswitch)
        entries += [e for e in other.drop_task_killswitch if e not in entries]
        return RuntimeRules(
            drop_task_killswitch=tuple(entries),
            demoted_namespaces=self.demoted_namespaces | other.demoted_namespaces,
            demoted_topic=topic,
            paused_namespaces=self.paused_namespaces | other.paused_namespaces,
            paused_applications=self.paused_applications | other.paused_applications,
        )

    def check_demoted_topic(self, consumed_topics: Iterable[str]) -> None:
        """Refuse a demoted topic this broker consumes: demoted tasks would come back and
        be forwarded again, forever."""
        if self.demoted_namespaces and self.demoted_topic in set(consumed_topics):
            raise RulesError(
                f"demoted_topic: {self.demoted_topic!r} is a topic this broker consumes; "
                "demoting to it would loop"
            )

    def to_document(self) -> dict[str, Any]:
        """The rules as JSON-able values, in the file's keys (for /status)."""
        return {
            "drop_task_killswitch": [e.to_document() for e in self.drop_task_killswitch],
            "demoted_namespaces": sorted(self.demoted_namespaces),
            "demoted_topic": self.demoted_topic,
            "paused_namespaces": sorted(self.paused_namespaces),
            "paused_applications": sorted(self.paused_applications),
        }


def decode_parameters(activation: bytes) -> Parameters | None:
    """An activation's parameters, or None when they do not decode: a bad activation,
    unknown compression, bad zstd, bad msgpack, or not `{"args": [...], "kwargs": {...}}`.
    The deprecated JSON `parameters` field stands in when `parameters_bytes` is empty."""
    try:
        message = pb.TaskActivation.FromString(activation)
    except DecodeError:
        return None
    raw: Any
    try:
        if message.parameters_bytes:
            data = message.parameters_bytes
            compression = message.headers.get(COMPRESSION_HEADER, "")
            if compression == "zstd":
                data = zstandard.ZstdDecompressor().decompress(
                    data, max_output_size=_MAX_DECOMPRESSED_BYTES
                )
            elif compression not in ("", "none"):
                return None
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
        elif message.parameters:
            raw = json.loads(message.parameters)
        else:
            raw = {}
    except (zstandard.ZstdError, ValueError, msgpack.UnpackException):
        # msgpack's ExtraData and FormatError are ValueErrors; so is a bad JSON document.
        return None
    if not isinstance(raw, dict):
        return None
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return None
    return Parameters(args, kwargs)


def parse_rules(text: str, source: str) -> RuntimeRules:
    """The rules a YAML document states; an empty document is no rules. `source` names
    the document in errors."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        # One line: the error goes to a log line and a status field.
        raise RulesError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
    if document is None:
        return RuntimeRules()
    if not isinstance(document, dict):
        raise RulesError(f"{source}: expected a mapping of {', '.join(_KEYS)}")
    unknown = sorted(str(k) for k in document if k not in _KEYS)
    if unknown:
        raise RulesError(f"{source}: {unknown[0]}: unknown key (known: {', '.join(_KEYS)})")
    topic = document.get("demoted_topic", DEFAULT_DEMOTED_TOPIC)
    if not isinstance(topic, str) or not topic:
        raise RulesError(f"{source}: demoted_topic: expected a topic name, got {topic!r}")
    try:
        return RuntimeRules(
            drop_task_killswitch=tuple(
                _killswitch_entry(item, f"{source}: drop_task_killswitch[{i}]")
                for i, item in enumerate(_list(document, "drop_task_killswitch", source))
            ),
            demoted_namespaces=_names(document, "demoted_namespaces", source),
            demoted_topic=topic,
            paused_namespaces=_names(document, "paused_namespaces", source),
            paused_applications=_names(document, "paused_applications", source),
        )
    except RulesError as error:
        if str(error).startswith(source):
            raise
        raise RulesError(f"{source}: {error}") from None


def load_rules_file(path: Path) -> RuntimeRules:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise RulesError(f"runtime_config_path {path}: {reason}") from None
    return parse_rules(text, f"runtime_config_path {path}")


def killswitch_entry(
    taskname: str,
    select_args: Mapping[int, object] | None = None,
    select_kwargs: Mapping[str, object] | None = None,
) -> KillswitchEntry:
    """An entry with its selectors in a canonical order, so that equal entries compare
    equal however they were written."""
    return KillswitchEntry(
        taskname,
        tuple(sorted((select_args or {}).items())),
        tuple(sorted((select_kwargs or {}).items())),
    )


def _list(document: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = document.get(key) or []
    if not isinstance(value, list):
        raise RulesError(f"{source}: {key}: expected a list, got {value!r}")
    return value


def _names(document: Mapping[str, Any], key: str, source: str) -> frozenset[str]:
    values = _list(document, key, source)
    for value in values:
        if not isinstance(value, str) or not value:
            raise RulesError(f"{source}: {key}: expected names, got {value!r}")
    return frozenset(values)


def _killswitch_entry(item: object, where: str) -> KillswitchEntry:
    if isinstance(item, str):
        return killswitch_entry(item)
    if not isinstance(item, dict):
        raise RulesError(f"{where}: expected a task name or {{name, select_arg, select_kwarg}}")
    unknown = sorted(str(k) for k in item if k not in ("name", "select_arg", "select_kwarg"))
    if unknown:
        raise RulesError(f"{where}: {unknown[0]}: unknown key")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise RulesError(f"{where}: name: expected a task name, got {name!r}")
    select_arg = item.get("select_arg") or {}
    select_kwarg = item.get("select_kwarg") or {}
    if not isinstance(select_arg, dict) or not isinstance(select_kwarg, dict):
        raise RulesError(f"{where}: select_arg and select_kwarg are mappings")
    args: dict[int, object] = {}
    for index, value in select_arg.items():
        # YAML reads `{0: x}` with an int key and `{"0": x}` with a string one.
        if isinstance(index, bool) or not str(index).isdigit():
            raise RulesError(f"{where}: select_arg: {index!r} is not an argument index")
        args[int(index)] = value
    for key in select_kwarg:
        if not isinstance(key, str):
            raise RulesError(f"{where}: select_kwarg: {key!r} is not a keyword name")
    return killswitch_entry(name, args, select_kwarg)
