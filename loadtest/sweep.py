"""Mailbox sizing: one actor's mailbox size against its overflow policy, each setting a short
end-to-end run on a broker of its own, and one recommendation from the table.

Run with `python -m loadtest sweep --actor state --sizes 16,64,256,1024,4096 --policy
block,fail --protocol batch [--json PATH] [--plots DIR]`. It starts the embedded Kafka once;
for each (size, policy) it starts a `taskbroker run` with that mailbox, warms it up, then
starts the workers and, once they are connected, produces the tasks from a thread, so that
Kafka's records and the workers' calls meet in the actors during the measurement. Per
setting: tasks/s (workers' start to the last completion), task latency p50/p99, the
mailbox's high water (since that broker started), its overflows and time-in-mailbox p99
during the run (from /metrics), the broker's resident memory, and the calls refused by gRPC
status code. Each setting runs `--repeats` times (3), each time on a new broker: its row
has the median of the runs' rates and latencies and the sum of their counts.

What fills the state's mailbox is not the workers: the front end keeps one `WorkBatch` in
flight, so gRPC load makes the batches bigger, not more numerous. The consumer's `Ingest`
messages do: every poll (up to 1,000 records) goes at once, in messages of
`db_insert_batch_max_len` records. At the broker's 256, one poll is four messages and the
high water stays in the tens whatever the load; `--ingest-batch` (this sweep's default: 1
record a message) is the load knob that reaches the larger sizes. The writer's and the
consumer's mailboxes hold a few messages by design, and the front end's takes no call at
all: for `--actor frontend` the sweep sizes `grpc_max_concurrent_streams` instead (the
calls in progress on one worker connection, the bound closest to a mailbox in front of the
state actor), which has no overflow policy: a call past it is refused UNAVAILABLE (at 4
streams and 64 unary workers a connection, 140,000 refusals and 26 tasks/s).

The recommendation (`recommend`): the smallest size, among settings that completed every
task, refused no call, overflowed never and kept the task p99 within `--p99-bound-ms`, whose
throughput is within `--within` of the best any setting reached; at one size, the policy
with more tasks/s. When none qualifies it says which condition each setting failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from actors.embedded_kafka import EmbeddedKafka, free_port
from loadtest.batch_workers import DEFAULT_BATCH, BatchWorkers
from loadtest.broker import HOST, BrokerSetup, memory_mb
from loadtest.cluster import Background
from loadtest.e2e import Phase, Session, mailboxes, session, summarize
from loadtest.exposition import samples_by_label, scrape
from loadtest.producer import TaskSpec, produce_tasks, task_ids
from loadtest.report import machine
from loadtest.workers import UnaryWorkers, WorkerKind, run_workers

DEFAULT_SIZES = (16, 64, 256, 1024, 4096)
POLICIES = ("block", "fail")
NO_POLICY = "-"
"""The policy column of a knob without one (the front end's streams)."""
DEFAULT_WITHIN = 0.05
DEFAULT_P99_BOUND_MS = 100.0
"""Ten times the task p99 of an unloaded broker on this machine (about 10 ms): a setting
past it holds calls in a queue, whatever its throughput."""
DEFAULT_INGEST_BATCH = 1
_MAILBOX_OVERFLOWS = "taskbroker_mailbox_overflows_total"
_JOIN_TIMEOUT_S = 90.0
"""Past produce_tasks' own minute for every acknowledgement."""


@dataclass(frozen=True, slots=True)
class Knob:
    """What `--actor` sizes: the configuration keys set per setting, and the mailbox read."""

    size_key: str
    policy_key: str | None
    watched: str
    """The actor whose mailbox numbers the table shows."""
    reaches_it: str
    """What sends to it, printed above the table: why it fills, or why it cannot."""

    def settings(self, size: int, policy: str) -> tuple[tuple[str, str], ...]:
        """The broker's TASKBROKER_ settings (without the prefix) for one setting."""
        pairs = [(_env_name(self.size_key), str(size))]
        if self.policy_key is not None:
            pairs.append((_env_name(self.policy_key), policy))
        return tuple(pairs)


def _env_name(dotted_key: str) -> str:
    return dotted_key.upper().replace(".", "__")


KNOBS = {
    "state": Knob(
        "mailbox.state.size",
        "mailbox.state.policy",
        "state",
        "the front end's WorkBatch (one in flight), the consumer's Ingest messages "
        "(db_insert_batch_max_len records each, a poll's worth at once), upkeep's Tick, "
        "the flush timer",
    ),
    "writer": Knob(
        "mailbox.writer.size",
        "mailbox.writer.policy",
        "writer",
        "the state's Flush (one at a time), upkeep's Maintain, status snapshots: a few "
        "messages at most, by design, so no load fills it",
    ),
    "consumer": Knob(
        "mailbox.consumer.size",
        "mailbox.consumer.policy",
        "consumer",
        "its own poll, the writer's Persisted (essential, past the bound), status "
        "snapshots: a few messages at most, by design, so no load fills it",
    ),
    "frontend": Knob(
        "grpc_max_concurrent_streams",
        None,
        "state",
        "the front end's mailbox takes only SetServing and ReloadTls, never a call; the "
        "sweep sizes grpc_max_concurrent_streams instead (calls in progress on one worker "
        "connection; no overflow policy: past it a call is refused UNAVAILABLE), and shows "
        "the state's mailbox behind it",
    ),
}


@dataclass(frozen=True, slots=True)
class Load:
    """The run every setting gets."""

    tasks: int = 20_000
    workers: int = 256
    """Tasks held at once by all workers together."""
    processes: int = 2
    kind: WorkerKind = field(default_factory=BatchWorkers)
    ingest_batch: int = DEFAULT_INGEST_BATCH
    """db_insert_batch_max_len: records per Ingest message to the state."""
    max_seconds: float = 120.0
    """Per run."""
    repeats: int = 3
    """Runs per setting, each on a new broker: one run on a shared machine is noise."""

    def __post_init__(self) -> None:
        for name in ("tasks", "workers", "processes", "ingest_batch", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")

    @property
    def phase(self) -> Phase:
        return Phase(
            workers=self.workers,
            processes=self.processes,
            tasks=self.tasks,
            max_seconds=self.max_seconds,
            kind=self.kind,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "workers": self.workers,
            "processes": self.phase.worker_processes,
            "protocol": self.kind.name,
            "batch": self.kind.batch,
            "ingest_batch": self.ingest_batch,
            "max_seconds": self.max_seconds,
            "repeats": self.repeats,
        }


_DEFAULT_LOAD = Load()


# --- one setting -------------------------------------------------------------------------------


def overflows(exposition: str, actor: str) -> int:
    """The overflows the actor's mailbox has counted, over its policies."""
    return int(samples_by_label(exposition, _MAILBOX_OVERFLOWS, "actor").get(actor, 0.0))


def measure(under_test: Session, knob: Knob, load: Load, size: int, policy: str) -> dict[str, Any]:
    """One setting's row: the workers run until every task is complete (or the time is up)
    while the tasks are produced.

    Raises ValueError when the broker has no metrics port: every mailbox number is read
    from /metrics."""
    url = under_test.setup.metrics_url
    if url is None or under_test.broker_pid is None:
        raise ValueError("a sweep measures a broker started here, with its metrics on")
    phase = load.phase
    ids = task_ids(f"{under_test.topic}-sweep", load.tasks)
    produce = Background(
        "sweep-produce",
        lambda _stop: produce_tasks(under_test.bootstrap, under_test.topic, ids, TaskSpec()),
    )
    producing: list[bool] = []

    def start_producing() -> None:
        producing.append(True)
        produce.start()

    before = scrape(url)
    try:
        report, started_wall, stopped_wall = run_workers(
            (under_test.target,),
            processes=phase.worker_processes,
            threads=phase.threads_per_process,
            work_ms=0.0,
            until_completed=load.tasks,
            max_seconds=load.max_seconds,
            kind=load.kind,
            on_started=start_producing,
        )
    finally:
        if producing:  # workers that never started leave nothing to join
            produce.join(_JOIN_TIMEOUT_S)
    after = scrape(url)
    summary = summarize(phase, ids, report, started_wall, stopped_wall)
    watched = mailboxes(before, after).get(knob.watched, {})
    return {
        "size": size,
        "policy": policy,
        "tasks": load.tasks,
        "completed": summary["completed"],
        "lost": summary["lost"],
        "duplicates": summary["duplicates"],
        "seconds": summary["seconds"],
        "tasks_per_s": summary["tasks_per_s"],
        "task_p50_ms": summary["task_latency_ms"]["p50"],
        "task_p99_ms": summary["task_latency_ms"]["p99"],
        "mailbox": knob.watched,
        "high_water": watched.get("high_water"),
        "overflows": overflows(after, knob.watched) - overflows(before, knob.watched),
        "mailbox_messages": watched.get("messages", 0),
        "wait_p99_ms": watched.get("wait_p99_ms"),
        **memory_mb(under_test.broker_pid),
        "refused": summary["errors"],
        "refused_by_code": summary["errors_by_code"],
    }


def sweep(
    knob: Knob,
    sizes: Sequence[int],
    policies: Sequence[str],
    load: Load,
    *,
    bootstrap: str,
    kafka_pid: int | None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (size, policy), in that order, each `load.repeats` times on a new broker and
    topic, the runs combined into one row."""
    rows = []
    for size in sizes:
        for policy in policies:
            setup = BrokerSetup(
                max_tasks=load.tasks,
                max_workers=load.workers,
                metrics_port=free_port(HOST),
                settings=(
                    ("DB_INSERT_BATCH_MAX_LEN", str(load.ingest_batch)),
                    *knob.settings(size, policy),
                ),
            )
            runs = []
            for _ in range(load.repeats):
                with session(setup, bootstrap=bootstrap, kafka_pid=kafka_pid) as under_test:
                    runs.append(measure(under_test, knob, load, size, policy))
            row = combine(runs)
            if on_row is not None:
                on_row(row)
            rows.append(row)
    return rows


_MEDIANS = ("tasks_per_s", "task_p50_ms", "task_p99_ms", "wait_p99_ms")
_SUMS = ("tasks", "completed", "lost", "duplicates", "overflows", "mailbox_messages", "refused")
_MAXIMA = ("high_water", "rss_mb", "rss_peak_mb")


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One setting's runs as one row: the median of its rates and latencies (the middle run
    for three, a noisy machine's outlier left out), the sum of its counts (one overflow in
    any run counts), the highest high water and memory; every run kept under `runs`.

    Raises ValueError without runs."""
    if not runs:
        raise ValueError("a setting needs at least one run")
    first = runs[0]
    row: dict[str, Any] = {key: first[key] for key in ("size", "policy", "mailbox")}
    row["repeats"] = len(runs)
    for key in _SUMS:
        row[key] = sum(run[key] for run in runs)
    for key in _MEDIANS:
        values = [run[key] for run in runs if run[key] is not None]
        row[key] = statistics.median(values) if values else None
    for key in _MAXIMA:
        values = [run[key] for run in runs if run[key] is not None]
        row[key] = max(values) if values else None
    refused: Counter[str] = Counter()
    for run in runs:
        refused.update(run["refused_by_code"])
    row["refused_by_code"] = dict(refused)
    row["runs"] = [
        {key: run[key] for key in (*_MEDIANS, "seconds", "high_water", "overflows", "refused")}
        for run in runs
    ]
    return row


# --- the recommendation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    within: float = DEFAULT_WITHIN
    """A qualifying throughput is at least (1 - within) of the best."""
    p99_bound_ms: float = DEFAULT_P99_BOUND_MS

    def __post_init__(self) -> None:
        if not 0 <= self.within < 1:
            raise ValueError(f"within must be in [0, 1), got {self.within}")
        if not self.p99_bound_ms > 0:
            raise ValueError(f"the p99 bound must be positive, got {self.p99_bound_ms}")

    def describe(self) -> str:
        return (
            f"the smallest size with every task complete, no refused call, no overflow, "
            f"task p99 at most {self.p99_bound_ms:g} ms and throughput within "
            f"{self.within * 100:g} % of the best"
        )


@dataclass(frozen=True, slots=True)
class Recommendation:
    size: int | None
    policy: str | None
    reason: str


def _name(row: dict[str, Any]) -> str:
    policy = row["policy"]
    return f"{row['size']}" + ("" if policy == NO_POLICY else f"/{policy}")


def failed_conditions(row: dict[str, Any], rule: Rule, floor: float) -> list[str]:
    """What keeps a row from qualifying, in words; empty when it qualifies."""
    failed = []
    if row["lost"]:
        failed.append(f"{row['lost']} of {row['tasks']} tasks not complete")
    if row["refused"]:
        codes = ", ".join(f"{n} {c}" for c, n in sorted(row["refused_by_code"].items()))
        failed.append(f"refused {codes or row['refused']}")
    if row["overflows"]:
        failed.append(f"{row['overflows']} overflows")
    if row["task_p99_ms"] > rule.p99_bound_ms:
        failed.append(f"p99 {row['task_p99_ms']:,.1f} ms > {rule.p99_bound_ms:g} ms")
    if row["tasks_per_s"] < floor:
        failed.append(f"{row['tasks_per_s']:,.0f} tasks/s < {floor:,.0f}")
    return failed


def recommend(rows: Sequence[dict[str, Any]], rule: Rule) -> Recommendation:
    """The setting `rule` picks from a sweep's table, and why (see the module docstring)."""
    if not rows:
        return Recommendation(None, None, "no setting was measured")
    best = max(rows, key=lambda row: row["tasks_per_s"])
    floor = (1 - rule.within) * best["tasks_per_s"]
    qualifying = [row for row in rows if not failed_conditions(row, rule, floor)]
    best_text = f"the best, {best['tasks_per_s']:,.0f} tasks/s at {_name(best)}"
    if not qualifying:
        why = "; ".join(
            f"{_name(row)}: {', '.join(failed_conditions(row, rule, floor))}" for row in rows
        )
        return Recommendation(None, None, f"none qualifies ({best_text}): {why}")
    chosen = min(
        qualifying,
        key=lambda row: (row["size"], -row["tasks_per_s"], row["task_p99_ms"], row["policy"]),
    )
    smaller = [row for row in rows if row["size"] < chosen["size"]]
    passed_over = "; ".join(
        f"{_name(row)}: {', '.join(failed_conditions(row, rule, floor))}" for row in smaller
    )
    reason = (
        f"{_name(chosen)}: {chosen['tasks_per_s']:,.0f} tasks/s, within "
        f"{rule.within * 100:g} % of {best_text}; task p99 {chosen['task_p99_ms']:,.1f} ms "
        f"(bound {rule.p99_bound_ms:g} ms); no overflow, no refused call"
        + (f". Smaller sizes did not qualify: {passed_over}" if passed_over else "")
    )
    return Recommendation(chosen["size"], chosen["policy"], reason)


# --- output ------------------------------------------------------------------------------------

_COLUMNS = (
    ("size", "size", "", 6),
    ("policy", "policy", "", 6),
    ("tasks/s", "tasks_per_s", ",.0f", 9),
    ("p50 ms", "task_p50_ms", ",.1f", 8),
    ("p99 ms", "task_p99_ms", ",.1f", 8),
    ("high water", "high_water", ",", 10),
    ("overflows", "overflows", ",", 9),
    ("wait p99 ms", "wait_p99_ms", ",.2f", 11),
    ("RSS MB", "rss_mb", ",.0f", 7),
    ("not done", "lost", ",", 8),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a plain-text table, one line per setting; refused calls by code last."""
    lines = ["  ".join(f"{title:>{width}}" for title, _, _, width in _COLUMNS) + "  refused"]
    for row in rows:
        cells = [
            f"{'-' if row.get(key) is None else format(row[key], spec):>{width}}"
            for _, key, spec, width in _COLUMNS
        ]
        refused = ", ".join(f"{code} {n}" for code, n in sorted(row["refused_by_code"].items()))
        lines.append("  ".join(cells) + "  " + (refused or "0"))
    return "\n".join(lines)


def figures(result: dict[str, Any]) -> dict[str, Figure]:
    """Throughput and task p99 against size, one line per policy, size on a log axis."""
    rows = result["settings"]
    size_label = f"{result['knob']['size_key']} (log)"
    plotted = {}
    for name, key, ylabel in (
        ("throughput", "tasks_per_s", "tasks completed / s"),
        ("p99", "task_p99_ms", "task latency p99 (ms)"),
    ):
        figure = Figure(figsize=(6, 4), dpi=100)
        axes = figure.add_subplot()
        for policy in dict.fromkeys(row["policy"] for row in rows):
            mine = sorted((row for row in rows if row["policy"] == policy), key=_size)
            axes.plot(
                [row["size"] for row in mine],
                [row[key] for row in mine],
                marker="o",
                label=f"policy {policy}" if policy != NO_POLICY else "no policy",
            )
        overflowed = [row for row in rows if row["overflows"] or row["refused"]]
        if overflowed:
            axes.scatter(
                [row["size"] for row in overflowed],
                [row[key] for row in overflowed],
                s=160,
                facecolors="none",
                edgecolors="red",
                label="overflowed or refused calls",
                zorder=3,
            )
        if key == "task_p99_ms":
            axes.axhline(
                result["rule"]["p99_bound_ms"], color="grey", linestyle=":", label="p99 bound"
            )
        axes.set_xscale("log", base=2)
        sizes = sorted({row["size"] for row in rows})
        axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
        axes.minorticks_off()
        highest = max([row[key] for row in rows] + [0.0])
        if key == "task_p99_ms":
            highest = max(highest, result["rule"]["p99_bound_ms"])
        axes.set_ylim(0, highest * 1.15 or 1.0)
        axes.set(
            xlabel=size_label,
            ylabel=ylabel,
            title=f"{result['actor']}: {ylabel} by size",
        )
        axes.grid(alpha=0.3, which="both")
        axes.legend()
        plotted[f"sweep-{result['actor']}-{name}.png"] = figure
    return plotted


def _size(row: dict[str, Any]) -> int:
    size: int = row["size"]
    return size


def write_plots(result: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures(result).items():
        path = directory / name
        figure.savefig(path)
        written.append(path)
    return written


# --- command line ------------------------------------------------------------------------------


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are N,M,...; not {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, not {text!r}")
    return values


def _policies(text: str) -> list[str]:
    policies = text.split(",")
    unknown = [policy for policy in policies if policy not in POLICIES]
    if unknown:
        # drop_newest and drop_oldest lose Ingest or Flush messages silently on these actors.
        raise argparse.ArgumentTypeError(
            f"policies are {' or '.join(POLICIES)} (the drop policies may lose activations), "
            f"not {', '.join(unknown)}"
        )
    return list(dict.fromkeys(policies))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--actor", choices=tuple(KNOBS), default="state")
    parser.add_argument("--sizes", type=_positive_ints, default=list(DEFAULT_SIZES))
    parser.add_argument(
        "--policy", type=_policies, help=f"default {','.join(POLICIES)}; none for frontend"
    )
    parser.add_argument("--protocol", choices=("unary", "batch"), default="batch")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="batch: tasks a fetch")
    parser.add_argument(
        "--workers", type=int, default=_DEFAULT_LOAD.workers, help="tasks held at once"
    )
    parser.add_argument("--processes", type=int, default=_DEFAULT_LOAD.processes)
    parser.add_argument("--tasks", type=int, default=_DEFAULT_LOAD.tasks, help="tasks per setting")
    parser.add_argument(
        "--ingest-batch",
        type=int,
        default=DEFAULT_INGEST_BATCH,
        help="db_insert_batch_max_len: records per Ingest message (the broker's default: 256)",
    )
    parser.add_argument("--max-seconds", type=float, default=_DEFAULT_LOAD.max_seconds)
    parser.add_argument(
        "--repeats", type=int, default=_DEFAULT_LOAD.repeats, help="runs per setting (median)"
    )
    parser.add_argument("--within", type=float, default=DEFAULT_WITHIN)
    parser.add_argument("--p99-bound-ms", type=float, default=DEFAULT_P99_BOUND_MS)
    parser.add_argument("--json", type=Path, help="write the result to this file")
    parser.add_argument("--plots", type=Path, help="write the PNG plots into this directory")
    parser.add_argument("--note", default="", help="kept in the JSON beside the numbers")
    return parser


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"{_name(row)} ({row['repeats']} runs): {row['tasks_per_s']:,.0f} tasks/s, "
        f"p99 {row['task_p99_ms']:,.1f} ms, "
        f"{row['mailbox']} high water {row['high_water']}, {row['overflows']} overflows, "
        f"{row['refused']} refused, {row['lost']} not complete"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    knob = KNOBS[args.actor]
    if knob.policy_key is None and args.policy is not None:
        parser.error(f"--actor {args.actor}: {knob.size_key} has no overflow policy")
    policies = [NO_POLICY] if knob.policy_key is None else args.policy or list(POLICIES)
    try:
        kind: WorkerKind = BatchWorkers(args.batch) if args.protocol == "batch" else UnaryWorkers()
        load = Load(
            tasks=args.tasks,
            workers=args.workers,
            processes=args.processes,
            kind=kind,
            ingest_batch=args.ingest_batch,
            max_seconds=args.max_seconds,
            repeats=args.repeats,
        )
        rule = Rule(args.within, args.p99_bound_ms)
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.actor}: {knob.size_key} x {', '.join(policies)}; reaches it: {knob.reaches_it}")
    load_before = os.getloadavg()
    started = time.time()
    with EmbeddedKafka(port=free_port(HOST)) as kafka:
        rows = sweep(
            knob,
            args.sizes,
            policies,
            load,
            bootstrap=kafka.bootstrap,
            kafka_pid=kafka.pid,
            on_row=lambda row: print(_row_line(row), flush=True),
        )
    chosen = recommend(rows, rule)
    result = {
        "command": "python -m loadtest sweep "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "actor": args.actor,
        "knob": {
            "size_key": knob.size_key,
            "policy_key": knob.policy_key,
            "watched": knob.watched,
            "reaches_it": knob.reaches_it,
        },
        "load": load.describe(),
        "rule": {"within": rule.within, "p99_bound_ms": rule.p99_bound_ms, "text": rule.describe()},
        "settings": rows,
        "recommendation": {"size": chosen.size, "policy": chosen.policy, "reason": chosen.reason},
        "machine": {
            **machine(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "note": args.note,
    }
    print(table(rows))
    print(f"rule: {rule.describe()}")
    print(f"recommendation: {chosen.reason}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plots is not None:
        for path in write_plots(result, args.plots):
            print(f"wrote {path}")
    return 0 if all(row["duplicates"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
