"""The load-test tool stays working: its accounting, its broker settings, and a quick
comparison of both store modes end to end (a real Kafka, real broker processes)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from actors.config import StoreMode, load
from actors.embedded_kafka import EmbeddedKafka
from loadtest import compare
from loadtest.e2e import (
    BrokerSetup,
    Phase,
    broker_environment,
    cpu_seconds,
    memory_mb,
    percentiles,
    summarize,
)
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


def test_the_broker_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    setup = BrokerSetup(store_mode="sqlite-direct", commit_delay_ms=200, grpc_max_workers=8)
    environment = broker_environment(setup, "127.0.0.1:9", "t", 5000, tmp_path / "db")
    config = load(env=environment)
    assert config.store_mode is StoreMode.SQLITE_DIRECT
    assert config.store.debug_commit_delay_ms == 200
    assert (config.grpc_addr, config.grpc_port, config.grpc_max_workers) == ("127.0.0.1", 5000, 8)
    assert config.max_pending_count >= 2 * setup.max_tasks


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
    assert set(results) == {"memory", "sqlite-direct"}
    for summary in results.values():
        assert set(summary) == {
            "by_workers",
            "p99_ms_no_delay",
            "p99_ms_commit_delay",
            "restore_100k_s",
        }
        assert set(summary["by_workers"]) == {"32", "256", "768"}
        for row in summary["by_workers"].values():
            assert set(row) == {"tasks_per_s", "p50_ms", "p99_ms", "errors", "lost", "duplicates"}
            assert (row["lost"], row["duplicates"]) == (0, 0)
            assert row["tasks_per_s"] > 0
        assert summary["restore_100k_s"] > 0
    assert json.loads((out / "compare.json").read_text()) == results
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
