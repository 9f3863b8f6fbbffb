"""The ops HTTP endpoint on a real loopback server, and `taskbroker status` against it.

The server here watches real actors (a state actor and a small actor that can be held
busy); the full broker under load is at the end.
"""

from __future__ import annotations

import functools
import hmac
import importlib.metadata
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pykka
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from actors import config as configuration
from actors.cli import main as cli_main
from actors.config import Config, OpsStatusAuth
from actors.embedded_kafka import EmbeddedKafka
from actors.errors import ConfigError, MailboxFull
from actors.messages import Ingest
from actors.metrics import ActorSnapshots, BrokerCollector, Metrics
from actors.ops_http import OpsAccess, OpsServer, admin_token, status_document
from actors.records import KafkaOffset, Offset, Partition
from actors.runtime import BrokerActor, MailboxConfig, MailboxPolicy
from actors.state import StateActor, StateConfig
from actors.status import EXIT_OK, EXIT_UNREACHABLE, fetch_status, main_status, render_table
from actors.status_page import render_html
from actors.upkeep import UpkeepTick
from tests.factories import make_record
from tests.ops_support import (
    LoadDone,
    RunningBroker,
    http_get,
    put_load,
    running_broker,
    sample,
    scrape,
    settled_families,
)

TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Hold:
    entered: threading.Event
    release: threading.Event


class Holder(BrokerActor):
    def handle(self, message: object) -> object:
        if isinstance(message, Hold):
            message.entered.set()
            message.release.wait(TIMEOUT_S)
        return None


@dataclass
class Endpoint:
    server: OpsServer
    ready: threading.Event
    registry: CollectorRegistry
    actors: list[tuple[str, pykka.ActorRef[Any]]]
    snapshots: ActorSnapshots

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    state = StateActor.start(StateConfig(), MailboxConfig(size=100), observer=metrics.mailbox)
    holder = Holder.start(
        "holder", MailboxConfig(size=1, policy=MailboxPolicy.DROP_NEWEST), metrics.mailbox
    )
    actors: list[tuple[str, pykka.ActorRef[Any]]] = [("state", state), ("holder", holder)]
    snapshots = ActorSnapshots(state=state)
    ready = threading.Event()
    registry.register(BrokerCollector(lambda: actors, snapshots, ready.is_set))
    server = OpsServer(
        "127.0.0.1",
        0,
        registry,
        status=lambda: status_document(actors, snapshots, ready.is_set()),
        ready=ready.is_set,
    )
    server.start()
    try:
        yield Endpoint(server, ready, registry, actors, snapshots)
    finally:
        server.stop()
        for _, ref in reversed(actors):
            ref.stop(timeout=TIMEOUT_S)


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status code, content type, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_healthz_answers_while_the_process_lives(endpoint: Endpoint) -> None:
    assert get(f"{endpoint.url}/healthz")[0] == 200


def test_readyz_follows_readiness(endpoint: Endpoint) -> None:
    assert get(f"{endpoint.url}/readyz")[0] == 503
    endpoint.ready.set()
    assert get(f"{endpoint.url}/readyz")[0] == 200
    endpoint.ready.clear()
    assert get(f"{endpoint.url}/readyz")[0] == 503


def test_unknown_paths_are_404(endpoint: Endpoint) -> None:
    assert get(f"{endpoint.url}/nothing-here")[0] == 404


def test_status_json_carries_every_actor_and_the_counts(endpoint: Endpoint) -> None:
    state = dict(endpoint.actors)["state"]
    records = tuple(make_record(f"r{n}") for n in range(4))
    state.tell(Ingest(records, (KafkaOffset(Partition(0), Offset(3)),)))
    endpoint.snapshots.refresh()

    code, content_type, body = get(f"{endpoint.url}/status")

    assert code == 200
    assert content_type == "application/json"
    status = json.loads(body)
    assert status["ready"] is False
    assert [actor["name"] for actor in status["actors"]] == ["state", "holder"]
    holder = status["actors"][1]
    assert holder["alive"] is True
    assert holder["mailbox"] == {
        "name": "holder",
        "size": 1,
        "policy": "drop_newest",
        "depth": 0,
        "high_water": 0,
        "overflows": 0,
    }
    assert status["counts_by_status"]["pending"] == 4
    assert status["headline"]["dirty_records"] >= 0
    assert status["headline"]["oldest_pending_age_s"] >= 0
    assert set(status["snapshot_age_s"]) == {"state"}


def test_status_counts_a_dropped_message_as_an_overflow(endpoint: Endpoint) -> None:
    holder = dict(endpoint.actors)["holder"]
    entered, release = threading.Event(), threading.Event()
    holder.tell(Hold(entered, release))
    assert entered.wait(TIMEOUT_S)
    try:
        holder.tell("fills the mailbox")
        holder.tell("dropped")  # drop_newest: a tell is dropped without an error
        status = json.loads(get(f"{endpoint.url}/status")[2])
        scraped = get(f"{endpoint.url}/metrics")[2]
    finally:
        release.set()
    mailbox = next(a for a in status["actors"] if a["name"] == "holder")["mailbox"]
    assert (mailbox["depth"], mailbox["high_water"], mailbox["overflows"]) == (1, 1, 1)
    assert 'taskbroker_mailbox_overflows_total{actor="holder",policy="drop_newest"} 1.0' in scraped


class _PageParser(HTMLParser):
    """Collects what a browser would fetch, the refresh header and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []
        self.tags: set[str] = set()
        self.refresh: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = dict(attrs)
        for name in ("src", "href", "action", "data"):
            if attributes.get(name):
                self.fetched.append(str(attributes[name]))
        if tag == "meta" and attributes.get("http-equiv") == "refresh":
            self.refresh = attributes.get("content")

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data.strip())


@pytest.mark.parametrize(("path", "accept"), [("/status.html", None), ("/status", "text/html")])
def test_status_page_renders_without_a_network_and_refreshes_itself(
    endpoint: Endpoint, path: str, accept: str | None
) -> None:
    endpoint.snapshots.refresh()
    code, content_type, body = get(f"{endpoint.url}{path}", accept=accept)

    assert code == 200
    assert content_type.startswith("text/html")
    page = _PageParser()
    page.feed(body)
    page.close()
    assert page.fetched == []  # no stylesheet, script, image or font from anywhere
    assert not page.tags & {"script", "link", "img", "iframe"}
    assert page.refresh is not None
    assert int(page.refresh) > 0
    text = " ".join(page.text)
    for expected in ("state", "holder", "newest dropped (drop_newest)", "NOT READY", "Pending"):
        assert expected in text, expected


def test_status_page_escapes_what_it_shows() -> None:
    status = {
        "ready": True,
        "actors": [{"name": "<script>x</script>", "alive": True, "mailbox": None}],
        "counts_by_status": {},
        "headline": {},
    }
    page = render_html(status)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_metrics_parse_as_prometheus_text(endpoint: Endpoint) -> None:
    endpoint.snapshots.refresh()
    code, content_type, body = get(f"{endpoint.url}/metrics")

    assert code == 200
    assert content_type.startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert families["taskbroker_ready"].samples[0].value == 0
    depth = families["taskbroker_mailbox_depth_messages"]
    assert {s.labels["actor"] for s in depth.samples} == {"state", "holder"}
    assert families["taskbroker_state_activations"].type == "gauge"
    assert families["taskbroker_mailbox_handling_seconds"].type == "histogram"
    assert families["taskbroker_mailbox_overflows"].type == "counter"


def test_a_port_in_use_fails_at_construction() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="metrics_port"):
            OpsServer("127.0.0.1", port, CollectorRegistry(), status=dict, ready=lambda: True)


def test_stop_is_bounded_and_frees_the_port() -> None:
    server = OpsServer("127.0.0.1", 0, CollectorRegistry(), status=dict, ready=lambda: True)
    server.start()
    port = server.port
    assert get(f"{server.url}/healthz")[0] == 200

    started = time.monotonic()
    server.stop(timeout_s=2.0)

    assert time.monotonic() - started < 2.0
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
    assert "ops-http" not in {t.name for t in threading.enumerate()}


# --- taskbroker status -----------------------------------------------------------------------


def test_fetch_status_and_render_the_table(endpoint: Endpoint) -> None:
    endpoint.ready.set()
    endpoint.snapshots.refresh()

    status = fetch_status(endpoint.url, timeout_s=TIMEOUT_S)
    table = render_table(status)

    lines = table.splitlines()
    assert lines[0].startswith("taskbroker: ready")
    header = next(line for line in lines if line.startswith("ACTOR"))
    assert header.split() == [
        "ACTOR",
        "ALIVE",
        "DEPTH",
        "SIZE",
        "HIGH",
        "WATER",
        "POLICY",
        "OVERFLOWS",
    ]
    holder_row = next(line for line in lines if line.startswith("holder"))
    assert holder_row.split() == ["holder", "yes", "0", "1", "0", "drop_newest", "0"]
    assert any(line.split() == ["pending", "0"] for line in lines)


def test_the_table_says_the_broker_its_rates_and_its_numbers_in_words() -> None:
    status = {
        "ready": True,
        "generated_at": 1_800_000_000.0,
        "actors": [],
        "counts_by_status": {"pending": 3},
        "headline": {"store_db_bytes": 3 * 1024 * 1024, "flush_outstanding": False},
        "broker": {
            "version": "1.2.3",
            "uptime_s": 3725.0,
            "kafka_bootstrap": "kafka:9092",
            "kafka_topic": "tasks",
            "kafka_consumer_group": "brokers",
            "db_path": "/data/inflight.sqlite",
        },
        "rates": {"ingested_per_s": 1500.0, "claims_per_s": 12.5, "flush_ms": 2.5},
    }
    table = render_table(status)
    assert "version 1.2.3, up for 1 h 02 min" in table
    assert "Kafka kafka:9092, topic tasks, group brokers" in table
    assert "database /data/inflight.sqlite (3.0 MiB)" in table
    assert "per second: ingested 1,500, claims 12.5, results —, flushes —" in table
    assert "flush 2.50 ms" in table
    rows = {line.split("  ")[0]: line.split()[-1] for line in table.splitlines() if line}
    assert rows["Database size"] == "MiB"
    assert rows["Flush with the writer now"] == "no"
    assert "store_db_bytes" not in table


def test_main_status_prints_the_table_or_json(
    endpoint: Endpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_status(["--url", endpoint.url]) == EXIT_OK
    assert "ACTOR" in capsys.readouterr().out

    assert main_status(["--url", endpoint.url, "--json"]) == EXIT_OK
    assert {a["name"] for a in json.loads(capsys.readouterr().out)["actors"]} == {"state", "holder"}


def test_main_status_reports_an_unreachable_broker(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    code = main_status(["--url", f"http://127.0.0.1:{port}", "--timeout", "1"])
    assert code == EXIT_UNREACHABLE
    assert f"127.0.0.1:{port}/status" in capsys.readouterr().err


# --- access: the admin token -------------------------------------------------------------------

TOKEN = "s3cret-admin-token-0123456789"
MARKER = "marker-actor"


@pytest.fixture
def guarded() -> Iterator[OpsServer]:
    """A server whose /status needs the admin token; its status names a MARKER actor."""
    server = OpsServer(
        "127.0.0.1",
        0,
        CollectorRegistry(),
        status=lambda: {"ready": True, "actors": [{"name": MARKER, "alive": True}]},
        ready=lambda: True,
        access=OpsAccess(TOKEN, status_needs_token=True),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Message, str]:
    """(status code, headers, body) of any request, error statuses included."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def test_probes_and_metrics_stay_open_when_status_needs_the_token(guarded: OpsServer) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        assert call(f"{guarded.url}{path}")[0] == 200, path


@pytest.mark.parametrize("path", ["/status", "/status.html"])
def test_status_needs_the_token_when_configured(guarded: OpsServer, path: str) -> None:
    for token in (None, "wrong-token-of-some-length", TOKEN + "x", ""):
        code, headers, body = call(f"{guarded.url}{path}", token=token)
        assert code == 401, token
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert MARKER not in body
        assert token is None or not token or token not in body

    code, _, body = call(f"{guarded.url}{path}", token=TOKEN)
    assert code == 200
    assert MARKER in body


def test_status_is_open_by_default(endpoint: Endpoint) -> None:
    assert Config().ops_status_auth is OpsStatusAuth.OPEN
    assert call(f"{endpoint.url}/status")[0] == 200
    assert call(f"{endpoint.url}/status.html")[0] == 200
    assert call(f"{endpoint.url}/status", method="HEAD")[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PAUSE"])
@pytest.mark.parametrize("path", ["/status", "/metrics", "/actions/pause", "/nothing-here"])
def test_every_other_method_needs_the_token_before_routing(
    guarded: OpsServer, method: str, path: str
) -> None:
    for token in (None, "wrong-token-of-some-length"):
        code, headers, _ = call(f"{guarded.url}{path}", method=method, token=token)
        assert code == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")

    code, headers, _ = call(f"{guarded.url}{path}", method=method, token=TOKEN)
    if path in {"/status", "/metrics"}:
        assert (code, headers["Allow"]) == (405, "GET, HEAD")
    else:
        assert code == 404


def test_without_a_token_configured_nothing_changes_state(endpoint: Endpoint) -> None:
    for token in (None, "", "anything-at-all-long-enough"):
        assert call(f"{endpoint.url}/nothing-here", method="POST", token=token)[0] == 401


def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    access = OpsAccess(TOKEN)

    assert access.admits(f"Bearer {TOKEN}")
    assert access.admits(f"bearer {TOKEN}")
    assert not access.admits(f"Bearer {TOKEN[:-1]}")
    assert not access.admits(f"Basic {TOKEN}")
    assert not access.admits(None)
    assert len(compared) == 3
    assert TOKEN not in repr(access)


def test_the_admin_token_comes_from_a_file_trimmed(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert admin_token("", str(token_file)) == TOKEN
    assert admin_token(TOKEN, "") == TOKEN
    assert admin_token("", "") is None

    token_file.write_text("short\n")
    with pytest.raises(ConfigError, match="ops_admin_token_file") as refused:
        admin_token("", str(token_file))
    assert "short" not in str(refused.value)
    with pytest.raises(ConfigError, match="ops_admin_token_file: cannot read"):
        admin_token("", str(tmp_path / "missing"))


def test_token_status_auth_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="ops_status_auth"):
        configuration.load(env={"TASKBROKER_OPS_STATUS_AUTH": "token"})
    with pytest.raises(ConfigError, match="either"):
        configuration.load(
            env={"TASKBROKER_OPS_ADMIN_TOKEN": TOKEN, "TASKBROKER_OPS_ADMIN_TOKEN_FILE": "/x"}
        )


def test_the_command_line_refuses_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "--set", f"ops_admin_token={TOKEN}"]) == 2
    err = capsys.readouterr().err
    assert "ops_admin_token: not accepted on the command line" in err
    assert "TASKBROKER_OPS_ADMIN_TOKEN" in err
    assert TOKEN not in err


def test_the_token_never_appears_in_config_status_or_logs(
    guarded: OpsServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TASKBROKER_OPS_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("TASKBROKER_OPS_STATUS_AUTH", "token")
    assert cli_main(["config"]) == 0
    shown = capsys.readouterr().out
    assert 'ops_admin_token = "****"' in shown
    assert 'ops_status_auth = "token"' in shown
    assert TOKEN not in shown
    config = configuration.load(env={"TASKBROKER_OPS_ADMIN_TOKEN": TOKEN})
    assert TOKEN not in repr(config)

    with caplog.at_level(logging.DEBUG):
        for method, token in [("GET", TOKEN), ("GET", TOKEN[:-1]), ("POST", TOKEN)]:
            for path in ("/status", "/status.html", "/actions/pause"):
                body = call(f"{guarded.url}{path}", method=method, token=token)[2]
                assert TOKEN not in body
    assert caplog.records  # the requests were logged, at DEBUG
    assert TOKEN not in caplog.text


def test_main_status_sends_the_token_from_the_environment(
    guarded: OpsServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TASKBROKER_OPS_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("TASKBROKER_OPS_ADMIN_TOKEN_FILE", raising=False)
    assert main_status(["--url", guarded.url, "--json"]) == EXIT_UNREACHABLE
    assert "TASKBROKER_OPS_ADMIN_TOKEN" in capsys.readouterr().err

    monkeypatch.setenv("TASKBROKER_OPS_ADMIN_TOKEN", TOKEN)
    assert main_status(["--url", guarded.url, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["actors"][0]["name"] == MARKER


def test_main_status_reads_a_token_file(
    guarded: OpsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main_status(["--url", guarded.url, "--json", "--token-file", str(token_file)]) == 0
    assert MARKER in capsys.readouterr().out


# --- a full broker under a little load ---------------------------------------------------------

ACTOR_NAMES = ("state", "writer", "upkeep", "consumer", "frontend")


@pytest.fixture(scope="module")
def loaded_broker(
    kafka: EmbeddedKafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningBroker, LoadDone, dict[str, Metric]]]:
    with running_broker(kafka, tmp_path_factory.mktemp("ops")) as running:
        load = put_load(running, kafka)
        yield running, load, settled_families(running, load)


def _value(families: dict[str, Metric], family: str, suffix: str = "", **labels: str) -> float:
    value = sample(families, family, f"{family}{suffix}", **labels)
    assert value is not None, f"no {family}{suffix} sample with {labels}"
    return value


@pytest.mark.kafka
@pytest.mark.slow
def test_a_running_broker_exports_every_metric_family_with_plausible_values(
    loaded_broker: tuple[RunningBroker, LoadDone, dict[str, Metric]],
) -> None:
    _, load, families = loaded_broker
    v = functools.partial(_value, families)

    assert v("taskbroker_ready") == 1
    for actor in ACTOR_NAMES:
        assert v("taskbroker_actor_up", actor=actor) == 1
        assert v("taskbroker_mailbox_depth_messages", actor=actor) >= 0
        assert v("taskbroker_mailbox_high_water_messages", actor=actor) >= 1
        assert v("taskbroker_mailbox_overflows", "_total", actor=actor) >= 0
        handled = families["taskbroker_mailbox_handling_seconds"].samples
        assert any(s.labels.get("actor") == actor for s in handled), actor
    assert v("taskbroker_mailbox_capacity_messages", actor="upkeep", policy="fail") == 1
    assert v("taskbroker_mailbox_wait_seconds", "_count", actor="state") >= 1
    assert v("taskbroker_mailbox_handling_seconds", "_count", actor="writer") >= 1
    by_type = "taskbroker_mailbox_messages_handled"
    assert v(by_type, "_total", actor="state", message="Ingest") >= 1
    assert v(by_type, "_total", actor="writer", message="Flush") >= 1
    busy = "taskbroker_mailbox_message_handling_seconds"
    assert v(busy, "_total", actor="writer", message="Flush") > 0

    # state
    pending = v("taskbroker_state_activations", status="pending")
    assert pending == load.produced - load.completed
    assert v("taskbroker_state_activations", status="processing") == 0
    assert (
        v(
            "taskbroker_state_namespace_activations",
            application="",
            namespace="ops-test",
            status="pending",
        )
        == pending
    )
    assert 0 < v("taskbroker_state_oldest_pending_age_seconds") < 120
    assert v("taskbroker_state_claims", "_total", result="hit") == load.completed
    assert v("taskbroker_state_claims", "_total", result="miss") >= 1
    assert v("taskbroker_state_conclusions", "_total", outcome="applied") == load.completed

    # writer and store
    assert v("taskbroker_writer_flush_duration_seconds", "_count") >= 1
    assert v("taskbroker_writer_flush_rows", "_sum") >= load.produced
    assert v("taskbroker_writer_flush_bytes", "_sum") > 0
    assert v("taskbroker_writer_flush_failures", "_total") == 0
    assert v("taskbroker_store_database_bytes") > 0
    assert v("taskbroker_store_wal_bytes") >= 0

    # Kafka
    assert v("taskbroker_kafka_messages_consumed", "_total") == load.produced + load.undecodable
    assert v("taskbroker_kafka_activations_ingested", "_total") == load.produced
    assert v("taskbroker_kafka_decode_failures", "_total", reason="not a TaskActivation") == 1
    assert v("taskbroker_kafka_dead_lettered", "_total") == 1
    assert v("taskbroker_kafka_assigned_partitions") == 1
    assert v("taskbroker_kafka_paused_partitions") == 0
    assert v("taskbroker_kafka_committed_offset", partition="0") == load.produced + 1
    assert v("taskbroker_kafka_high_watermark_offset", partition="0") == load.produced + 1
    assert v("taskbroker_kafka_consumer_lag_messages", partition="0") == 0

    # gRPC
    requests = "taskbroker_grpc_requests"
    assert v(requests, "_total", method="SetTaskStatus", code="OK") == load.completed
    assert v(requests, "_total", method="GetTask", code="OK") >= 1
    assert v(requests, "_total", method="GetTask", code="NOT_FOUND") >= 1
    latency = "taskbroker_grpc_request_duration_seconds"
    assert v(latency, "_count", method="SetTaskStatus", code="OK") == load.completed
    assert 0 < v(latency, "_sum", method="SetTaskStatus", code="OK") < load.completed * 1.0

    # upkeep
    assert v("taskbroker_upkeep_tick_duration_seconds", "_count") >= 1
    assert abs(time.time() - v("taskbroker_upkeep_last_tick_timestamp_seconds")) < 10
    for kind in ("deadline_reset", "expired", "delay_due", "failed_by_deadline", "produced"):
        assert v("taskbroker_upkeep_transitions", "_total", kind=kind) == 0


@pytest.mark.kafka
@pytest.mark.slow
def test_a_running_brokers_status_carries_every_actor(
    loaded_broker: tuple[RunningBroker, LoadDone, dict[str, Metric]],
) -> None:
    running, load, _ = loaded_broker
    code, body = http_get(f"{running.metrics_url}/status")
    assert code == 200
    status = json.loads(body)

    assert status["ready"] is True
    assert [a["name"] for a in status["actors"]] == list(ACTOR_NAMES)
    for actor in status["actors"]:
        assert actor["alive"] is True
        assert set(actor["mailbox"]) == {
            "name",
            "size",
            "policy",
            "depth",
            "high_water",
            "overflows",
        }
        assert actor["mailbox"]["name"] == actor["name"]
    assert status["counts_by_status"]["pending"] == load.produced - load.completed
    assert status["headline"]["kafka_consumed"] == load.produced + load.undecodable
    assert status["headline"]["kafka_lag_messages"] == 0
    broker = status["broker"]
    config = running.broker.config
    assert (broker["kafka_topic"], broker["db_path"]) == (running.topic, config.db_path)
    assert broker["kafka_bootstrap"] == running.broker.kafka_bootstrap
    assert broker["version"] == importlib.metadata.version("taskbroker-actors")
    assert broker["uptime_s"] > 0
    assert broker["mailbox_push_timeout_ms"]["state"] == config.mailbox.state.push_timeout_ms
    assert render_table(status).count("\n") > len(ACTOR_NAMES)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_mailbox_overflow_on_a_running_broker_moves_its_counter(
    loaded_broker: tuple[RunningBroker, LoadDone, dict[str, Metric]],
) -> None:
    running, _, _ = loaded_broker
    upkeep = running.broker.ref("upkeep")  # mailbox size 1, policy fail
    before = _value(
        scrape(running.metrics_url),
        "taskbroker_mailbox_overflows",
        "_total",
        actor="upkeep",
        policy="fail",
    )

    refused = 0
    deadline = time.monotonic() + 5.0
    while refused == 0 and time.monotonic() < deadline:
        try:
            upkeep.tell(UpkeepTick())  # one more tick now: harmless
        except MailboxFull:
            refused += 1

    assert refused == 1
    after = _value(
        scrape(running.metrics_url),
        "taskbroker_mailbox_overflows",
        "_total",
        actor="upkeep",
        policy="fail",
    )
    assert after == before + 1
    status = json.loads(http_get(f"{running.metrics_url}/status")[1])
    upkeep_status = next(a for a in status["actors"] if a["name"] == "upkeep")
    assert upkeep_status["mailbox"]["overflows"] == after


METRICS_BUDGET_LINES = 600
METRICS_BUDGET_BYTES = 64 * 1024


@pytest.mark.kafka
@pytest.mark.slow
def test_metrics_stay_within_their_budget_after_a_short_load(
    loaded_broker: tuple[RunningBroker, LoadDone, dict[str, Metric]],
) -> None:
    """The budget deploy/README.md states: per-message-type histograms once made this page
    1,149 lines and 101,557 bytes after this load."""
    running, _, families = loaded_broker
    code, body = http_get(f"{running.metrics_url}/metrics")
    assert code == 200
    lines = body.splitlines()
    assert len(lines) < METRICS_BUDGET_LINES, len(lines)
    assert len(body.encode()) < METRICS_BUDGET_BYTES
    # The mailbox histograms are per actor: one series each, whatever the message types.
    for histogram in ("taskbroker_mailbox_wait_seconds", "taskbroker_mailbox_handling_seconds"):
        counts = [s for s in families[histogram].samples if s.name == f"{histogram}_count"]
        assert sorted(s.labels["actor"] for s in counts) == sorted(ACTOR_NAMES)
        assert all(set(s.labels) == {"actor"} for s in counts)
