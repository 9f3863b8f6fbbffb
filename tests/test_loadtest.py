"""The load-test tool stays working: its accounting, its broker settings, its report, and
end to end (a real Kafka, real broker processes) a quick comparison of both store modes and
a short produce → first claim latency run."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from actors.config import StoreMode, load
from actors.embedded_kafka import EmbeddedKafka
from loadtest import compare, latency
from loadtest.e2e import (
    BrokerSetup,
    Phase,
    broker_environment,
    cpu_seconds,
    cpu_us_per_task,
    memory_mb,
    percentiles,
    summarize,
    summary_line,
)
from loadtest.plots import write_report
from loadtest.workers import WorkerReport


def test_percentiles_pick_ranks_of_the_sorted_values() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentiles(values) == {"p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 100.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def test_every_produced_id_is_accounted_for() -> None:
    report = WorkerReport(
        latencies_ms={"GetTask": [1.0], "SetTaskStatus": [2.0, 3.0]},
        errors=Counter({"UNAVAILABLE": 1}),
        received=["a", "b", "b", "x"],
        completed=["a", "b", "x"],
        last_completion=12.0,
    )
    result = summarize(Phase(tasks=3), ["a", "b", "c"], report, started_wall=10.0, stopped_wall=13)
    assert (result["completed"], result["lost"], result["duplicates"]) == (2, 1, 1)
    assert (result["unexpected"], result["errors"], result["timed_out"]) == (1, 1, True)
    assert result["tasks_per_s"] == 1.0  # 2 completed over the 2 s to the last completion


def test_the_first_claim_of_a_task_is_the_one_kept() -> None:
    first = WorkerReport(claim_latencies_ms={"a": 5.0})
    first.merge(WorkerReport(claim_latencies_ms={"a": 900.0, "b": 7.0}))
    assert first.claim_latencies_ms == {"a": 5.0, "b": 7.0}


def test_the_broker_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    setup = BrokerSetup(store_mode="sqlite-direct", commit_delay_ms=200, grpc_max_workers=8)
    environment = broker_environment(setup, "127.0.0.1:9", "t", 5000, tmp_path / "db")
    config = load(env=environment)
    assert config.store_mode is StoreMode.SQLITE_DIRECT
    assert config.store.debug_commit_delay_ms == 200
    assert (config.grpc_addr, config.grpc_port, config.grpc_max_workers) == ("127.0.0.1", 5000, 8)
    assert config.max_pending_count >= 2 * setup.max_tasks
    assert config.metrics_port == 0
    assert setup.metrics_url is None


def test_a_broker_set_up_with_a_metrics_port_serves_it_on_loopback(tmp_path: Path) -> None:
    setup = BrokerSetup(metrics_port=9123)
    config = load(env=broker_environment(setup, "127.0.0.1:9", "t", 5000, tmp_path / "db"))
    assert (config.metrics_addr, config.metrics_port) == ("127.0.0.1", 9123)
    assert setup.metrics_url == "http://127.0.0.1:9123/metrics"


def test_cpu_per_task_is_the_broker_cpu_over_completed_tasks() -> None:
    assert cpu_us_per_task(1.5, 1500) == 1000.0
    assert cpu_us_per_task(0.25, 0) is None


def _phase(mode: str, workers: int, delay_ms: int, tasks_per_s: float) -> dict[str, Any]:
    """The keys of a phase result that the summaries read."""
    return {
        "store_mode": mode,
        "commit_delay_ms": delay_ms,
        "workers": workers,
        "tasks_per_s": tasks_per_s,
        "latency_ms": {"p50": 10.0, "p90": 20.0, "p99": 30.0 + delay_ms, "max": 40.0},
        "broker": {"cpu_s": 1.0, "cpu_us_per_task": 900.0 + delay_ms},
        "errors": 0,
        "lost": 0,
        "duplicates": 0,
    }


def test_a_phase_line_shows_the_cpu_per_task_beside_tasks_per_s() -> None:
    line = summary_line(_phase("memory", 256, 2, 1234.0))
    assert "memory, 2 ms commits, 256 workers: 1,234 tasks/s" in line
    assert "broker CPU 902 µs/task" in line
    without_broker = {**_phase("memory", 256, 0, 1.0), "broker": {}}
    assert "broker CPU - µs/task" in summary_line(without_broker)


def _fake_compare() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compare's JSON and phases as a run of both modes would leave them, without a run."""
    phases = [
        _phase(mode, workers, delay, rate)
        for mode, rate in (("memory", 1000.0), ("sqlite-direct", 800.0))
        for workers, delay in ((32, 0), (256, 0), (768, 0), (256, 2), (256, 10), (256, 200))
    ]
    results: dict[str, Any] = {
        mode: {
            "by_workers": {
                str(p["workers"]): compare.phase_row(p)
                for p in phases
                if p["store_mode"] == mode and p["commit_delay_ms"] == 0
            },
            "p99_ms_no_delay": 30.0,
            "p99_ms_commit_delay": 230.0,
            "restore_100k_s": 1.5,
        }
        for mode in compare.MODES
    }
    results[compare.SWEEP] = compare.sweep_summary(phases)
    return results, phases


def test_the_sweep_holds_each_delay_for_each_mode_at_256_workers() -> None:
    sweep = _fake_compare()[0]["commit_latency_sweep"]
    assert list(sweep) == ["0", "2", "10"]
    for delay, rows in sweep.items():
        assert set(rows) == {"memory", "sqlite-direct"}
        assert rows["memory"]["tasks_per_s"] == 1000.0
        assert rows["sqlite-direct"]["p99_ms"] == 30.0 + int(delay)
        assert rows["sqlite-direct"]["cpu_us_per_task"] == 900.0 + int(delay)


def test_the_table_and_the_report_show_cpu_per_task_and_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, phases = _fake_compare()
    compare.print_table(results)
    printed = capsys.readouterr().out
    assert "cpu   900 µs" in printed
    assert "10 ms commits" in printed
    written = write_report(results, {"command": "test", "phases": phases}, tmp_path)
    assert {path.name for path in written} >= {"commit_latency_sweep.png", "report.html"}
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "broker CPU µs/task" in page
    assert "256 workers, 10 ms commits" in page


def _exposition(observations: list[tuple[str, float]]) -> str:
    registry = CollectorRegistry()
    histogram = Histogram(
        latency.BROKER_HISTOGRAM.removesuffix("_seconds"),
        "received_at to first claim",
        ["namespace", "taskname"],
        unit="seconds",
        registry=registry,
        buckets=(0.01, 0.1, 1.0),
    )
    for taskname, seconds in observations:
        histogram.labels("default", taskname).observe(seconds)
    return generate_latest(registry).decode()


def test_the_broker_histogram_is_summed_over_its_labels() -> None:
    exposition = _exposition([("a", 0.005), ("b", 0.05), ("b", 0.5)])
    buckets = latency.histogram_buckets(exposition, latency.BROKER_HISTOGRAM)
    assert buckets == {0.01: 1.0, 0.1: 2.0, 1.0: 3.0, float("inf"): 3.0}
    assert latency.histogram_buckets(exposition, "taskbroker_other_seconds") is None


def test_quantiles_are_interpolated_within_buckets_as_prometheus_does() -> None:
    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert latency.bucket_quantile(0.5, buckets) == pytest.approx(0.01)
    assert latency.bucket_quantile(0.7, buckets) == pytest.approx(0.055)
    assert latency.bucket_quantile(0.25, buckets) == pytest.approx(0.005)
    assert latency.bucket_quantile(0.99, {0.1: 1.0, float("inf"): 2.0}) == 0.1
    assert latency.bucket_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_the_broker_side_counts_only_what_was_observed_between_scrapes() -> None:
    before = {0.01: 5.0, 0.1: 5.0, float("inf"): 5.0}
    after = {0.01: 5.0, 0.1: 15.0, float("inf"): 15.0}
    assert latency.broker_side(before, after) == {
        "absent": False,
        "count": 10,
        "p50_ms": pytest.approx(55.0),
        "p99_ms": pytest.approx(99.1),
    }
    assert latency.broker_side(None, None) == {"absent": True}


def test_cpu_and_memory_are_read_from_proc() -> None:
    assert cpu_seconds(os.getpid()) > 0
    memory = memory_mb(os.getpid())
    assert 0 < memory["rss_mb"] <= memory["rss_peak_mb"]


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_compare_accounts_for_every_task_in_both_modes(
    kafka: EmbeddedKafka, tmp_path: Path
) -> None:
    summary_path, out = tmp_path / "compare.json", tmp_path / "results"
    exit_code = compare.main(
        ["--quick", "--kafka", kafka.bootstrap, "--json", str(summary_path), "--out", str(out)]
    )
    assert exit_code == 0
    results = json.loads(summary_path.read_text())
    assert set(results) == {"memory", "sqlite-direct", "commit_latency_sweep"}
    for summary in compare.by_mode(results).values():
        assert set(summary) == {
            "by_workers",
            "p99_ms_no_delay",
            "p99_ms_commit_delay",
            "restore_100k_s",
        }
        assert set(summary["by_workers"]) == {"32", "256", "768"}
        for row in summary["by_workers"].values():
            assert set(row) == {
                "tasks_per_s",
                "p50_ms",
                "p99_ms",
                "cpu_us_per_task",
                "errors",
                "lost",
                "duplicates",
            }
            assert (row["lost"], row["duplicates"]) == (0, 0)
            assert row["tasks_per_s"] > 0
            assert row["cpu_us_per_task"] > 0
        assert summary["restore_100k_s"] > 0
    sweep = results["commit_latency_sweep"]
    assert set(sweep) == {"0", "2", "10"}
    for rows in sweep.values():
        assert set(rows) == {"memory", "sqlite-direct"}
        assert all(row["tasks_per_s"] > 0 and row["p99_ms"] > 0 for row in rows.values())
    assert json.loads((out / "compare.json").read_text()) == results
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5


@pytest.mark.kafka
@pytest.mark.slow
def test_a_short_latency_run_claims_every_task(kafka: EmbeddedKafka, tmp_path: Path) -> None:
    result_path = tmp_path / "latency.json"
    exit_code = latency.main(
        ["--tasks", "20", "--rate", "40", "--kafka", kafka.bootstrap, "--json", str(result_path)]
    )
    assert exit_code == 0
    result = json.loads(result_path.read_text())
    assert (result["claimed"], result["lost"], result["duplicates"]) == (20, 0, 0)
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["max"]
    assert result["broker_latency_ms"] is not None  # read, whether or not the broker has it
