"""The status page as an operator's screen: the history ring (plain, no thread), values in
words, the page's weight with a full ring, /status/history on a real endpoint, and the page
in a real headless Chromium against a broker under a little load."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pykka
import pytest
from prometheus_client import CollectorRegistry

from actors.embedded_kafka import EmbeddedKafka
from actors.messages import Ingest
from actors.metrics import MAILBOX_BUCKETS
from actors.ops_history import History, HistoryRecorder, Reading, Sample
from actors.ops_http import BrokerFacts, OpsAccess, OpsEndpoint, OpsServer
from actors.records import KafkaOffset, Offset, Partition
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.status_page import duration, human_bytes, label, render_html, shown
from loadtest.chromium import ChromiumUnavailable, dump_dom, ensure_chromium, screenshot
from tests.factories import make_record
from tests.ops_support import http_get, put_load, running_broker, wait_until

TIMEOUT_S = 5.0
CHART_TITLES = {
    "Tasks per second",
    "Kafka lag (messages not committed)",
    "Flushes per second",
    "Flush duration (mean per interval)",
    "Mailbox depth (messages waiting)",
    "Time in mailbox, p99",
}
PAGE_BUDGET_BYTES = 300_000
"""The page and its data stay under a few hundred KB, whatever the uptime."""


def waits(**buckets: int) -> list[int]:
    """Bucket counts by index (`b0`, `b3`, ...), zero elsewhere."""
    counts = [0] * (len(MAILBOX_BUCKETS) + 1)
    for name, count in buckets.items():
        counts[int(name[1:])] = count
    return counts


# --- the history, without a thread ----------------------------------------------------------


def test_the_first_reading_starts_an_interval_and_the_next_gives_rates() -> None:
    history = History(interval_s=5.0)
    first = Reading(at=100.0, ingested=1000, claims=10, results=5, flushes=2, flush_seconds=0.1)
    assert history.record(first) is None
    assert history.samples() == []

    sample = history.record(
        Reading(
            at=105.0,
            ingested=1500,
            claims=60,
            results=55,
            flushes=12,
            flush_seconds=0.3,
            kafka_lag=7,
            depth={"state": 3},
        )
    )

    assert sample is not None
    assert history.samples() == [sample]
    assert history.latest() == sample
    assert (sample.ingested_per_s, sample.claims_per_s, sample.results_per_s) == (100, 10, 10)
    assert sample.flushes_per_s == 2.0
    assert sample.flush_ms == pytest.approx(20.0)  # 0.2 s over 10 flushes
    assert (sample.kafka_lag, sample.depth) == (7, {"state": 3})


def test_an_unknown_counter_or_one_that_went_back_has_no_rate() -> None:
    history = History()
    history.record(Reading(at=0.0, ingested=None, claims=50, results=10))
    sample = history.record(Reading(at=5.0, ingested=100, claims=20, results=10))
    assert sample is not None
    assert sample.ingested_per_s is None  # the consumer had not answered before
    assert sample.claims_per_s is None  # 50 then 20: the state restarted
    assert sample.results_per_s == 0.0
    assert sample.flush_ms is None  # no flush in the interval


def test_a_reading_that_does_not_move_the_clock_is_ignored() -> None:
    history = History()
    history.record(Reading(at=10.0, claims=0))
    assert history.record(Reading(at=10.0, claims=5)) is None
    assert history.record(Reading(at=9.0, claims=5)) is None
    sample = history.record(Reading(at=12.0, claims=10))
    assert sample is not None
    assert sample.claims_per_s == 5.0  # from the reading at 10 s, with 0 claims


def test_the_ring_keeps_only_its_capacity_oldest_out_first() -> None:
    history = History(capacity=3)
    for second in range(10):
        history.record(Reading(at=float(second), claims=second * 2))
    assert [s.at for s in history.samples()] == [7.0, 8.0, 9.0]
    with pytest.raises(ValueError, match="capacity"):
        History(capacity=0)


def test_time_in_mailbox_p99_counts_only_the_intervals_messages() -> None:
    history = History()
    # Before: 1,000 slow messages (bucket 8: 0.1 to 0.25 s). In the interval: 100 fast ones
    # (bucket 1: 25 to 100 µs) and none for the writer.
    history.record(Reading(at=0.0, waits={"state": waits(b8=1000), "writer": waits(b2=4)}))
    sample = history.record(
        Reading(at=5.0, waits={"state": waits(b8=1000, b1=100), "writer": waits(b2=4)})
    )
    assert sample is not None
    p99 = sample.wait_p99_ms["state"]
    assert p99 is not None
    assert p99 == pytest.approx(0.025 + 0.075 * 0.99, abs=0.001)  # ms, within 25 to 100 µs
    assert sample.wait_p99_ms["writer"] is None


def test_time_in_mailbox_past_the_last_bound_reads_as_the_last_bound() -> None:
    history = History()
    history.record(Reading(at=0.0, waits={"state": waits()}))
    sample = history.record(Reading(at=5.0, waits={"state": waits(b12=3)}))
    assert sample is not None
    assert sample.wait_p99_ms["state"] == MAILBOX_BUCKETS[-1] * 1000


def test_the_recorder_reads_at_once_and_then_every_interval() -> None:
    history = History(interval_s=0.02)
    readings = iter(range(1_000_000))
    recorder = HistoryRecorder(history, lambda: Reading(at=time.time(), claims=next(readings) * 10))
    recorder.start()
    try:
        wait_until(lambda: len(history.samples()) >= 3, "three samples", TIMEOUT_S)
    finally:
        recorder.stop()
    assert all(s.claims_per_s is not None and s.claims_per_s > 0 for s in history.samples())
    assert "status-history" not in {t.name for t in threading.enumerate()}


# --- values in words -------------------------------------------------------------------------


def test_values_are_shown_in_words_and_units() -> None:
    assert shown("flush_outstanding", True) == "yes"
    assert shown("ingest_paused", False) == "no"
    assert shown("store_db_bytes", 512) == "512 B"
    assert shown("store_db_bytes", 5 * 1024 * 1024 + 300_000) == "5.3 MiB"
    assert human_bytes(1536) == "1.5 KiB"
    assert shown("oldest_pending_age_s", 42.25) == "42.2 s"
    assert duration(3725) == "1 h 02 min"
    assert duration(250) == "4 min 10 s"
    assert shown("claims_per_s", 1234.5) == "1,234 /s"
    assert shown("flush_ms", 3.14159) == "3.14 ms"
    assert shown("kafka_consumed", 1234567) == "1,234,567"
    assert shown("anything", None) == "—"
    assert label("store_db_bytes") == "Database size"
    assert label("kafka_lag_messages") == "Kafka lag (messages not committed)"
    assert label("paused_namespaces") == "Paused namespaces"


# --- the page --------------------------------------------------------------------------------

ACTORS = ("state", "writer", "upkeep", "consumer", "frontend", "pusher")


def full_ring(now: float) -> list[Sample]:
    """A history as full as it gets: 180 samples, every value present, six actors."""
    history = History()
    for n in range(history.capacity + 1):
        history.record(
            Reading(
                at=now - (history.capacity - n) * history.interval_s,
                ingested=n * 12_345,
                claims=n * 12_000,
                results=n * 11_999,
                flushes=n * 100,
                flush_seconds=n * 1.234,
                kafka_lag=n * 1000,
                depth=dict.fromkeys(ACTORS, n * 37 % 10000),
                waits={actor: waits(b1=n * 100, b3=n * 3, b8=n) for actor in ACTORS},
            )
        )
    samples = history.samples()
    assert len(samples) == history.capacity
    return samples


def status_of(now: float, **more: Any) -> dict[str, Any]:
    actors = [
        {
            "name": name,
            "alive": True,
            "mailbox": {
                "name": name,
                "size": 10_000,
                "policy": "block" if name != "state" else "fail",
                "depth": 1,
                "high_water": 10_000,
                "overflows": 0,
            },
        }
        for name in ACTORS
    ]
    facts = BrokerFacts(
        version="9.9.9",
        started_at=now - 7200,
        kafka_bootstrap="kafka-0:9092,kafka-1:9092",
        kafka_topic="taskworker",
        kafka_consumer_group="taskbroker",
        db_path="/var/lib/taskbroker/inflight.sqlite",
        store_mode="memory",
        delivery_mode="pull",
        mailbox_push_timeout_ms=dict.fromkeys(ACTORS, 1000),
    )
    return {
        "ready": True,
        "generated_at": now,
        "actors": actors,
        "counts_by_status": {"pending": 123_456, "processing": 512},
        "headline": {
            "store_db_bytes": 3 * 1024**3,
            "flush_outstanding": True,
            "kafka_lag_messages": 180_000,
        },
        "snapshot_age_s": {"state": 0.4},
        "broker": facts.to_json(now),
        "rates": {"ingested_per_s": 2469.0, "claims_per_s": 2400.0},
        **more,
    }


@dataclass
class Figure:
    points: int
    max: float


class PageReader(HTMLParser):
    """The charts (by title), what a browser would fetch, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, Figure] = {}
        self.fetched: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._figure: Figure | None = None
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = dict(attrs)
        for name in ("src", "href", "action", "data", "xlink:href"):
            if attributes.get(name):
                self.fetched.append(str(attributes[name]))
        if tag == "figure":
            self._figure = Figure(
                int(attributes["data-points"] or 0), float(attributes["data-max"] or 0)
            )
        self._in_caption = tag == "figcaption"

    def handle_endtag(self, tag: str) -> None:
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._in_caption and self._figure is not None:
            self.figures[data.strip()] = self._figure
        if data.strip():
            self.text.append(data.strip())


def read_page(page: str) -> PageReader:
    reader = PageReader()
    reader.feed(page)
    reader.close()
    return reader


def test_a_full_ring_draws_every_chart_and_the_page_stays_light() -> None:
    now = 1_800_000_000.0
    samples = full_ring(now)
    page = render_html(status_of(now), samples)

    assert len(page.encode()) < PAGE_BUDGET_BYTES
    history_json = json.dumps({"samples": [s.to_json() for s in samples]})
    assert len(history_json.encode()) < PAGE_BUDGET_BYTES
    reader = read_page(page)
    assert set(reader.figures) == CHART_TITLES
    assert reader.figures["Tasks per second"].points == 3 * len(samples)
    assert reader.figures["Mailbox depth (messages waiting)"].points == len(ACTORS) * len(samples)
    assert reader.figures["Time in mailbox, p99"].points == len(ACTORS) * len(samples)
    assert reader.fetched == []  # nothing from anywhere: no network needed
    assert not reader.tags & {"script", "link", "img", "iframe", "object"}


def test_the_page_says_it_in_words() -> None:
    now = 1_800_000_000.0
    reader = read_page(render_html(status_of(now), full_ring(now)))
    text = " ".join(reader.text)
    for expected in (
        "ready",
        "version 9.9.9",
        "up for 2 h 00 min",
        "Kafka bootstrap servers",
        "kafka-0:9092,kafka-1:9092",
        "/var/lib/taskbroker/inflight.sqlite",
        "Database size",
        "3.0 GiB",
        "Flush with the writer now",
        "yes",
        "sender refused (fail)",
        "sender waits up to 1,000 ms (block)",
        "2,469 /s",
        "123,456",
    ):
        assert expected in text, expected
    for raw_key in ("store_db_bytes", "flush_outstanding", "True", "False", "kafka_bootstrap"):
        assert raw_key not in text, raw_key


def test_a_section_the_page_does_not_know_is_drawn_as_a_table_in_words() -> None:
    now = 1_800_000_000.0
    rules = {
        "killswitch_entries": 2,
        "paused_namespaces": ["billing", "reports"],
        "file": {"path": "/etc/taskbroker/rules.json", "loaded_at": now - 60, "error": None},
    }
    reader = read_page(render_html(status_of(now, runtime_rules=rules)))
    text = reader.text
    assert "Runtime rules" in text
    assert "Killswitch entries" in text
    assert "billing, reports" in text
    assert "File — Path" in text
    assert "/etc/taskbroker/rules.json" in text
    assert "File — Loaded at" in text
    assert shown("loaded_at", now - 60) in text
    assert "File — Error" in text


def test_the_page_escapes_what_it_shows() -> None:
    now = 1_800_000_000.0
    status = status_of(now, **{"<b>section</b>": {"<script>": "<img src=x>"}})
    status["actors"][0]["name"] = "<script>x</script>"
    page = render_html(status, full_ring(now))
    assert "<script>" not in page
    assert "<img" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page


def test_an_empty_history_says_so_instead_of_drawing() -> None:
    reader = read_page(render_html(status_of(1_800_000_000.0)))
    assert all(figure.points == 0 for figure in reader.figures.values())
    assert "no data yet: one point every few seconds" in reader.text


# --- /status/history on a real endpoint ------------------------------------------------------


@dataclass
class Running:
    ops: OpsEndpoint
    state: pykka.ActorRef[Any]

    @property
    def url(self) -> str:
        assert self.ops.url is not None
        return self.ops.url


@pytest.fixture
def endpoint() -> Iterator[Running]:
    actors: list[tuple[str, pykka.ActorRef[Any]]] = []
    ops = OpsEndpoint(lambda: list(actors), lambda: True, "127.0.0.1", 0, history_interval_s=0.1)
    state = StateActor.start(StateConfig(), MailboxConfig(size=100), observer=ops.metrics.mailbox)
    actors.append(("state", state))
    ops.snapshots.watch(state=state)
    ops.start()
    try:
        yield Running(ops, state)
    finally:
        ops.stop()
        state.stop(timeout=TIMEOUT_S)


def test_history_endpoint_answers_the_samples_as_json(endpoint: Running) -> None:
    endpoint.state.tell(
        Ingest(
            tuple(make_record(f"r{n}") for n in range(5)),
            (KafkaOffset(Partition(0), Offset(4)),),
        )
    )

    def history() -> dict[str, Any]:
        code, body = http_get(f"{endpoint.url}/status/history")
        assert code == 200
        answer: dict[str, Any] = json.loads(body)
        return answer

    wait_until(lambda: len(history()["samples"]) >= 2, "two samples", TIMEOUT_S)
    answer = history()
    assert answer["interval_s"] == 0.1
    assert answer["capacity"] == 180
    latest = answer["samples"][-1]
    assert latest["depth"] == {"state": 0}
    assert set(latest["wait_p99_ms"]) == {"state"}
    assert latest["claims_per_s"] == 0.0
    status = json.loads(http_get(f"{endpoint.url}/status")[1])
    assert set(status["rates"]) >= {"ingested_per_s", "claims_per_s", "flushes_per_s"}
    assert status["counts_by_status"]["pending"] == 5


def test_a_section_added_to_the_endpoint_appears_in_json_and_on_the_page(
    endpoint: Running,
) -> None:
    endpoint.ops.add_section("runtime_rules", lambda: {"paused_namespaces": ["billing"]})
    with pytest.raises(ValueError, match="runtime_rules"):
        endpoint.ops.add_section("runtime_rules", dict)

    status = json.loads(http_get(f"{endpoint.url}/status")[1])
    assert status["runtime_rules"] == {"paused_namespaces": ["billing"]}
    page = read_page(http_get(f"{endpoint.url}/status.html")[1])
    assert "Paused namespaces" in page.text
    assert "billing" in page.text


def test_history_needs_the_token_when_status_does() -> None:
    token = "s3cret-admin-token-0123456789"
    server = OpsServer(
        "127.0.0.1",
        0,
        CollectorRegistry(),
        status=dict,
        ready=lambda: True,
        access=OpsAccess(token, status_needs_token=True),
        history=History(),
    )
    server.start()
    try:
        assert http_get(f"{server.url}/status/history")[0] == 401
        request = urllib.request.Request(
            f"{server.url}/status/history", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            assert json.loads(response.read())["samples"] == []
    finally:
        server.stop()


# --- in a real browser, against a broker under load ------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing; the test is skipped, saying
    why, only when it cannot be installed."""
    try:
        return ensure_chromium()
    except ChromiumUnavailable as error:
        pytest.skip(f"no headless browser: {error}")


@pytest.mark.kafka
@pytest.mark.slow
def test_the_page_renders_in_chromium_with_charts_that_have_data(
    kafka: EmbeddedKafka, tmp_path: Path, chromium: str
) -> None:
    with running_broker(kafka, tmp_path) as running:
        history_url = f"{running.metrics_url}/status/history"

        def results_per_s() -> list[float | None]:
            return [s["results_per_s"] for s in json.loads(http_get(history_url)[1])["samples"]]

        # One reading every 5 s, the first before the state actor started: the load goes in
        # once an interval has known the state at both ends, so the next one sees it.
        wait_until(lambda: any(r is not None for r in results_per_s()), "a rate", 30)
        put_load(running, kafka, count=200)
        wait_until(lambda: any(r for r in results_per_s()), "the history to hold the load", 30)
        page_url = f"{running.metrics_url}/status.html"
        dom = dump_dom(chromium, page_url)
        picture = screenshot(chromium, page_url, tmp_path / "status.png")

    reader = read_page(dom)
    assert set(reader.figures) == CHART_TITLES
    for title, figure in reader.figures.items():
        assert figure.points >= 1, title
    assert reader.figures["Tasks per second"].max > 0
    assert reader.figures["Time in mailbox, p99"].max > 0
    assert reader.figures["Flush duration (mean per interval)"].max > 0
    text = " ".join(reader.text)
    for expected in ("ready", "Database size", "Kafka topic", running.topic, "Up for"):
        assert expected in text, expected
    assert "store_db_bytes" not in text
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.stat().st_size > 20_000  # a drawn page, not a blank one
