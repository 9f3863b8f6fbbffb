"""The comparison's report: five PNG plots and one self-contained HTML page that embeds them.

Needs matplotlib (the `loadtest` extra). Figures are built with the object API and the Agg
canvas, so no global pyplot state and no display are involved.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from loadtest.compare import DELAY_WORKERS, DELIVERY, PROTOCOL_WORKERS, SWEEP, by_mode

_COLOURS = {"memory": "#1f77b4", "sqlite-direct": "#d62728"}
_DPI = 100


def _throughput(results: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(6, 4), dpi=_DPI)
    axes = figure.add_subplot()
    for mode, summary in results.items():
        workers = sorted(int(w) for w in summary["by_workers"])
        rates = [summary["by_workers"][str(w)]["tasks_per_s"] for w in workers]
        axes.plot(workers, rates, marker="o", label=mode, color=_COLOURS.get(mode))
    axes.set(xlabel="concurrent workers", ylabel="tasks completed / s", title="Throughput")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def _latency(results: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(6, 4), dpi=_DPI)
    axes = figure.add_subplot()
    for mode, summary in results.items():
        workers = sorted(int(w) for w in summary["by_workers"])
        rows = [summary["by_workers"][str(w)] for w in workers]
        colour = _COLOURS.get(mode)
        axes.plot(
            workers, [r["p50_ms"] for r in rows], marker="o", color=colour, label=f"{mode} p50"
        )
        axes.plot(
            workers,
            [r["p99_ms"] for r in rows],
            marker="s",
            linestyle="--",
            color=colour,
            label=f"{mode} p99",
        )
    axes.set(xlabel="concurrent workers", ylabel="task latency (ms, log)", title="Latency")
    axes.set_yscale("log")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    return figure


def _bars(
    results: dict[str, Any], keys: list[tuple[str, str]], ylabel: str, title: str, log: bool
) -> Figure:
    figure = Figure(figsize=(6, 4), dpi=_DPI)
    axes = figure.add_subplot()
    modes = list(results)
    width = 0.8 / len(keys)
    for index, (key, label) in enumerate(keys):
        positions = [m + (index - (len(keys) - 1) / 2) * width for m in range(len(modes))]
        values = [results[mode][key] for mode in modes]
        bars = axes.bar(positions, values, width, label=label, alpha=0.85 if index else 0.6)
        axes.bar_label(bars, fmt="%.3g", fontsize=8)
    axes.set_xticks(range(len(modes)), modes)
    axes.set(ylabel=ylabel, title=title)
    if log:
        axes.set_yscale("log")
    if len(keys) > 1:
        axes.legend()
    axes.grid(alpha=0.3, axis="y")
    return figure


def _sweep(sweep: dict[str, dict[str, dict[str, Any]]]) -> Figure:
    """Tasks/s and p99 against the commit delay, side by side, one line per store mode."""
    figure = Figure(figsize=(10, 4), dpi=_DPI)
    rate_axes, p99_axes = figure.subplots(1, 2)
    delays = sorted(int(delay) for delay in sweep)
    modes = dict.fromkeys(mode for rows in sweep.values() for mode in rows)
    for mode in modes:
        measured = [d for d in delays if mode in sweep[str(d)]]
        rows = [sweep[str(d)][mode] for d in measured]
        colour = _COLOURS.get(mode)
        rate_axes.plot(
            measured, [r["tasks_per_s"] for r in rows], marker="o", color=colour, label=mode
        )
        p99_axes.plot(measured, [r["p99_ms"] for r in rows], marker="s", color=colour, label=mode)
    rate_axes.set(xlabel="commit delay (ms)", ylabel="tasks completed / s", title="Throughput")
    rate_axes.set_ylim(bottom=0)
    p99_axes.set(xlabel="commit delay (ms)", ylabel="p99 task latency (ms, log)", title="p99")
    p99_axes.set_yscale("log")
    for axes in (rate_axes, p99_axes):
        axes.set_xticks(delays)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Commit-latency sweep at {DELAY_WORKERS} workers")
    return figure


def figures(results: dict[str, Any]) -> dict[str, Figure]:
    """Every plot of the report, by file name; `results` is compare's whole JSON."""
    modes = by_mode(results)
    return {
        "throughput.png": _throughput(modes),
        "latency.png": _latency(modes),
        "commit_latency_sweep.png": _sweep(results[SWEEP]),
        "commit_delay.png": _bars(
            modes,
            [("p99_ms_no_delay", "no delay"), ("p99_ms_commit_delay", "200 ms commit delay")],
            "p99 task latency (ms, log)",
            "p99 at 256 workers, with and without slow commits",
            log=True,
        ),
        "restore.png": _bars(
            modes,
            [("restore_100k_s", "restore")],
            "seconds",
            "From the SQLite file to a serving state",
            log=False,
        ),
    }


_COLUMNS = (
    "tasks/s",
    "task p50 ms",
    "task p99 ms",
    "broker CPU µs/task",
    "state mailbox high water",
    "state mailbox wait p99 ms",
)


def _shown(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(row: dict[str, Any] | None) -> str:
    if row is None:
        return f"<td colspan={len(_COLUMNS)}>-</td>"
    flags = f" ({row['errors']} errors)" if row["errors"] else ""
    return (
        f"<td>{row['tasks_per_s']:,.0f}{flags}</td>"
        f"<td>{row['p50_ms']:,.1f}</td><td>{row['p99_ms']:,.1f}</td>"
        f"<td>{_shown(row['cpu_us_per_task'], ',.0f')}</td>"
        f"<td>{_shown(row['state_high_water'], ',')}</td>"
        f"<td>{_shown(row['state_wait_p99_ms'], ',.2f')}</td>"
    )


def _table(results: dict[str, Any]) -> str:
    summaries = by_mode(results)
    modes = list(summaries)
    span = len(_COLUMNS)
    head = "".join(f"<th colspan={span}>{html.escape(m)}</th>" for m in modes)
    sub = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS) * len(modes)
    rows = []
    for workers in sorted({int(w) for s in summaries.values() for w in s["by_workers"]}):
        cells = "".join(_cells(summaries[mode]["by_workers"][str(workers)]) for mode in modes)
        rows.append(f"<tr><th>{workers} workers</th>{cells}</tr>")
    for protocol in ("unary", "batch"):
        cells = "".join(_cells(summaries[mode]["by_protocol"].get(protocol)) for mode in modes)
        rows.append(f"<tr><th>{PROTOCOL_WORKERS} workers, {protocol} protocol</th>{cells}</tr>")
    for delay, by_delay in results[SWEEP].items():
        cells = "".join(_cells(by_delay.get(mode)) for mode in modes)
        rows.append(f"<tr><th>{DELAY_WORKERS} workers, {delay} ms commits</th>{cells}</tr>")
    for key in ("p99_ms_no_delay", "p99_ms_commit_delay", "restore_100k_s"):
        cells = "".join(f"<td colspan={span}>{summaries[m][key]:,.3f}</td>" for m in modes)
        rows.append(f"<tr><th>{key}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr><tr><th></th>{sub}</tr>{''.join(rows)}</table>"


def _delivery_table(results: dict[str, Any]) -> str:
    """Pull against push, memory mode, by worker slots; empty when the run had no push."""
    by_slots = results.get(DELIVERY)
    if not by_slots:
        return ""
    span = len(_COLUMNS)
    head = "".join(f"<th colspan={span}>{delivery}</th>" for delivery in ("pull", "push"))
    sub = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS) * 2
    rows = [
        f"<tr><th>{slots} worker slots</th>"
        + "".join(_cells(by_slots[slots].get(delivery)) for delivery in ("pull", "push"))
        + "</tr>"
        for slots in sorted(by_slots, key=int)
    ]
    return (
        f"<h2>pull vs push delivery (memory)</h2><table><tr><th></th>{head}</tr>"
        f"<tr><th></th>{sub}</tr>{''.join(rows)}</table>"
    )


def write_report(results: dict[str, Any], run: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNGs and `report.html` into `out`; the paths written."""
    written: list[Path] = []
    images = []
    for name, figure in figures(results).items():
        path = out / name
        figure.savefig(path, bbox_inches="tight")
        written.append(path)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        images.append(f'<img alt="{name}" src="data:image/png;base64,{encoded}">')
    machine = run.get("machine", {})
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>taskbroker: memory vs sqlite-direct</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
img {{ margin: 0.5em; border: 1px solid #eee; }}
</style></head><body>
<h1>memory vs sqlite-direct</h1>
<p>Command: <code>{html.escape(str(run.get("command", "")))}</code>;
took {run.get("seconds", "?")} s.
Machine: {html.escape(str(machine))}.
Plan: {html.escape(str(run.get("plan", {})))}.</p>
{_table(results)}
{_delivery_table(results)}
{"".join(images)}
</body></html>
"""
    report = out / "report.html"
    report.write_text(page)
    written.append(report)
    return written
