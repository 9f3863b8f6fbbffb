"""`loadtest chaos`: its accounting, its duplicate bound, its schedule and its fault checks
on made-up inputs; then one short real run (a Tansu, a broker killed twice, Kafka stopped
twice, the disk filled and the database locked) that must lose nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest import chaos
from loadtest.chaos import Applied, recovered, window_checks
from loadtest.chaos_faults import (
    DB_LOCKED,
    DISK_FULL,
    KAFKA_UNREACHABLE,
    KILL,
    RETRY_PRODUCER_FAILING,
    SmallDisk,
    exclusive_lock,
    plan,
)
from loadtest.chaos_report import (
    Executions,
    KillExposure,
    account,
    duplicate_bound,
    exposed_ids,
    exposure_window_s,
    fault_notes,
    longest_flush_s,
    outside_windows,
    rate_series,
    retry_id,
    window_stats,
)


def _executions(
    received: list[tuple[str, float]],
    completed: list[tuple[str, float]],
    retried: tuple[str, ...] = (),
) -> Executions:
    return Executions(
        [task_id for task_id, _ in received],
        [at for _, at in received],
        [task_id for task_id, _ in completed],
        [at for _, at in completed],
        retried,
    )


# --- accounting ---------------------------------------------------------------------------------


def test_a_root_is_done_when_completed_or_when_its_retry_completed() -> None:
    executions = _executions(
        received=[("a", 1.0), ("b", 1.0), (retry_id("b"), 2.0), ("c", 1.0), ("d", 1.0)],
        completed=[("a", 1.1), ("b", 1.1), (retry_id("b"), 2.1), ("c", 1.1)],
        retried=("b", "c"),
    )
    result = account(["a", "b", "c", "d"], executions)
    # c answered RETRY and its retry never ran; d never completed.
    assert result["lost"] == 2
    assert result["lost_ids"] == ["c", "d"]
    assert result["retried"] == 2
    assert result["duplicates"] == 0
    assert result["unexpected"] == 0


def test_each_further_hand_out_of_a_task_is_a_duplicate_and_strangers_are_unexpected() -> None:
    executions = _executions(
        received=[("a", 1.0), ("a", 5.0), ("a", 9.0), ("b", 1.0), ("zzz", 2.0)],
        completed=[("a", 1.1), ("a", 9.1), ("b", 1.1), ("zzz", 2.1)],
    )
    result = account(["a", "b"], executions)
    assert result["lost"] == 0
    assert result["duplicates"] == 2
    assert result["duplicated_ids"] == ["a"]
    assert result["unexpected"] == 1


def test_the_retry_id_is_the_brokers_and_the_same_each_time() -> None:
    assert retry_id("root-1") == retry_id("root-1")
    assert retry_id("root-1") != retry_id("root-2")
    assert len(retry_id("root-1")) == 32


# --- the bound --------------------------------------------------------------------------------


def test_the_window_is_one_interval_and_two_flushes() -> None:
    assert exposure_window_s(0.05, 0.25) == pytest.approx(0.55)


def test_the_longest_flush_is_the_highest_bucket_that_holds_one() -> None:
    inf = float("inf")
    assert longest_flush_s({0.1: 3, 0.25: 5, 0.5: 5, 1.0: 5, inf: 5}, 9.0) == 0.25
    assert longest_flush_s({0.1: 0, 0.25: 0, inf: 0}, 9.0) == 9.0
    assert longest_flush_s({0.1: 1, inf: 2}, 9.0) == 9.0  # past every edge: unknown
    assert longest_flush_s({}, 9.0) == 9.0


def test_a_kill_exposes_recent_changes_and_tasks_held_unacknowledged() -> None:
    executions = _executions(
        received=[("old", 1.0), ("recent", 9.6), ("held", 5.0), ("before-life", 0.5)],
        completed=[("old", 1.1), ("recent", 9.7), ("acked-late", 9.8), ("before-life", 11.5)],
    )
    everything_committed = {0: 1_000}
    positions = {task_id: [(0, n)] for n, task_id in enumerate(["old", "recent", "held"])}
    kill = KillExposure(10.0, 0.5, 0.9, everything_committed)
    # "before-life" was received before this life began; its answer came after the kill.
    assert exposed_ids(executions, kill, positions) == {"recent", "acked-late", "held"}


def test_a_kill_exposes_finished_tasks_whose_messages_were_not_committed() -> None:
    executions = _executions(
        received=[("done-committed", 1.0), ("done-uncommitted", 2.0), ("later", 30.0)],
        completed=[("done-committed", 1.1), ("done-uncommitted", 2.1), ("later", 30.1)],
    )
    positions = {"done-committed": [(0, 4)], "done-uncommitted": [(1, 7)], "later": [(1, 9)]}
    kill = KillExposure(10.0, 0.5, 0.0, {0: 5, 1: 7})
    assert exposed_ids(executions, kill, positions) == {"done-uncommitted"}
    # A partition the broker did not report: nothing known committed there.
    kill = KillExposure(10.0, 0.5, 0.0, {})
    assert exposed_ids(executions, kill, positions) == {"done-committed", "done-uncommitted"}


def test_the_bound_sums_the_kills_and_names_duplicates_no_kill_explains() -> None:
    executions = _executions(
        received=[("x", 9.8), ("x", 12.0), ("y", 1.0), ("y", 30.0), ("z", 19.9)],
        completed=[("x", 9.9), ("x", 12.1), ("y", 1.1), ("y", 30.1), ("z", 20.0)],
    )
    committed = {0: 100, 1: 100}
    kills = [KillExposure(10.0, 0.5, 0.0, committed), KillExposure(20.0, 0.5, 11.0, committed)]
    positions = {"x": [(0, 5)], "y": [(0, 6)], "z": [(0, 7)]}
    result = duplicate_bound(executions, kills, ["x", "y"], positions)
    assert result["per_kill"] == [1, 1]
    assert result["bound"] == 2
    assert result["unexplained_duplicated_ids"] == ["y"]
    # y twice in Kafka: its second execution is explained, and counted in the bound.
    positions["y"] = [(0, 6), (1, 3)]
    result = duplicate_bound(executions, kills, ["x", "y"], positions)
    assert result["bound"] == 3
    assert result["extra_copies_in_kafka"] == 1
    assert result["unexplained_duplicated_ids"] == []


# --- throughput and latency windows ----------------------------------------------------------


def test_rates_per_second_and_windows() -> None:
    times = [0.1, 0.2, 1.5, 3.9]
    assert rate_series([100 + t for t in times], origin=100.0) == [2, 1, 0, 1]
    assert rate_series([], origin=0.0) == []
    inside = window_stats([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 50.0, 4.0], 1.5, 3.5)
    assert inside == {"seconds": 2.0, "tasks": 2, "tasks_per_s": 1.0, "p99_ms": 50.0}
    baseline = outside_windows([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 50.0, 4.0], [(2.5, 3.5)], 0, 5)
    assert baseline["tasks"] == 3
    assert baseline["seconds"] == 4.0
    assert baseline["p99_ms"] == 4.0


# --- the schedule -----------------------------------------------------------------------------


def test_the_plan_spaces_kills_away_from_each_other_and_the_window_faults() -> None:
    windows = {
        KAFKA_UNREACHABLE: 30.0,
        RETRY_PRODUCER_FAILING: 15.0,
        DISK_FULL: 20.0,
        DB_LOCKED: 10,
    }
    faults = plan(production_s=200, kills=20, aimed_kills=10, windows=windows, gap_s=4, seed=3)
    kills = [f for f in faults if f.kind == KILL]
    assert len(kills) == 20
    assert sum(f.aimed for f in kills) == 10
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    others = [f for f in faults if f.kind != KILL]
    assert {f.kind: f.duration_s for f in others} == windows
    for kill in kills:
        assert all(abs(kill.at_s - other.at_s) >= 4 - 0.01 for other in faults if other != kill)
    assert faults == plan(
        production_s=200, kills=20, aimed_kills=10, windows=windows, gap_s=4, seed=3
    )


def test_a_plan_that_cannot_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        plan(production_s=10, kills=20, aimed_kills=0, windows={}, gap_s=4, seed=0)
    with pytest.raises(ValueError, match="aimed"):
        plan(production_s=100, kills=2, aimed_kills=3, windows={}, gap_s=4, seed=0)
    with pytest.raises(ValueError, match="unknown"):
        plan(production_s=100, kills=0, aimed_kills=0, windows={"flood": 1.0}, gap_s=4, seed=0)


def test_bursts_are_cut_from_the_front_and_the_rest_is_paced() -> None:
    ids = [str(n) for n in range(10)]
    bursts, paced = chaos.split_ids(ids, [KAFKA_UNREACHABLE, DISK_FULL], 3)
    assert bursts == {KAFKA_UNREACHABLE: ["0", "1", "2"], DISK_FULL: ["3", "4", "5"]}
    assert paced == ["6", "7", "8", "9"]


def _sample(**values: int) -> dict[str, object]:
    return {"readyz": 200, **values}


def test_a_retry_window_passes_only_when_nothing_counted_as_produced_while_kafka_was_away() -> None:
    record = Applied(RETRY_PRODUCER_FAILING, 0.0, details={"recovered_after_s": 1.5})
    record.samples = [
        _sample(produced=4, produce_failed=0),
        _sample(produced=4, produce_failed=2),
        _sample(produced=4, produce_failed=5),
        _sample(produced=9, produce_failed=5),
    ]
    checks = window_checks(record, acknowledged_in_window=10, retried_in_window=3)
    assert checks["passed"]
    assert checks["produce_failed_during"] == 5
    record.samples[2] = _sample(produced=5, produce_failed=5)
    assert not window_checks(record, acknowledged_in_window=10, retried_in_window=3)["passed"]


def _writes_held(kind: str) -> Applied:
    record = Applied(kind, 0.0, details={"recovered_after_s": 0.5})
    record.samples = [
        _sample(flush_failures=0, committed_offsets=100),
        _sample(flush_failures=1, committed_offsets=120),
        _sample(flush_failures=3, committed_offsets=120),
        _sample(flush_failures=3, committed_offsets=120),
        _sample(flush_failures=3, committed_offsets=400),
    ]
    return record


def test_a_full_disk_needs_failed_flushes_answered_results_and_a_recovery() -> None:
    record = _writes_held(DISK_FULL)
    checks = window_checks(record, acknowledged_in_window=5, retried_in_window=0)
    assert checks["passed"]
    assert checks["offsets_moved_during"] == 0
    # Offsets moving on a full disk is reported, not failed: a flush may fit in free pages.
    record.samples[3] = _sample(flush_failures=3, committed_offsets=130)
    checks = window_checks(record, acknowledged_in_window=5, retried_in_window=0)
    assert checks["passed"]
    assert checks["offsets_moved_during"] == 10
    assert not window_checks(record, acknowledged_in_window=0, retried_in_window=0)["passed"]
    record.details["recovered_after_s"] = None  # never flushed everything again
    assert not window_checks(record, acknowledged_in_window=5, retried_in_window=0)["passed"]
    record = _writes_held(DISK_FULL)
    record.samples = [_sample(flush_failures=0, committed_offsets=100)] * 5
    assert not window_checks(record, acknowledged_in_window=5, retried_in_window=0)["passed"]


def test_a_lock_needs_offsets_that_stood_still() -> None:
    record = _writes_held(DB_LOCKED)
    assert window_checks(record, acknowledged_in_window=5, retried_in_window=0)["passed"]
    record.samples[3] = _sample(flush_failures=3, committed_offsets=130)
    assert not window_checks(record, acknowledged_in_window=5, retried_in_window=0)["passed"]
    # Just after a restart the gauge reads 0 until the consumer learns the group's offsets.
    record.samples[1:4] = [
        _sample(flush_failures=n, committed_offsets=c) for n, c in ((1, 0), (2, 0), (3, 120))
    ]
    assert window_checks(record, acknowledged_in_window=5, retried_in_window=0)["passed"]


def _row(**values: object) -> dict[str, object]:
    return {
        "readyz": 200,
        "committed_offsets": 100,
        "dirty_records": 0,
        "produced": 3,
        "activations": {"retry": 4},
        **values,
    }


def test_recovery_is_consuming_producing_or_flushing_again_as_the_fault_was() -> None:
    before, at_end = _row(), _row(committed_offsets=0)
    assert not recovered(KAFKA_UNREACHABLE, before, at_end, _row(committed_offsets=0))
    assert not recovered(KAFKA_UNREACHABLE, before, at_end, _row(readyz=503))
    assert recovered(KAFKA_UNREACHABLE, before, at_end, _row(committed_offsets=130))
    assert not recovered(RETRY_PRODUCER_FAILING, before, at_end, _row())
    assert recovered(RETRY_PRODUCER_FAILING, before, at_end, _row(produced=4))
    assert recovered(RETRY_PRODUCER_FAILING, before, at_end, _row(activations={"retry": 0}))
    assert not recovered(DISK_FULL, before, at_end, _row(dirty_records=12))
    assert recovered(DB_LOCKED, before, at_end, _row())
    assert not recovered(DB_LOCKED, before, at_end, {"readyz": "unreachable", "error": "x"})


# --- the means of the faults ------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_the_small_disk_fills_and_empties_and_is_unmounted() -> None:
    with SmallDisk(4) as disk:
        assert disk.mounted, disk.reason
        assert disk.fill() > 3 * 1024 * 1024
        assert disk.free_bytes() == 0
        with pytest.raises(OSError, match="No space left"):
            (disk.path / "more").write_bytes(b"x" * 8192)
        disk.empty()
        assert disk.free_bytes() > 3 * 1024 * 1024
        path = disk.path
    assert not path.exists()


def test_the_locker_holds_the_database_until_it_lets_go(tmp_path: Path) -> None:
    import sqlite3  # noqa: PLC0415 (only this test opens a database itself)

    db_path = tmp_path / "db"
    sqlite3.connect(db_path).close()
    with exclusive_lock(db_path, 30.0):
        other = sqlite3.connect(db_path, timeout=0.2)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
    other = sqlite3.connect(db_path, timeout=5)
    other.execute("BEGIN IMMEDIATE")
    other.close()


# --- one short real run -----------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the disk-full fault mounts a tmpfs: needs root")
def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    json_path, html_path = tmp_path / "chaos.json", tmp_path / "chaos.html"
    exit_code = chaos.main(
        [
            "--tasks", "2000", "--rate", "40", "--kills", "2", "--aimed-kills", "1",
            "--kafka-stop-s", "5", "--retry-stop-s", "5", "--disk-full-s", "4", "--lock-s", "3",
            "--gap-s", "2", "--disk-mb", "64", "--workers", "16", "--session-timeout-ms", "3000",
            "--json", str(json_path), "--html", str(html_path),
        ]
    )  # fmt: skip
    result = json.loads(json_path.read_text())
    accounting = result["accounting"]
    assert accounting["lost"] == 0, accounting["lost_ids"]
    assert accounting["unexpected"] == 0
    assert accounting["duplicates"] <= result["duplicate_bound"]["bound"]
    assert accounting["retried"] > 0
    kinds = [fault["kind"] for fault in result["faults"] if fault["applied"]]
    assert sorted(kinds) == sorted(
        [KILL, KILL, KAFKA_UNREACHABLE, RETRY_PRODUCER_FAILING, DISK_FULL, DB_LOCKED]
    )
    for fault in result["faults"]:
        assert fault["end_wall"] >= fault["start_wall"] > 0
        if fault["kind"] != KILL:
            assert fault["checks"]["passed"], fault["checks"]
    assert result["drain_after_last_fault_s"] is not None
    assert result["passed"], result
    assert exit_code == 0
    page = html_path.read_text()
    assert "data:image/png;base64," in page
    assert "Chaos run: PASS" in page
    assert page.count("<tr>") == 1 + 1 + 1 + len(result["faults"])


def test_the_page_notes_say_how_each_fault_went() -> None:
    kill = {"kind": KILL, "applied": True, "note": ""}
    result = {
        "duplicate_bound": {"per_kill": [12, 0]},
        "faults": [
            {
                **kill,
                "details": {"aimed": True, "flush_outstanding_when_killed": True, "restart_s": 9},
            },
            {"kind": DISK_FULL, "applied": False, "note": "not applied: no disk", "details": {}},
            {
                "kind": DB_LOCKED,
                "applied": True,
                "details": {},
                "checks": {
                    "passed": False,
                    "offsets_held": False,
                    "recovered_after_s": 1.5,
                    "acknowledged_during": 30,
                },
            },
            {
                **kill,
                "details": {"aimed": False, "flush_outstanding_when_killed": None, "restart_s": 8},
            },
        ],
    }
    assert fault_notes(result) == [
        "aimed, inside a flush; back in 9 s; 12 tasks exposed",
        "not applied: no disk",
        "FAILED offsets_held; recovered 1.5 s after; 30 tasks acknowledged during",
        "random moment; back in 8 s; 0 tasks exposed",
    ]
