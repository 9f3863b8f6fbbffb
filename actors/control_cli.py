"""`taskbroker control kill|demote|pause|resume|show`: incident controls on a running broker,
through its admin endpoint (`POST /control` on the ops port).

The admin token comes from `--token-file`, `TASKBROKER_OPS_ADMIN_TOKEN_FILE` or
`TASKBROKER_OPS_ADMIN_TOKEN`, never from a flag's value: other local users can read a
process's arguments. `--who` (default `$USER@host`) names the operator in the broker's log
and in `/status`; the broker adds the address the request came from.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from typing import Any, Final

from actors.control import CONTROL_PATH, render_rules
from actors.errors import ConfigError
from actors.ops_http import admin_token
from actors.status import DEFAULT_URL, TOKEN_ENV, TOKEN_FILE_ENV, StatusUnavailable, fetch_status

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
"""The broker could not be reached, refused the token, or refused the action."""

_VALUE_HELP: Final = (
    'VALUE is read as JSON when it is JSON (42, true, "42", [1, 2]), else as a string'
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's actions and options, for the CLI's parser."""
    actions = parser.add_subparsers(title="actions", required=True, metavar="ACTION")

    kill = actions.add_parser(
        "kill",
        help="drop a task's activations, pending and to come",
        description="Drop every activation of TASKNAME that no worker holds yet, and every "
        "one consumed from now on; with selectors, only those whose decoded parameters "
        "match all of them. " + _VALUE_HELP + ".",
    )
    kill.add_argument("taskname")
    kill.add_argument(
        "--select-arg",
        action="append",
        default=[],
        metavar="INDEX=VALUE",
        help="positional argument INDEX equals VALUE",
    )
    kill.add_argument(
        "--select-kwarg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="keyword argument NAME equals VALUE",
    )
    kill.set_defaults(build=_kill)

    demote = actions.add_parser(
        "demote",
        help="forward a namespace's activations to the demoted topic",
        description="Forward NAMESPACE's waiting activations, and those consumed from now "
        "on, unchanged to the demoted topic (demoted_topic of the rules file, default "
        "taskworker-long), each removed once Kafka acknowledged it.",
    )
    demote.add_argument("namespace")
    demote.set_defaults(build=lambda a: {"action": "demote", "namespace": a.namespace})

    pause = actions.add_parser(
        "pause",
        help="hold a namespace's or an application's activations back",
        description="Keep consuming and storing the activations of a namespace or an "
        "application, but hand none out until `resume`.",
    )
    _add_target(pause, task=False)
    pause.set_defaults(build=lambda a: _targeted("pause", a))

    resume = actions.add_parser(
        "resume",
        help="lift the control actions on a target",
        description="Lift every control action on the target: a pause or demotion of the "
        "namespace, a pause of the application, the kills of the task. A rule stated in "
        "the runtime rules file stays until the file drops it.",
    )
    _add_target(resume, task=True)
    resume.set_defaults(build=lambda a: _targeted("resume", a))

    show = actions.add_parser(
        "show", help="print the rules in force", description="Print the rules in force."
    )
    show.set_defaults(build=None)

    for action in (kill, demote, pause, resume, show):
        _add_common(action)


def run(arguments: argparse.Namespace) -> int:
    try:
        print(_answer(arguments), end="")
    except (ConfigError, StatusUnavailable, ValueError) as error:
        print(f"taskbroker control: {error}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _answer(arguments: argparse.Namespace) -> str:
    token_file = arguments.token_file or os.environ.get(TOKEN_FILE_ENV, "")
    token = admin_token("" if token_file else os.environ.get(TOKEN_ENV, ""), token_file)
    if arguments.build is None:
        section = fetch_status(arguments.url, arguments.timeout, token).get("runtime_rules")
        if not isinstance(section, dict):
            raise StatusUnavailable("this broker's /status has no runtime_rules section")
        return render_rules(section)
    if token is None:
        raise ConfigError(f"the admin token is needed: set {TOKEN_ENV} or --token-file")
    request = arguments.build(arguments)
    request["who"] = arguments.who
    answer = _post(arguments.url, arguments.timeout, token, request)
    return f"{answer['result']}\n{render_rules(answer['runtime_rules'])}"


def _post(url: str, timeout_s: float, token: str, request: dict[str, Any]) -> dict[str, Any]:
    endpoint = url.rstrip("/") + CONTROL_PATH
    http_request = urllib.request.Request(
        endpoint,
        data=json.dumps(request).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]
        raise StatusUnavailable(f"{endpoint}: HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise StatusUnavailable(f"{endpoint}: {getattr(error, 'reason', error)}") from None
    answer = json.loads(body)
    if not isinstance(answer, dict) or "result" not in answer:
        raise StatusUnavailable(f"{endpoint}: an answer without a result")
    return answer


def _kill(arguments: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"action": "kill", "taskname": arguments.taskname}
    if arguments.select_arg:
        request["select_arg"] = _selectors(arguments.select_arg, "--select-arg")
    if arguments.select_kwarg:
        request["select_kwarg"] = _selectors(arguments.select_kwarg, "--select-kwarg")
    return request


def _selectors(pairs: list[str], flag: str) -> dict[str, object]:
    selectors: dict[str, object] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            selectors[key] = json.loads(text)
        except ValueError:
            selectors[key] = text
    return selectors


def _targeted(action: str, arguments: argparse.Namespace) -> dict[str, Any]:
    request = {"action": action}
    for name in ("namespace", "application", "taskname"):
        value = getattr(arguments, name, None)
        if value:
            request[name] = value
    return request


def _add_target(parser: argparse.ArgumentParser, *, task: bool) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--namespace", help="a namespace, in every application")
    target.add_argument("--application", help="an application, every namespace of it")
    if task:
        target.add_argument("--task", dest="taskname", help="a task name (its kills)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the broker's ops endpoint (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"a file holding the admin token (default: ${TOKEN_FILE_ENV}, else ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--who",
        default=_operator(),
        help="who takes the action, for the broker's log and /status (default: user@host)",
    )


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
