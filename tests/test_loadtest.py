"""The load-test tool stays working: its accounting (unary and batch workers), its broker
settings, its reading of the broker's metrics, its report, and end to end (a real Kafka,
real broker processes) a quick comparison of both store modes and both worker protocols
and a short produce → first claim latency run."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from actors.config import StoreMode, load
from actors.embedded_kafka import EmbeddedKafka
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.taskbroker_actors.v1 import batch_pb2
from loadtest import compare, exposition, latency
from loadtest.batch_workers import BatchWorkers
from loadtest.broker import (
    BrokerSetup,
    broker_environment,
    cpu_seconds,
    cpu_us_per_task,
    memory_mb,
)
from loadtest.e2e import (
    MAILBOX_WAIT,
    Phase,
    backlog_ingested,
    mailboxes,
    percentiles,
    summarize,
    summary_line,
)
from loadtest.plots import write_report
from loadtest.rotation import Held, Rotation
from loadtest.workers import Tally, UnaryWorkers, WorkerPlan, WorkerReport


def test_percentiles_pick_ranks_of_the_sorted_values() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentiles(values) == {"p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 100.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def test_every_produced_id_is_accounted_for() -> None:
    report = WorkerReport(
        latencies_ms={"GetTask": [1.0], "SetTaskStatus": [2.0, 3.0]},
        errors=Counter({"UNAVAILABLE": 1}),
        received=["a", "b", "b", "x"],
        received_from=["broker"] * 4,
        completed=["a", "b", "x"],
        task_latencies_ms=[2.0, 3.0, 3.0],
        last_completion=12.0,
        cpu_s=1.5,
    )
    result = summarize(Phase(tasks=3), ["a", "b", "c"], report, started_wall=10.0, stopped_wall=13)
    assert (result["completed"], result["lost"], result["duplicates"]) == (2, 1, 1)
    assert (result["unexpected"], result["errors"], result["timed_out"]) == (1, 1, True)
    assert result["tasks_per_s"] == 1.0  # 2 completed over the 2 s to the last completion
    assert result["task_latency_ms"]["p50"] == 3.0
    assert (result["protocol"], result["batch"], result["backlog"]) == ("unary", 1, False)
    assert result["workers_cpu"] == {"cpu_s": 1.5, "cpu_percent": 50.0}  # over 3 s


def test_batch_slots_map_to_coroutines_of_n_tasks_at_least_one_per_process() -> None:
    batch = BatchWorkers(batch=32)
    assert (Phase(workers=256, processes=4, kind=batch).threads_per_process) == 2
    small = Phase(workers=32, processes=4, kind=batch)
    assert (small.worker_processes, small.threads_per_process) == (1, 1)
    unary = Phase(workers=256, processes=4)
    assert (unary.worker_processes, unary.threads_per_process) == (4, 64)
    assert Phase(workers=2, processes=4).worker_processes == 2
    with pytest.raises(ValueError, match="batch must be at least 1"):
        BatchWorkers(batch=0)


def test_a_call_that_carries_several_results_is_each_task_s_latency() -> None:
    tally = Tally(("ReportAndFetch",))
    tally.completed(["a", "b", "c"], 4.0, "broker")
    tally.completed([], 9.0, "broker")
    assert tally.report.completed == ["a", "b", "c"]
    assert tally.report.task_latencies_ms == [4.0, 4.0, 4.0]
    assert tally.completed_count == 3


def _task(task_id: str) -> pb.TaskActivation:
    return pb.TaskActivation(id=task_id, namespace="default", taskname="loadtest.noop")


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata())


class _ScriptedChannel:
    """A channel to a TaskBatchService stand-in that answers from a script and records what
    it was sent: (method, result ids, the fetch's wait_ms)."""

    def __init__(self, answers: list[list[str] | grpc.StatusCode]) -> None:
        self._answers = answers
        self.calls: list[tuple[str, list[str], int]] = []

    def unary_unary(self, path: str, **_: Any) -> Any:
        method = path.rsplit("/", 1)[1]

        async def call(request: Any, timeout: float) -> batch_pb2.FetchTasksResponse:
            if method == "ReportAndFetch":
                ids, wait_ms = [r.id for r in request.results], request.fetch.wait_ms
            elif method == "ReportResults":
                ids, wait_ms = [r.id for r in request.results], 0
            else:
                ids, wait_ms = [], request.wait_ms
            self.calls.append((method, ids, wait_ms))
            answer = self._answers.pop(0)
            if isinstance(answer, grpc.StatusCode):
                raise _rpc_error(answer)
            return batch_pb2.FetchTasksResponse(tasks=[_task(task_id) for task_id in answer])

        return call


def test_batch_workers_report_what_they_hold_and_account_for_every_task() -> None:
    channel = _ScriptedChannel(
        [
            [],  # an empty waiting fetch: an empty poll, no latency
            ["a", "b"],
            grpc.StatusCode.UNAVAILABLE,  # the results are parked, then sent again
            [],
            ["c"],
            grpc.StatusCode.INVALID_ARGUMENT,  # not retried: c is dropped
            [],
        ]
    )
    kind = BatchWorkers(batch=4, wait_ms=300)
    plan = WorkerPlan(("broker",), 1, 0.0, 0.0, kind)
    # No pause after UNAVAILABLE, so that the parked results are due at the next step.
    worker: Any = kind.worker({"broker": channel}, Rotation(("broker",), 0, pause_s=0.0), plan)

    async def steps() -> tuple[Tally, Held | None]:
        held: Held | None = None
        for _ in range(7):
            held = await worker.step(held)
        return worker.tally, held

    tally, held = asyncio.run(steps())
    assert channel.calls == [
        ("FetchTasks", [], 300),
        ("FetchTasks", [], 300),
        ("ReportAndFetch", ["a", "b"], 0),  # results are not held back by a wait
        ("ReportResults", ["a", "b"], 0),  # parked results fetch nothing more
        ("FetchTasks", [], 300),
        ("ReportAndFetch", ["c"], 0),
        ("FetchTasks", [], 300),
    ]
    assert held is None
    report = tally.report
    assert (report.received, report.completed) == (["a", "b", "c"], ["a", "b"])
    assert report.completed_by_target == {"broker": 2}
    assert (report.empty_polls, dict(report.errors)) == (
        2,
        {"UNAVAILABLE": 1, "INVALID_ARGUMENT": 1},
    )
    assert len(report.task_latencies_ms) == 2
    assert report.task_latencies_ms[0] == report.latencies_ms["ReportResults"][0]
    assert len(report.latencies_ms["FetchTasks"]) == 2
    assert len(report.latencies_ms["ReportAndFetch"]) == 2


def test_the_unary_kind_holds_one_task_per_coroutine() -> None:
    assert (UnaryWorkers.name, UnaryWorkers.batch) == ("unary", 1)


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


def _phase(
    mode: str, workers: int, delay_ms: int, tasks_per_s: float, protocol: str = "unary"
) -> dict[str, Any]:
    """The keys of a phase result that the summaries read."""
    return {
        "store_mode": mode,
        "commit_delay_ms": delay_ms,
        "protocol": protocol,
        "batch": 32 if protocol == "batch" else 1,
        "backlog": False,
        "workers": workers,
        "tasks_per_s": tasks_per_s,
        "task_latency_ms": {"p50": 10.0, "p90": 20.0, "p99": 30.0 + delay_ms, "max": 40.0},
        "broker": {"cpu_s": 1.0, "cpu_us_per_task": 900.0 + delay_ms},
        "mailboxes": {"state": {"high_water": 7, "wait_p99_ms": 0.25}},
        "errors": 0,
        "lost": 0,
        "duplicates": 0,
    }


def test_a_phase_line_shows_the_cpu_per_task_and_the_state_mailbox_beside_tasks_per_s() -> None:
    line = summary_line(_phase("memory", 256, 2, 1234.0))
    assert "memory, 2 ms commits, unary, 256 workers: 1,234 tasks/s" in line
    assert "task p50 10.0 ms, p99 32.0 ms" in line
    assert "broker CPU 902 µs/task" in line
    assert "state mailbox high water 7, wait p99 0.25 ms" in line
    without_broker = {**_phase("memory", 256, 0, 1.0, "batch"), "broker": {}, "mailboxes": {}}
    line = summary_line({**without_broker, "backlog": True})
    assert "batch x32, 256 workers, backlog:" in line
    assert "broker CPU - µs/task, state mailbox high water -, wait p99 - ms" in line
    line = summary_line({**_phase("memory", 256, 0, 1.0, "push"), "refused_pushes": 3})
    assert line.endswith("0 errors, 3 pushes refused")


def _fake_compare() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compare's JSON and phases as a run of both modes would leave them, without a run."""
    phases = [
        _phase(mode, workers, delay, rate)
        for mode, rate in (("memory", 1000.0), ("sqlite-direct", 800.0))
        for workers, delay in ((32, 0), (256, 0), (768, 0), (256, 2), (256, 10), (256, 200))
    ]
    phases += [_phase(mode, 256, 0, 5000.0, "batch") for mode in compare.MODES]
    results: dict[str, Any] = {
        mode: {
            "by_workers": {
                str(p["workers"]): compare.phase_row(p)
                for p in phases
                if p["store_mode"] == mode and p["commit_delay_ms"] == 0
                if p["protocol"] == "unary"
            },
            "by_protocol": {
                p["protocol"]: compare.phase_row(p)
                for p in phases
                if p["store_mode"] == mode and p["commit_delay_ms"] == 0 and p["workers"] == 256
            },
            "p99_ms_no_delay": 30.0,
            "p99_ms_commit_delay": 230.0,
            "restore_100k_s": 1.5,
        }
        for mode in compare.MODES
    }
    results[compare.SWEEP] = compare.sweep_summary(phases)
    pushed = [_phase("memory", workers, 0, 1200.0, "push") for workers in compare.WORKER_COUNTS]
    phases += pushed
    results[compare.DELIVERY] = {
        str(p["workers"]): {
            "pull": results["memory"]["by_workers"][str(p["workers"])],
            "push": compare.phase_row(p),
        }
        for p in pushed
    }
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
    assert "  5,000/s p50    10 p99    30" in printed  # the batch row
    assert "state mailbox: high water     7, p99   0.2 ms" in printed
    assert "768 slots" in printed
    assert "  1,200/s p50    10 p99    30" in printed  # a push row
    written = write_report(results, {"command": "test", "phases": phases}, tmp_path)
    assert {path.name for path in written} >= {"commit_latency_sweep.png", "report.html"}
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "broker CPU µs/task" in page
    assert "256 workers, 10 ms commits" in page
    assert "pull vs push delivery (memory)" in page
    row = page.split("<th>768 worker slots</th>")[1].split("</tr>")[0]
    assert row.startswith("<td>1,000</td>")  # pull, then push
    assert "<td>1,200</td>" in row
    assert "256 workers, batch protocol</th><td>5,000</td>" in page
    assert "state mailbox high water" in page


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
    page = _exposition([("a", 0.005), ("b", 0.05), ("b", 0.5)])
    buckets = exposition.histogram_buckets(page, latency.BROKER_HISTOGRAM)
    assert buckets == {0.01: 1.0, 0.1: 2.0, 1.0: 3.0, float("inf"): 3.0}
    assert exposition.histogram_buckets(page, "taskbroker_other_seconds") is None


def test_quantiles_are_interpolated_within_buckets_as_prometheus_does() -> None:
    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert exposition.bucket_quantile(0.5, buckets) == pytest.approx(0.01)
    assert exposition.bucket_quantile(0.7, buckets) == pytest.approx(0.055)
    assert exposition.bucket_quantile(0.25, buckets) == pytest.approx(0.005)
    assert exposition.bucket_quantile(0.99, {0.1: 1.0, float("inf"): 2.0}) == 0.1
    assert exposition.bucket_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_the_broker_side_counts_only_what_was_observed_between_scrapes() -> None:
    before = {0.01: 5.0, 0.1: 5.0, float("inf"): 5.0}
    after = {0.01: 5.0, 0.1: 15.0, float("inf"): 15.0}
    assert exposition.observed_between(before, after) == {
        "absent": False,
        "count": 10,
        "p50_ms": pytest.approx(55.0),
        "p99_ms": pytest.approx(99.1),
    }
    assert exposition.observed_between(None, None) == {"absent": True}


def _broker_exposition(
    waits: list[tuple[str, str, float]], high_water: dict[str, int], extra: str = ""
) -> str:
    """/metrics as the broker serves it, with the mailbox families the load test reads."""
    registry = CollectorRegistry()
    waited = Histogram(
        MAILBOX_WAIT.removesuffix("_seconds"),
        "time in the mailbox",
        ["actor", "message"],
        unit="seconds",
        registry=registry,
        buckets=(0.001, 0.01, 0.1),
    )
    for actor, message, seconds in waits:
        waited.labels(actor, message).observe(seconds)
    gauge = Gauge(
        "taskbroker_mailbox_high_water_messages", "high water", ["actor"], registry=registry
    )
    for actor, value in high_water.items():
        gauge.labels(actor).set(value)
    return generate_latest(registry).decode() + extra


def test_each_mailbox_reports_its_high_water_and_the_waits_of_the_phase() -> None:
    before = _broker_exposition([("state", "WorkBatch", 0.05)], {"state": 3, "writer": 1})
    after = _broker_exposition(
        [("state", "WorkBatch", 0.05), ("state", "WorkBatch", 0.0005), ("state", "Ingest", 0.005)],
        {"state": 9, "writer": 1},
    )
    found = mailboxes(before, after)
    assert set(found) == {"state", "writer"}
    state = found["state"]
    assert (state["high_water"], state["messages"]) == (9, 2)  # the 0.05 s wait came before
    assert state["wait_p50_ms"] == pytest.approx(1.0)
    assert state["wait_p99_ms"] == pytest.approx(9.82)
    assert found["writer"] == {
        "high_water": 1,
        "messages": 0,
        "wait_p50_ms": None,
        "wait_p99_ms": None,
    }


def test_a_backlog_is_ingested_once_every_task_is_pending_and_flushed() -> None:
    def exposition(pending: int, dirty: int) -> str:
        return _broker_exposition(
            [],
            {},
            f'taskbroker_state_activations{{status="pending"}} {pending}\n'
            f'taskbroker_state_activations{{status="processing"}} 5\n'
            f"taskbroker_state_dirty_records {dirty}\n"
            f"taskbroker_state_flush_outstanding 0\n",
        )

    assert backlog_ingested(exposition(100, 0), 100)
    assert not backlog_ingested(exposition(99, 0), 100)
    assert not backlog_ingested(exposition(100, 3), 100)
    sqlite_direct = _broker_exposition([], {}, 'taskbroker_state_activations{status="pending"} 4\n')
    assert backlog_ingested(sqlite_direct, 4)


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
    assert set(results) == {"memory", "sqlite-direct", "commit_latency_sweep", "delivery"}
    for mode, summary in compare.by_mode(results).items():
        assert set(summary) == {
            "by_workers",
            "by_protocol",
            "p99_ms_no_delay",
            "p99_ms_commit_delay",
            "restore_100k_s",
        }
        assert set(summary["by_workers"]) == {"32", "256", "768"}
        assert set(summary["by_protocol"]) == {"unary", "batch"}
        assert summary["by_protocol"]["unary"] == summary["by_workers"]["256"]
        for row in [*summary["by_workers"].values(), summary["by_protocol"]["batch"]]:
            assert set(row) == {
                "protocol",
                "tasks_per_s",
                "p50_ms",
                "p99_ms",
                "cpu_us_per_task",
                "state_high_water",
                "state_wait_p99_ms",
                "errors",
                "lost",
                "duplicates",
            }
            assert (row["lost"], row["duplicates"]) == (0, 0)
            assert row["tasks_per_s"] > 0
            assert row["cpu_us_per_task"] > 0
            assert row["state_high_water"] >= 1
            # Every claim and result passes the memory design's state actor.
            assert mode == "sqlite-direct" or row["state_wait_p99_ms"] is not None
        assert summary["restore_100k_s"] > 0
    sweep = results["commit_latency_sweep"]
    assert set(sweep) == {"0", "2", "10"}
    for rows in sweep.values():
        assert set(rows) == {"memory", "sqlite-direct"}
        assert all(row["tasks_per_s"] > 0 and row["p99_ms"] > 0 for row in rows.values())
    delivery = results["delivery"]
    assert set(delivery) == {"32", "256", "768"}
    for slots, rows in delivery.items():
        assert rows["pull"] == results["memory"]["by_workers"][slots]
        push = rows["push"]
        assert push["protocol"] == "push"
        assert (push["lost"], push["duplicates"]) == (0, 0)
        assert push["tasks_per_s"] > 0
        assert push["cpu_us_per_task"] > 0
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
