"""The chaos run's accounting and its page: pure functions over what the workers recorded
and the faults the run applied, so that they can be tested on made-up inputs.

Accounting. Every activation the run produced (a root) must end executed to the end: a
root the workers answered COMPLETE, or a root they answered RETRY whose retry (the new
activation the broker produced for it, with the id the broker derives from the root's)
they answered COMPLETE. A root that did not is lost. An execution is a task handed to a
worker; a task handed out more than once was executed more than once: a duplicate.

The bound on duplicates. A SIGKILL loses the state changes the broker had not yet made
durable: claims and results since the last committed flush. Those tasks may be handed out
again. A change waits at most one flush interval to be taken into a flush, and at most one
flush that is already with the writer, then its own flush commits it: it is durable at
most `flush_interval + 2 * longest flush` after it was made (`exposure_window_s`). So kill
k can duplicate tasks that a worker received or had acknowledged in the window before
it, or held, received and not yet acknowledged, when the broker died. And one more kind:
a message whose offset the group had not yet committed is consumed again by the
restarted broker, and if its task had finished meanwhile (finished tasks leave memory and
the file), it runs again. In steady state commits trail the flushes closely, but while
Kafka, the disk or the lock holds them back the uncommitted range grows; so kill k also
exposes every task executed before it whose message lies at or past its partition's
committed offset as the broker last reported it (`exposed_ids`; the positions come from
reading the topic back at the end).

A second source needs no kill: an activation that is in Kafka twice. Upkeep produces a
retry again when Kafka did not acknowledge it in time, and a produce that timed out may
still have been stored; the copy that comes second is executed again once the first is
finished. The run reads the topic back at the end and counts the extra copies.

The bound is the sum of the kills' exposed tasks and of the extra copies in Kafka, and
every duplicated task should be among them: duplicates that are not are reported as
unexplained.
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from actors.upkeep import _RETRY_ID_NAMESPACE

# After the kill returned, an answer the broker sent just before it died may still arrive.
KILL_SLACK_S = 1.0


def retry_id(root: str) -> str:
    """The id the broker gives the retry of `root` (upkeep's rule: the same id each time it
    is produced, so a retry produced twice is one activation)."""
    return uuid.uuid5(_RETRY_ID_NAMESPACE, f"{root}:retry").hex


@dataclass(frozen=True, slots=True)
class Executions:
    """What the workers recorded, merged: ids in the order they happened, with wall times."""

    received: Sequence[str]
    received_wall: Sequence[float]
    completed: Sequence[str]
    completed_wall: Sequence[float]
    retried: Iterable[str]
    """Ids whose acknowledged answer was RETRY."""


def account(produced: Iterable[str], executions: Executions) -> dict[str, Any]:
    """Lost roots, duplicate executions, and ids nobody produced."""
    roots = set(produced)
    completed = set(executions.completed)
    retried_roots = set(executions.retried) & roots
    retries = {retry_id(root) for root in retried_roots}
    lost = sorted(
        root
        for root in roots
        if (retry_id(root) not in completed if root in retried_roots else root not in completed)
    )
    counts = Counter(executions.received)
    duplicated = {task_id: count - 1 for task_id, count in counts.items() if count > 1}
    return {
        "produced": len(roots),
        "retried": len(retried_roots),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicates": sum(duplicated.values()),
        "duplicated_ids": sorted(duplicated),
        "unexpected": len(completed - roots - retries),
    }


def exposure_window_s(flush_interval_s: float, longest_flush_s: float) -> float:
    """How long a state change can stay only in memory (see the module docstring)."""
    return flush_interval_s + 2 * longest_flush_s


def longest_flush_s(buckets: Mapping[float, float], fallback_s: float) -> float:
    """The upper edge of the highest bucket of the flush-duration histogram that holds a
    flush (cumulative counts, as scraped); `fallback_s` when the highest is +Inf or none
    was observed."""
    previous = 0.0
    highest: float | None = None
    for edge in sorted(buckets):
        if buckets[edge] > previous:
            highest = edge
        previous = buckets[edge]
    if highest is None or highest == float("inf"):
        return fallback_s
    return highest


@dataclass(frozen=True, slots=True)
class KillExposure:
    at_wall: float
    window_s: float
    """`exposure_window_s` as of the kill."""
    life_start_wall: float
    """When the broker killed had come up."""
    committed: Mapping[int, int] = field(default_factory=dict)
    """The group's committed offset of each partition as the broker last reported it before
    the kill: where its successor starts reading. A partition it did not report counts as
    nothing committed."""


Positions = Mapping[str, Sequence[tuple[int, int]]]
"""Where each activation id is in Kafka: (partition, offset) of every copy."""


def exposed_ids(executions: Executions, kill: KillExposure, positions: Positions) -> set[str]:
    """Tasks the kill may execute again (see the module docstring): received or
    acknowledged within its window, received in that broker life and not acknowledged,
    or executed before it from a message at or past its partition's committed offset."""
    start, end = kill.at_wall - kill.window_s, kill.at_wall + KILL_SLACK_S
    received = list(zip(executions.received, executions.received_wall, strict=True))
    completed = list(zip(executions.completed, executions.completed_wall, strict=True))
    exposed = {task_id for task_id, at in received if start <= at <= end}
    exposed |= {task_id for task_id, at in completed if start <= at <= end}
    acknowledged_before = {task_id for task_id, at in completed if at <= kill.at_wall}
    exposed |= {
        task_id
        for task_id, at in received
        if kill.life_start_wall <= at <= kill.at_wall and task_id not in acknowledged_before
    }
    executed_before = {task_id for task_id, at in received if at <= end}
    exposed |= {
        task_id
        for task_id in executed_before
        if any(
            offset >= kill.committed.get(partition, 0)
            for partition, offset in positions.get(task_id, ())
        )
    }
    return exposed


def duplicate_bound(
    executions: Executions,
    kills: Sequence[KillExposure],
    duplicated_ids: Iterable[str],
    positions: Positions,
) -> dict[str, Any]:
    """The bound the kills and Kafka's extra copies imply, per kill and in all, and the
    duplicated tasks neither explains."""
    per_kill = [exposed_ids(executions, kill, positions) for kill in kills]
    extra = {task_id: len(found) - 1 for task_id, found in positions.items() if len(found) > 1}
    everything: set[str] = set().union(*per_kill) if per_kill else set()
    unexplained = sorted(set(duplicated_ids) - everything - extra.keys())
    return {
        "per_kill": [len(ids) for ids in per_kill],
        "exposed_by_kills": sum(len(ids) for ids in per_kill),
        "extra_copies_in_kafka": sum(extra.values()),
        "ids_with_extra_copies": sorted(extra)[:20],
        "bound": sum(len(ids) for ids in per_kill) + sum(extra.values()),
        "unexplained_duplicated_ids": unexplained,
    }


# --- throughput and latency over time --------------------------------------------------------


def rate_series(times: Sequence[float], origin: float, bin_s: float = 1.0) -> list[int]:
    """Events per `bin_s` from `origin`, one count per bin up to the last event."""
    if not times:
        return []
    bins = [0] * (int((max(times) - origin) / bin_s) + 1)
    for at in times:
        if at >= origin:
            bins[int((at - origin) / bin_s)] += 1
    return bins


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)


def window_stats(
    times: Sequence[float], latencies_ms: Sequence[float], start: float, end: float
) -> dict[str, Any]:
    """Tasks acknowledged per second and the p99 of their call latency within [start, end]
    (`times` sorted, `latencies_ms` in the same order)."""
    low, high = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    seconds = max(end - start, 1e-9)
    return {
        "seconds": round(end - start, 2),
        "tasks": high - low,
        "tasks_per_s": round((high - low) / seconds, 1),
        "p99_ms": _p99(list(latencies_ms[low:high])),
    }


def outside_windows(
    times: Sequence[float],
    latencies_ms: Sequence[float],
    windows: Sequence[tuple[float, float]],
    start: float,
    end: float,
) -> dict[str, Any]:
    """The baseline: tasks/s and p99 over [start, end] with every fault window taken out."""
    kept = [
        (at, latency)
        for at, latency in zip(times, latencies_ms, strict=True)
        if start <= at <= end and not any(low <= at <= high for low, high in windows)
    ]
    covered = sum(max(0.0, min(high, end) - max(low, start)) for low, high in windows)
    seconds = max(end - start - covered, 1e-9)
    return {
        "seconds": round(seconds, 2),
        "tasks": len(kept),
        "tasks_per_s": round(len(kept) / seconds, 1),
        "p99_ms": _p99([latency for _, latency in kept]),
    }


def sorted_completions(
    completed_wall: Sequence[float], latencies_ms: Sequence[float]
) -> tuple[list[float], list[float]]:
    pairs = sorted(zip(completed_wall, latencies_ms, strict=True))
    return [at for at, _ in pairs], [latency for _, latency in pairs]


# --- the page ----------------------------------------------------------------------------------

_FAULT_COLOURS = {
    "kill": "#d62728",
    "kafka_unreachable": "#9467bd",
    "retry_producer_failing": "#8c564b",
    "disk_full": "#ff7f0e",
    "db_locked": "#2ca02c",
}


def timeline_figure(result: Mapping[str, Any]) -> Figure:
    """Tasks/s over the run, each fault a shaded span (a kill: a line), from the result."""
    figure = Figure(figsize=(11, 4), dpi=100)
    axes = figure.add_subplot()
    series = result["timeline"]["tasks_per_s"]
    axes.plot(range(len(series)), series, color="#1f77b4", linewidth=1, label="tasks/s")
    labelled: set[str] = set()
    for fault in result["faults"]:
        kind = fault["kind"]
        colour = _FAULT_COLOURS.get(kind, "grey")
        label = None if kind in labelled else kind
        labelled.add(kind)
        if kind == "kill":
            # The line is the kill; the band after it, the broker down and restarting.
            axes.axvline(fault["start_s"], color=colour, linewidth=0.8, alpha=0.7, label=label)
            axes.axvspan(fault["start_s"], fault["end_s"], color=colour, alpha=0.08)
        else:
            axes.axvspan(fault["start_s"], fault["end_s"], color=colour, alpha=0.25, label=label)
    axes.set(xlabel="seconds from the start", ylabel="tasks acknowledged / s", title="Chaos run")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    return figure


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def fault_notes(result: Mapping[str, Any]) -> list[str]:
    """One line per fault for the page: a kill's aim, restart and the tasks it exposed;
    a window fault's checks and recovery; why a fault was not applied."""
    exposures = iter(result["duplicate_bound"]["per_kill"])
    notes = []
    for fault in result["faults"]:
        details = fault["details"]
        if not fault["applied"]:
            notes.append(fault["note"])
        elif fault["kind"] == "kill":
            aim = "aimed" if details["aimed"] else "random moment"
            if details["flush_outstanding_when_killed"]:
                aim += ", inside a flush"
            notes.append(
                f"{aim}; back in {details['restart_s']} s; {next(exposures, 0):,} tasks exposed"
            )
        else:
            checks = fault["checks"]
            failed = [k for k, v in checks.items() if v is False and k != "passed"]
            verdict = "checks passed" if checks["passed"] else f"FAILED {', '.join(failed)}"
            notes.append(
                f"{verdict}; recovered {checks['recovered_after_s']} s after; "
                f"{checks['acknowledged_during']:,} tasks acknowledged during"
            )
    return notes


def render_html(result: Mapping[str, Any]) -> str:
    """One self-contained page: the verdict, the timeline plot, each fault's effect."""
    accounting = result["accounting"]
    bound = result["duplicate_bound"]
    baseline = result["baseline"]
    verdict = "PASS" if result["passed"] else "FAIL"
    summary = _table(
        ("produced", "retried", "lost", "duplicates", "bound", "unexplained", "drain s", "verdict"),
        [
            (
                accounting["produced"],
                accounting["retried"],
                accounting["lost"],
                accounting["duplicates"],
                bound["bound"],
                len(bound["unexplained_duplicated_ids"]),
                result["drain_after_last_fault_s"],
                verdict,
            )
        ],
    )
    faults = _table(
        ("#", "fault", "start s", "end s", "tasks/s in window", "p99 ms in window", "notes"),
        [
            (
                number,
                fault["kind"],
                fault["start_s"],
                fault["end_s"],
                fault["effect"]["tasks_per_s"],
                fault["effect"]["p99_ms"],
                note,
            )
            for (number, fault), note in zip(
                enumerate(result["faults"], start=1), fault_notes(result), strict=True
            )
        ],
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>taskbroker chaos run</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#eee}}</style>
</head><body>
<h1>Chaos run: {verdict}</h1>
<p>{html.escape(result["command"])}<br>{html.escape(result["started_at"])},
{html.escape(str(result["machine"]))}. {html.escape(result["bound_explained"])}</p>
{summary}
<p>Baseline (outside every fault window): {_cell(baseline["tasks_per_s"])} tasks/s,
p99 {_cell(baseline["p99_ms"])} ms.</p>
<img alt="tasks per second over the run, faults marked"
 src="data:image/png;base64,{_png(timeline_figure(result))}">
<h2>Faults applied</h2>
{faults}
</body></html>
"""
