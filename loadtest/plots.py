"""The comparison's report: four PNG plots and one self-contained HTML page that embeds them.

Needs matplotlib (the `loadtest` extra). Figures are built with the object API and the Agg
canvas, so no global pyplot state and no display are involved.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

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
    axes.set(xlabel="concurrent workers", ylabel="RPC latency (ms, log)", title="Latency")
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


def figures(results: dict[str, Any]) -> dict[str, Figure]:
    """Every plot of the report, by file name."""
    return {
        "throughput.png": _throughput(results),
        "latency.png": _latency(results),
        "commit_delay.png": _bars(
            results,
            [("p99_ms_no_delay", "no delay"), ("p99_ms_commit_delay", "200 ms commit delay")],
            "p99 RPC latency (ms, log)",
            "p99 at 256 workers, with and without slow commits",
            log=True,
        ),
        "restore.png": _bars(
            results,
            [("restore_100k_s", "restore")],
            "seconds",
            "From the SQLite file to a serving state",
            log=False,
        ),
    }


def _table(results: dict[str, Any]) -> str:
    modes = list(results)
    head = "".join(f"<th colspan=3>{html.escape(m)}</th>" for m in modes)
    sub = "<th>tasks/s</th><th>p50 ms</th><th>p99 ms</th>" * len(modes)
    rows = []
    for workers in sorted({int(w) for s in results.values() for w in s["by_workers"]}):
        cells = ""
        for mode in modes:
            row = results[mode]["by_workers"][str(workers)]
            flags = f" ({row['errors']} errors)" if row["errors"] else ""
            cells += (
                f"<td>{row['tasks_per_s']:,.0f}{flags}</td>"
                f"<td>{row['p50_ms']:,.1f}</td><td>{row['p99_ms']:,.1f}</td>"
            )
        rows.append(f"<tr><th>{workers} workers</th>{cells}</tr>")
    for key in ("p99_ms_no_delay", "p99_ms_commit_delay", "restore_100k_s"):
        cells = "".join(f"<td colspan=3>{results[m][key]:,.3f}</td>" for m in modes)
        rows.append(f"<tr><th>{key}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr><tr><th></th>{sub}</tr>{''.join(rows)}</table>"


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
{"".join(images)}
</body></html>
"""
    report = out / "report.html"
    report.write_text(page)
    written.append(report)
    return written
