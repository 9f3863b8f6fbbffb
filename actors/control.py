"""Incident controls: where the runtime rules come from, and the admin action that changes
them without editing a file.

The rules in force are the union of two sources:

- the runtime rules file (`runtime_config_path`, taskbroker's YAML), read at startup,
  again when it changes (its mtime, size or inode, checked every
  `runtime_config_check_interval_ms`) and at SIGHUP. A file that does not read or parse
  keeps the previous rules: one log line says why, and
  `taskbroker_runtime_rules_reload_failures_total` counts it;
- control actions (`taskbroker control kill|demote|pause|resume`, a POST to `/control` on
  the ops port with the admin token), kept in a JSON file beside the database so that they
  survive a restart, each with who took it and when. `resume` lifts the control actions on
  its target; a rule the file states stays until the file drops it.

Every change tells the state actor the new rules (`ApplyRules`); nothing here touches a
record. A demoted topic that the broker consumes is refused from either source.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal, Protocol, cast, get_args

from actors.config import Config
from actors.errors import ConfigError
from actors.runtime_rules import (
    KillswitchEntry,
    RulesError,
    RuntimeRules,
    killswitch_entry,
    load_rules_file,
)

logger = logging.getLogger(__name__)

ActionKind = Literal["kill", "demote", "pause"]
ACTION_KINDS: Final[tuple[ActionKind, ...]] = get_args(ActionKind)
CONTROL_PATH: Final = "/control"
"""The admin endpoint's path on the ops port (POST, admin token)."""
CONTROLS_SUFFIX: Final = ".controls.json"
"""The control actions' file is the database's path with this suffix."""
_MAX_REQUEST_BYTES: Final = 64 * 1024
_FORMAT_VERSION: Final = 1


class RulesObserver(Protocol):
    """Told when the file was read and when a read failed (for the metrics)."""

    def rules_loaded(self) -> None: ...

    def rules_load_failed(self) -> None: ...


class _SilentRulesObserver:
    def rules_loaded(self) -> None:
        pass

    def rules_load_failed(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ControlAction:
    """One operator action in force: what it targets, who took it, when (Unix seconds).

    `kill` names a task (and optional selectors), `demote` a namespace, `pause` a
    namespace or an application."""

    kind: ActionKind
    who: str
    at: float
    taskname: str = ""
    namespace: str = ""
    application: str = ""
    select_args: tuple[tuple[int, object], ...] = ()
    select_kwargs: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise RulesError(f"action: {self.kind!r} is not one of {', '.join(ACTION_KINDS)}")
        if not self.who:
            raise RulesError("who: say who takes the action")
        targets = {
            "kill": bool(self.taskname) and not (self.namespace or self.application),
            "demote": bool(self.namespace) and not (self.taskname or self.application),
            "pause": bool(self.namespace) != bool(self.application) and not self.taskname,
        }
        if not targets[self.kind]:
            needs = {
                "kill": "a taskname",
                "demote": "a namespace",
                "pause": "a namespace or an application (one)",
            }
            raise RulesError(f"{self.kind}: needs {needs[self.kind]} and nothing else")
        if self.kind != "kill" and (self.select_args or self.select_kwargs):
            raise RulesError(f"{self.kind}: select_arg and select_kwarg belong to kill")

    @property
    def entry(self) -> KillswitchEntry:
        return killswitch_entry(self.taskname, dict(self.select_args), dict(self.select_kwargs))

    def rules(self) -> RuntimeRules:
        """The rule this action adds."""
        if self.kind == "kill":
            return RuntimeRules(drop_task_killswitch=(self.entry,))
        if self.kind == "demote":
            return RuntimeRules(demoted_namespaces=frozenset({self.namespace}))
        if self.namespace:
            return RuntimeRules(paused_namespaces=frozenset({self.namespace}))
        return RuntimeRules(paused_applications=frozenset({self.application}))

    def same_target(self, other: ControlAction) -> bool:
        return self.kind == other.kind and self.rules() == other.rules()

    def describe(self) -> str:
        if self.kind == "kill":
            return f"kill {self.entry.label()}"
        if self.namespace:
            return f"{self.kind} namespace {self.namespace}"
        return f"{self.kind} application {self.application}"

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"action": self.kind, "who": self.who, "at": self.at}
        for name in ("taskname", "namespace", "application"):
            if getattr(self, name):
                document[name] = getattr(self, name)
        if self.select_args:
            # JSON keys are strings; from_document reads them back as indexes.
            document["select_arg"] = {str(i): v for i, v in self.select_args}
        if self.select_kwargs:
            document["select_kwarg"] = dict(self.select_kwargs)
        return document

    @classmethod
    def from_document(cls, document: Mapping[str, Any], who: str, at: float) -> ControlAction:
        """An action from a request or the saved file; RulesError names what is wrong."""
        unknown = sorted(
            set(document)
            - {"action", "who", "at", "taskname", "namespace", "application"}
            - {"select_arg", "select_kwarg"}
        )
        if unknown:
            raise RulesError(f"{unknown[0]}: unknown field")
        strings = {}
        for name in ("action", "taskname", "namespace", "application"):
            value = document.get(name, "")
            if not isinstance(value, str):
                raise RulesError(f"{name}: expected a string, got {value!r}")
            strings[name] = value
        select_arg = document.get("select_arg") or {}
        select_kwarg = document.get("select_kwarg") or {}
        if not isinstance(select_arg, dict) or not isinstance(select_kwarg, dict):
            raise RulesError("select_arg and select_kwarg: expected mappings")
        args: dict[int, object] = {}
        for index, value in select_arg.items():
            if not str(index).isdigit():
                raise RulesError(f"select_arg: {index!r} is not an argument index")
            args[int(index)] = value
        return cls(
            kind=cast(ActionKind, strings["action"]),
            who=who,
            at=at,
            taskname=strings["taskname"],
            namespace=strings["namespace"],
            application=strings["application"],
            select_args=tuple(sorted(args.items())),
            select_kwargs=tuple(sorted(select_kwarg.items())),
        )


class ControlFile:
    """The control actions in force, saved as JSON beside the database. Written whole to a
    temporary file, synced, then renamed over the old one: a crash leaves either."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"ControlFile({str(self.path)!r})"

    def load(self) -> tuple[ControlAction, ...]:
        """The saved actions; none when the file does not exist. A file that does not read
        is a ConfigError: starting without a killswitch the operator set would be worse."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return ()
        except OSError as error:
            raise ConfigError(f"control actions {self.path}: {error.strerror or error}") from None
        try:
            return _actions_of(json.loads(text))
        except (ValueError, KeyError, TypeError, RulesError) as error:
            raise ConfigError(
                f"control actions {self.path}: unreadable ({error}); fix or remove the file "
                "(taskbroker control resume lifts actions once the broker runs)"
            ) from None

    def save(self, actions: Iterable[ControlAction]) -> None:
        document = {
            "version": _FORMAT_VERSION,
            "actions": [action.to_document() for action in actions],
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w") as handle:
            json.dump(document, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.path)


@dataclass(frozen=True, slots=True)
class _FileState:
    """What the rules file was when last read, to notice a change without reading it."""

    mtime_ns: int
    size: int
    inode: int


def _file_state(path: Path) -> _FileState | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return _FileState(stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass(slots=True)
class _FileRead:
    rules: RuntimeRules = field(default_factory=RuntimeRules)
    state: _FileState | None = None
    loaded_at: float | None = None
    error: str | None = None
    error_at: float | None = None


class Controls:
    """The rules in force, from the file and from control actions, told to `apply` (the
    state actor) at every change. Thread-safe: the watcher, SIGHUP and the ops endpoint's
    request threads all call in."""

    def __init__(
        self,
        *,
        rules_path: Path | None,
        control_file: ControlFile,
        consumed_topics: Iterable[str],
        apply: Callable[[RuntimeRules], None],
        check_interval_s: float = 5.0,
        observer: RulesObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules_path = rules_path
        self._control_file = control_file
        self._consumed = frozenset(consumed_topics)
        self._apply = apply
        self._check_interval_s = check_interval_s
        self._observer: RulesObserver = observer or _SilentRulesObserver()
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._file = _FileRead()
        self._actions = control_file.load()
        if rules_path is not None:
            # At startup a bad file has no previous rules to keep: the broker refuses to start.
            self._file = self._read_file(rules_path)
        self._effective = self._combine(self._file.rules, self._actions)

    @classmethod
    def of(
        cls,
        config: Config,
        *,
        apply: Callable[[RuntimeRules], None],
        observer: RulesObserver | None = None,
    ) -> Controls:
        """The controls of the broker `config` describes; ConfigError for a rules file or a
        control actions file that does not read."""
        path = config.runtime_config_path
        return cls(
            rules_path=Path(path) if path else None,
            control_file=ControlFile(controls_path(Path(config.db_path))),
            consumed_topics=(config.kafka_topic,),
            apply=apply,
            check_interval_s=config.runtime_config_check_interval_ms / 1000,
            observer=observer,
        )

    def __repr__(self) -> str:
        return (
            f"<Controls file={self._rules_path} actions={len(self._actions)} "
            f"error={self._file.error!r}>"
        )

    @property
    def rules(self) -> RuntimeRules:
        """The rules in force now."""
        return self._effective

    @property
    def actions(self) -> tuple[ControlAction, ...]:
        return self._actions

    def start(self) -> None:
        """Watch the rules file for changes on a daemon thread."""
        if self._rules_path is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="rules-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self._check_interval_s + 1.0)

    def reload(self, reason: str) -> bool:
        """Read the rules file again (SIGHUP, or a change seen); True when its rules are in
        force, False when it failed and the previous ones stay."""
        path = self._rules_path
        if path is None:
            return True
        with self._lock:
            try:
                read = self._read_file(path)
                effective = self._combine(read.rules, self._actions)
            except RulesError as error:
                self._file.error, self._file.error_at = str(error), self._clock()
                # The state as seen now: the same bad file is not read again every check.
                self._file.state = _file_state(path)
                self._observer.rules_load_failed()
                logger.error(  # noqa: TRY400 - the message is the diagnosis
                    "runtime rules not reloaded (%s), the previous rules stay: %s", reason, error
                )
                return False
            changed = read.rules != self._file.rules
            self._file = read
            self._observer.rules_loaded()
            if changed:
                logger.info("runtime rules reloaded (%s) from %s", reason, path)
            self._set(effective)
        return True

    def check_file(self) -> bool:
        """Reload if the file changed since it was last read; True when it was reloaded."""
        path = self._rules_path
        if path is None or _file_state(path) == self._file.state:
            return False
        return self.reload("the file changed")

    def act(self, document: Mapping[str, Any], who: str) -> dict[str, Any]:
        """Take one control action (`action` kill, demote, pause or resume, and its target);
        the answer says what is in force now. RulesError for a request that cannot be taken."""
        now = self._clock()
        with self._lock:
            if document.get("action") == "resume":
                actions, lifted = self._resume(document)
                if not lifted:
                    return self._answer("no control action on that target to resume")
                message = "resumed: " + "; ".join(a.describe() for a in lifted)
            else:
                action = ControlAction.from_document(document, who, now)
                if any(action.same_target(a) for a in self._actions):
                    return self._answer(f"already in force: {action.describe()}")
                actions, message = (*self._actions, action), f"in force: {action.describe()}"
            effective = self._combine(self._file.rules, actions)
            self._control_file.save(actions)
            self._actions = actions
            logger.warning(
                "control action by %s at %s: %s",
                who,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
                message,
            )
            self._set(effective)
            return self._answer(message)

    def handle_post(self, body: bytes, peer: str) -> tuple[HTTPStatus, bytes]:
        """The admin endpoint (`POST /control`, the token already checked): a JSON action
        in, a JSON answer out. `who` is the request's, with the peer address that sent it."""
        if len(body) > _MAX_REQUEST_BYTES:
            return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the request is too large")
        try:
            document = json.loads(body)
        except ValueError:
            return _error(HTTPStatus.BAD_REQUEST, "the request is not JSON")
        if not isinstance(document, dict):
            return _error(HTTPStatus.BAD_REQUEST, "the request is not a JSON object")
        named = document.pop("who", "")
        if not isinstance(named, str) or not named.strip():
            return _error(HTTPStatus.BAD_REQUEST, "who: say who takes the action")
        try:
            answer = self.act(document, f"{named.strip()} from {peer}")
        except RulesError as error:
            return _error(HTTPStatus.BAD_REQUEST, str(error))
        return HTTPStatus.OK, json.dumps(answer, indent=2).encode()

    def document(self) -> dict[str, Any]:
        """The `runtime_rules` section of /status: the rules in force, the file's state and
        the control actions with who took them and when."""
        read = self._file
        return {
            "effective": self._effective.to_document(),
            "file": {
                "path": None if self._rules_path is None else str(self._rules_path),
                "loaded_at": read.loaded_at,
                "error": read.error,
                "error_at": read.error_at,
            },
            "controls": [action.to_document() for action in self._actions],
        }

    # --- internals ------------------------------------------------------------------------

    def _answer(self, message: str) -> dict[str, Any]:
        return {"result": message, "runtime_rules": self.document()}

    def _resume(
        self, document: Mapping[str, Any]
    ) -> tuple[tuple[ControlAction, ...], tuple[ControlAction, ...]]:
        targets = {k: document.get(k, "") for k in ("taskname", "namespace", "application")}
        named = {k: v for k, v in targets.items() if v}
        if len(named) != 1 or not all(isinstance(v, str) for v in named.values()):
            raise RulesError("resume: needs one of taskname, namespace or application")
        if set(document) - {"action", "taskname", "namespace", "application"}:
            raise RulesError("resume: takes only its target")
        ((key, value),) = named.items()
        lifted = tuple(a for a in self._actions if getattr(a, key) == value)
        return tuple(a for a in self._actions if a not in lifted), lifted

    def _read_file(self, path: Path) -> _FileRead:
        state = _file_state(path)
        rules = load_rules_file(path)
        rules.check_demoted_topic(self._consumed)
        return _FileRead(rules=rules, state=state, loaded_at=self._clock())

    def _combine(self, file_rules: RuntimeRules, actions: Iterable[ControlAction]) -> RuntimeRules:
        effective = file_rules
        for action in actions:
            effective = effective.union(action.rules())
        effective.check_demoted_topic(self._consumed)
        return effective

    def _set(self, effective: RuntimeRules) -> None:
        if effective == self._effective:
            return
        self._effective = effective
        self._apply(effective)

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_interval_s):
            try:
                self.check_file()
            except Exception:
                # The watcher must outlive any one bad read; the next check tries again.
                logger.exception("checking the runtime rules file failed")


def _actions_of(document: object) -> tuple[ControlAction, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("actions"), list):
        raise RulesError("expected {'version': 1, 'actions': [...]}")
    return tuple(
        ControlAction.from_document(item, str(item.get("who", "")), float(item["at"]))
        for item in document["actions"]
    )


def _error(code: HTTPStatus, message: str) -> tuple[HTTPStatus, bytes]:
    return code, json.dumps({"error": message}).encode()


def controls_path(db_path: Path) -> Path:
    """Where the control actions of the broker whose database is `db_path` are kept."""
    return db_path.with_name(db_path.name + CONTROLS_SUFFIX)


def render_rules(section: Mapping[str, Any]) -> str:
    """The `runtime_rules` section of /status as plain text, for `taskbroker status` and
    `taskbroker control`."""
    effective = section.get("effective") or {}

    def listed(key: str) -> str:
        return ", ".join(str(v) for v in effective.get(key) or []) or "-"

    kills = [
        entry if isinstance(entry, str) else json.dumps(entry, sort_keys=True)
        for entry in effective.get("drop_task_killswitch") or []
    ]
    lines = [
        "runtime rules in force:",
        f"  killswitch:          {'; '.join(kills) or '-'}",
        f"  demoted namespaces:  {listed('demoted_namespaces')}"
        f" (to {effective.get('demoted_topic', '?')})",
        f"  paused namespaces:   {listed('paused_namespaces')}",
        f"  paused applications: {listed('paused_applications')}",
    ]
    file = section.get("file") or {}
    if file.get("path"):
        state = f"read {_when(file.get('loaded_at'))}"
        if file.get("error"):
            state += f"; NOT reloaded {_when(file.get('error_at'))}: {file['error']}"
        lines.append(f"  rules file:          {file['path']} ({state})")
    for action in section.get("controls") or []:
        target = action.get("taskname") or action.get("namespace") or action.get("application")
        selectors = {k: action[k] for k in ("select_arg", "select_kwarg") if k in action}
        suffix = f" {json.dumps(selectors, sort_keys=True)}" if selectors else ""
        lines.append(
            f"  control: {action.get('action')} {target}{suffix}"
            f" by {action.get('who')} {_when(action.get('at'))}"
        )
    return "\n".join(lines) + "\n"


def _when(at: object) -> str:
    if not isinstance(at, int | float):
        return "never"
    return time.strftime("at %Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
