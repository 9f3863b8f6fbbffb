"""`loadtest sweep`: the recommendation rule on tables made here, the knobs' configuration
keys against the broker's own configuration, the command line's refusals, and one short
real sweep of the state actor's mailbox (2 sizes x 2 policies) whose every setting is
measured and whose recommendation follows from its own table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from actors import config
from loadtest import sweep
from loadtest.sweep import KNOBS, NO_POLICY, Recommendation, Rule, recommend

RULE = Rule(within=0.05, p99_bound_ms=100.0)


def _row(size: int, policy: str = "block", **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "size": size,
        "policy": policy,
        "tasks": 1000,
        "completed": 1000,
        "lost": 0,
        "duplicates": 0,
        "seconds": 1.0,
        "tasks_per_s": 10_000.0,
        "task_p50_ms": 5.0,
        "task_p99_ms": 20.0,
        "mailbox": "state",
        "high_water": 10,
        "overflows": 0,
        "wait_p99_ms": 1.0,
        "rss_mb": 60.0,
        "rss_peak_mb": 61.0,
        "mailbox_messages": 100,
        "refused": 0,
        "refused_by_code": {},
    }
    row.update(changes)
    return row


# --- the rule ------------------------------------------------------------------------------


def test_the_smallest_size_within_the_margin_of_the_best_is_recommended() -> None:
    rows = [
        _row(16, tasks_per_s=8_000.0),  # 80 % of the best
        _row(64, tasks_per_s=9_600.0),  # 96 %
        _row(256, tasks_per_s=10_000.0),
    ]
    chosen = recommend(rows, RULE)
    assert (chosen.size, chosen.policy) == (64, "block")
    assert "16/block: 8,000 tasks/s < 9,500" in chosen.reason


def test_exactly_at_the_margin_qualifies_and_just_below_does_not() -> None:
    at_margin = [_row(16, tasks_per_s=9_500.0), _row(64, tasks_per_s=10_000.0)]
    assert recommend(at_margin, RULE).size == 16
    below = [_row(16, tasks_per_s=9_499.0), _row(64, tasks_per_s=10_000.0)]
    assert recommend(below, RULE).size == 64


def test_a_tie_at_one_size_goes_to_more_throughput_then_lower_p99_then_the_policy_name() -> None:
    faster = [_row(16, "block", tasks_per_s=9_800.0), _row(16, "fail", tasks_per_s=9_900.0)]
    assert recommend(faster, RULE).policy == "fail"
    steadier = [
        _row(16, "block", task_p99_ms=30.0),
        _row(16, "fail", task_p99_ms=25.0),
    ]
    assert recommend(steadier, RULE).policy == "fail"
    same = [_row(16, "fail"), _row(16, "block")]
    assert recommend(same, RULE).policy == "block"
    assert recommend(list(reversed(same)), RULE).policy == "block"


def test_overflows_refused_calls_and_incomplete_runs_disqualify() -> None:
    rows = [
        _row(16, "fail", overflows=3, refused=2, refused_by_code={"RESOURCE_EXHAUSTED": 2}),
        _row(64, "block", lost=10),
        _row(256, "block"),
    ]
    chosen = recommend(rows, RULE)
    assert chosen.size == 256
    assert "16/fail: refused 2 RESOURCE_EXHAUSTED, 3 overflows" in chosen.reason
    assert "64/block: 10 of 1000 tasks not complete" in chosen.reason


def test_when_every_setting_overflows_none_is_recommended_and_each_says_why() -> None:
    rows = [_row(size, policy, overflows=size) for size in (16, 64) for policy in ("block", "fail")]
    chosen = recommend(rows, RULE)
    assert (chosen.size, chosen.policy) == (None, None)
    assert chosen.reason.startswith("none qualifies")
    for size in (16, 64):
        for policy in ("block", "fail"):
            assert f"{size}/{policy}: {size} overflows" in chosen.reason


def test_a_p99_over_the_bound_is_passed_over_even_when_it_is_the_fastest() -> None:
    rows = [
        _row(16, tasks_per_s=10_000.0, task_p99_ms=150.0),
        _row(64, tasks_per_s=9_700.0, task_p99_ms=99.0),
    ]
    chosen = recommend(rows, RULE)
    assert chosen.size == 64
    assert "p99 150.0 ms > 100 ms" in chosen.reason
    assert recommend(rows, Rule(p99_bound_ms=200.0)).size == 16
    assert recommend(rows, Rule(p99_bound_ms=50.0)).size is None


def test_a_knob_without_a_policy_is_named_by_its_size_alone() -> None:
    chosen = recommend([_row(64, NO_POLICY), _row(16, NO_POLICY, overflows=1)], RULE)
    assert chosen == Recommendation(64, NO_POLICY, chosen.reason)
    assert "Smaller sizes did not qualify: 16: 1 overflows" in chosen.reason


def test_no_rows_and_bad_rules_are_said_plainly() -> None:
    assert recommend([], RULE) == Recommendation(None, None, "no setting was measured")
    with pytest.raises(ValueError, match="within"):
        Rule(within=1.0)
    with pytest.raises(ValueError, match="p99 bound"):
        Rule(p99_bound_ms=0.0)


def test_a_settings_runs_combine_into_medians_sums_and_maxima() -> None:
    runs = [
        _row(64, tasks_per_s=9_000.0, task_p99_ms=30.0, high_water=40, wait_p99_ms=None,
             seconds=2.0, rss_mb=70.0, rss_peak_mb=75.0),
        _row(64, tasks_per_s=3_000.0, task_p99_ms=90.0, high_water=64, overflows=5, refused=2,
             refused_by_code={"RESOURCE_EXHAUSTED": 2}, wait_p99_ms=4.0, seconds=6.0,
             rss_mb=80.0, rss_peak_mb=85.0),
        _row(64, tasks_per_s=10_000.0, task_p99_ms=20.0, high_water=50, wait_p99_ms=2.0,
             refused=1, refused_by_code={"RESOURCE_EXHAUSTED": 1}, seconds=2.0, rss_mb=65.0,
             rss_peak_mb=70.0),
    ]  # fmt: skip
    row = sweep.combine(runs)
    assert (row["size"], row["policy"], row["repeats"]) == (64, "block", 3)
    assert (row["tasks_per_s"], row["task_p99_ms"]) == (9_000.0, 30.0)
    assert row["wait_p99_ms"] == 3.0  # the runs that measured it
    assert (row["tasks"], row["completed"], row["overflows"], row["refused"]) == (3000, 3000, 5, 3)
    assert row["refused_by_code"] == {"RESOURCE_EXHAUSTED": 3}
    assert (row["high_water"], row["rss_mb"], row["rss_peak_mb"]) == (64, 80.0, 85.0)
    assert [run["seconds"] for run in row["runs"]] == [2.0, 6.0, 2.0]
    # One overflowing run of three keeps the setting from being recommended.
    assert recommend([row, _row(256)], RULE).size == 256
    with pytest.raises(ValueError, match="at least one run"):
        sweep.combine([])


# --- the knobs and the command line ---------------------------------------------------------


@pytest.mark.parametrize("actor", sorted(KNOBS))
def test_every_knob_sets_keys_the_broker_reads(actor: str) -> None:
    knob = KNOBS[actor]
    env = {f"{config.ENV_PREFIX}{key}": value for key, value in knob.settings(321, "fail")}
    loaded = config.to_toml(config.load(env=env))
    written = config.to_toml(config.Config())
    assert loaded != written, f"{env} changed nothing"
    assert "321" in loaded
    if knob.policy_key is None:
        assert len(env) == 1
    else:
        assert loaded.count('"fail"') == written.count('"fail"') + 1


def test_the_front_end_has_no_policy_to_sweep_and_drop_policies_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as refused:
        sweep.main(["--actor", "frontend", "--policy", "fail"])
    assert refused.value.code == 2
    assert "grpc_max_concurrent_streams has no overflow policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--policy", "block,drop_newest"])
    assert "not drop_newest" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--sizes", "16,0"])
    assert "at least 1" in capsys.readouterr().err


def test_the_table_has_a_line_per_setting_with_its_refused_calls() -> None:
    rows = [_row(16, "fail", refused=4, refused_by_code={"RESOURCE_EXHAUSTED": 4}), _row(64)]
    lines = sweep.table(rows).splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["16", "fail"]
    assert lines[1].endswith("RESOURCE_EXHAUSTED 4")
    assert lines[2].split()[:2] == ["64", "block"]
    assert lines[2].endswith("  0")


# --- one short real sweep ---------------------------------------------------------------------

_FIELDS = (
    "tasks_per_s",
    "task_p50_ms",
    "task_p99_ms",
    "high_water",
    "overflows",
    "wait_p99_ms",
    "rss_mb",
    "refused",
    "refused_by_code",
)


def test_a_short_sweep_measures_every_setting_and_recommends_from_its_own_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = 300
    exit_code = sweep.main(
        [
            "--actor", "state",
            "--sizes", "16,1024",
            "--policy", "block,fail",
            "--tasks", str(tasks),
            "--workers", "32",
            "--processes", "1",
            "--max-seconds", "60",
            "--repeats", "1",
            "--json", str(tmp_path / "sweep.json"),
            "--plots", str(tmp_path),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert exit_code == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    rows = result["settings"]
    assert [(row["size"], row["policy"]) for row in rows] == [
        (16, "block"),
        (16, "fail"),
        (1024, "block"),
        (1024, "fail"),
    ]
    for row in rows:
        assert row["completed"] == tasks
        assert row["lost"] == 0
        assert row["duplicates"] == 0
        assert row["tasks_per_s"] > 0
        assert row["task_p99_ms"] >= row["task_p50_ms"] > 0
        assert all(row[field] is not None for field in _FIELDS), row
        assert row["mailbox"] == "state"
        assert row["high_water"] >= 1
        assert row["mailbox_messages"] >= 1
        assert row["rss_mb"] > 0
        assert row["refused"] == sum(row["refused_by_code"].values())
    # The first setting's line, as printed, and the same numbers in the table.
    assert f"16/block: {rows[0]['tasks_per_s']:,.0f} tasks/s" in printed
    rule = Rule(result["rule"]["within"], result["rule"]["p99_bound_ms"])
    again = recommend(rows, rule)
    assert result["recommendation"] == {
        "size": again.size,
        "policy": again.policy,
        "reason": again.reason,
    }
    assert f"recommendation: {again.reason}" in printed
    best = max(row["tasks_per_s"] for row in rows)
    if again.size is None:
        assert all(sweep.failed_conditions(row, rule, 0.95 * best) for row in rows)
    else:
        chosen = next(r for r in rows if (r["size"], r["policy"]) == (again.size, again.policy))
        assert chosen["overflows"] == 0
        assert chosen["refused"] == 0
        assert chosen["task_p99_ms"] <= rule.p99_bound_ms
        assert chosen["tasks_per_s"] >= 0.95 * best
        assert all(
            sweep.failed_conditions(row, rule, 0.95 * best)
            for row in rows
            if row["size"] < again.size
        )
    for name in ("throughput", "p99"):
        png = tmp_path / f"sweep-state-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
