"""`taskbroker status`: a running broker's /status as a terminal table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from actors.control import render_rules
from actors.errors import ConfigError, RecoverableError
from actors.ops_http import admin_token
from actors.status_page import label, shown

DEFAULT_URL: Final = "http://127.0.0.1:9090"
TOKEN_ENV: Final = "TASKBROKER_OPS_ADMIN_TOKEN"
TOKEN_FILE_ENV: Final = "TASKBROKER_OPS_ADMIN_TOKEN_FILE"
"""The broker's own variables, so the same environment configures both."""

EXIT_OK: Final = 0
EXIT_UNREACHABLE: Final = 1


class StatusUnavailable(RecoverableError):
    """The broker's /status did not answer, or did not answer JSON."""


def fetch_status(url: str, timeout_s: float, token: str | None = None) -> dict[str, Any]:
    """GET `url`/status as JSON. `url` is the ops endpoint's base (`http://host:9090`);
    `token`, the admin token, is sent when given."""
    endpoint = url.rstrip("/") + "/status"
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(endpoint, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code == HTTPStatus.UNAUTHORIZED:
            hint = "wrong" if token else f"needed: set {TOKEN_ENV} or --token-file"
            raise StatusUnavailable(f"{endpoint}: refused, the admin token is {hint}") from None
        raise StatusUnavailable(f"{endpoint}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise StatusUnavailable(f"{endpoint}: {reason}") from None
    try:
        status = json.loads(body)
    except ValueError:
        raise StatusUnavailable(f"{endpoint}: the answer is not JSON") from None
    if not isinstance(status, dict):
        raise StatusUnavailable(f"{endpoint}: the answer is not a JSON object")
    return status


def render_table(status: Mapping[str, Any]) -> str:
    """The actors' mailboxes, the counts by status and the headline numbers, as aligned
    plain-text tables."""
    generated = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(status.get("generated_at", 0)))
    )
    readiness = "ready" if status.get("ready") else "NOT READY"
    sections = [f"taskbroker: {readiness} (at {generated})"]
    about = _about(status.get("broker") or {}, status.get("headline") or {})
    rates = status.get("rates") or {}
    if rates:
        per_s = ", ".join(
            f"{label(key).lower()} {shown('', rates.get(key))}"
            for key in ("ingested_per_s", "claims_per_s", "results_per_s", "flushes_per_s")
        )
        about.append(
            f"per second: {per_s}; flush {shown('_ms', rates.get('flush_ms'))}, "
            f"Kafka lag {shown('', rates.get('kafka_lag'))}"
        )
    if about:
        sections[0] += "\n" + "\n".join(about)

    actor_rows = []
    for actor in status.get("actors", []):
        mailbox = actor.get("mailbox") or {}
        actor_rows.append(
            [
                actor.get("name", "?"),
                "yes" if actor.get("alive") else "NO",
                mailbox.get("depth", "-"),
                mailbox.get("size", "-"),
                mailbox.get("high_water", "-"),
                mailbox.get("policy", "-"),
                mailbox.get("overflows", "-"),
            ]
        )
    sections.append(
        _table(["ACTOR", "ALIVE", "DEPTH", "SIZE", "HIGH WATER", "POLICY", "OVERFLOWS"], actor_rows)
    )

    counts = status.get("counts_by_status", {})
    count_rows = [[name, n] for name, n in counts.items()]
    sections.append(_table(["STATUS", "ACTIVATIONS"], count_rows or [["(unknown yet)", "-"]]))

    headline = status.get("headline", {})
    if headline:
        sections.append(
            _table(["NOW", "VALUE"], [[label(k), shown(k, v)] for k, v in headline.items()])
        )
    rules = status.get("runtime_rules")
    if isinstance(rules, dict):
        sections.append(render_rules(rules).rstrip("\n"))
    ages = status.get("snapshot_age_s", {})
    stale = {name: age for name, age in ages.items() if age > 10}
    if stale:
        listed = ", ".join(f"{name} {age:.0f} s" for name, age in stale.items())
        sections.append(f"stale numbers (the actor is slow to answer): {listed}")
    return "\n\n".join(sections) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(header), *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _about(broker: Mapping[str, Any], headline: Mapping[str, Any]) -> list[str]:
    """The broker's own facts in two lines; none when the broker did not send them."""
    if not broker:
        return []
    database = str(broker.get("db_path", "?"))
    if "store_db_bytes" in headline:
        database += f" ({shown('_bytes', headline['store_db_bytes'])})"
    return [
        f"version {broker.get('version', '?')}, up for {shown('_s', broker.get('uptime_s'))}",
        f"Kafka {broker.get('kafka_bootstrap', '?')}, topic {broker.get('kafka_topic', '?')}, "
        f"group {broker.get('kafka_consumer_group', '?')}; database {database}",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options, for the CLI's parser."""
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"the broker's metrics and status endpoint (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON instead")
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"a file holding the admin token, for a broker with ops_status_auth = token "
        f"(default: ${TOKEN_FILE_ENV}, else ${TOKEN_ENV}, else no token)",
    )


def run(arguments: argparse.Namespace) -> int:
    token_file = arguments.token_file or os.environ.get(TOKEN_FILE_ENV, "")
    try:
        token = admin_token("" if token_file else os.environ.get(TOKEN_ENV, ""), token_file)
        status = fetch_status(arguments.url, arguments.timeout, token)
    except (StatusUnavailable, ConfigError) as error:
        print(f"taskbroker status: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if arguments.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_table(status), end="")
    return EXIT_OK


def main_status(argv: Sequence[str]) -> int:
    """`taskbroker status [--url URL] [--timeout S] [--json]`: 0 when the broker answered,
    1 when it could not be reached."""
    parser = argparse.ArgumentParser(
        prog="taskbroker status",
        description="Show a running broker's mailboxes and activation counts.",
    )
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))
