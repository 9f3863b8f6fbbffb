"""The design's three questions, answered for both store modes in one run.

Run with `python -m loadtest compare [--quick] [--json PATH]`. For each store mode:

1. throughput and latency at 32, 256 and 768 concurrent workers (one broker serves the
   three phases, after a warm-up);
2. p99 latency at 256 workers with and without a 200 ms delay before every SQLite commit
   (a second broker, started with the delay);
3. the commit-latency sweep: tasks/s and p99 at 256 workers with 0, 2 and 10 ms before
   every commit, where a disk whose commits take milliseconds shows the write lock (one
   broker per delay; the 0 ms point is the 256-worker phase of 1., the same settings);
4. restore: the time from a file of 100,000 records to a broker state that serves them
   (memory: the writer's LoadAndRestore into the state actor; sqlite-direct: opening the
   store and counting its rows, since the rows are its state);
5. the worker protocol at 256 workers: unary (the phase of 1.) and batch (TaskBatchService,
   32 tasks per coroutine, a broker of its own so that its mailbox high-water marks are its
   own);
6. pull vs push delivery at 32, 256 and 768 worker slots, memory mode: the unary phases of
   1., and a push broker of its own (`delivery_mode = "push"`) serving the simulated push
   workers of `loadtest.push_workers`, the same three phases after a warm-up.

The JSON is `{"memory": M, "sqlite-direct": M}` with M = `{"by_workers": {"32": R, ...},
"by_protocol": {"unary": R, "batch": R}, "p99_ms_no_delay", "p99_ms_commit_delay",
"restore_100k_s"}` and R = `{"protocol", "tasks_per_s", "p50_ms", "p99_ms",
"cpu_us_per_task", "state_high_water", "state_wait_p99_ms", "errors", "lost",
"duplicates"}` (p50/p99: task latency, the latency of the call that carried each result, so
that protocols compare; cpu_us_per_task: the broker process's CPU per completed task; the
state actor's mailbox high-water mark since its broker started, and its messages' time in
the mailbox, p99, during the phase; both None without the broker's metrics), plus
`"commit_latency_sweep": {"0": {"memory": R, "sqlite-direct": R}, "2": {...}, "10":
{...}}`, and `"delivery": {"32": {"pull": R, "push": R}, "256": ..., "768": ...}` (push's
task latency: a push's arrival to the answer of the report that carried its result). The
run also writes `loadtest/results/<date>/`: that JSON, every phase's full numbers, and the
report (PNG plots and one HTML page).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pykka

from actors.direct import DirectStore
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.messages import Flush, LoadAndRestore, Stats
from actors.records import ActivationId, Offset, Partition, Record, Status
from actors.runtime import MailboxConfig, ask
from actors.state import StateActor, StateConfig
from actors.statemachine import Limits
from actors.store import SqliteStore
from actors.writer import SqliteWriter, WriterConfig
from loadtest.batch_workers import BatchWorkers
from loadtest.broker import BrokerSetup
from loadtest.e2e import STATE_ACTOR, Phase, session, summary_line
from loadtest.push_workers import PushDelivery
from loadtest.report import machine

MODES = ("memory", "sqlite-direct")
WORKER_COUNTS = (32, 256, 768)
DELAY_WORKERS = 256
PROTOCOL_WORKERS = 256
COMMIT_DELAY_MS = 200
SWEEP = "commit_latency_sweep"
SWEEP_DELAYS_MS = (0, 2, 10)
DELIVERY = "delivery"
RESULTS_DIR = Path(__file__).parent / "results"
_RESTORE_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: int
    """Tasks per measured phase."""
    delay_tasks: int
    max_seconds: float
    """Bound of each phase; a phase that runs out reports what it completed."""
    delay_max_seconds: float
    sweep_max_seconds: float
    """Bound of each sweep phase: sqlite-direct at 10 ms may not finish the tasks."""
    processes: int
    param_bytes: int
    restore_records: int


FULL = Plan(
    tasks=15_000,
    delay_tasks=15_000,
    max_seconds=60.0,
    delay_max_seconds=30.0,
    sweep_max_seconds=30.0,
    processes=4,
    param_bytes=512,
    restore_records=100_000,
)
QUICK = Plan(
    tasks=300,
    delay_tasks=300,
    max_seconds=20.0,
    delay_max_seconds=3.0,
    sweep_max_seconds=5.0,
    processes=1,
    param_bytes=128,
    restore_records=2_000,
)


def phase_row(phase: dict[str, Any]) -> dict[str, Any]:
    """A phase's full result as a row of compare's JSON (R in the module docstring)."""
    state = phase.get("mailboxes", {}).get(STATE_ACTOR, {})
    return {
        "protocol": phase["protocol"],
        "tasks_per_s": phase["tasks_per_s"],
        "p50_ms": phase["task_latency_ms"]["p50"],
        "p99_ms": phase["task_latency_ms"]["p99"],
        "cpu_us_per_task": phase["broker"]["cpu_us_per_task"],
        "state_high_water": state.get("high_water"),
        "state_wait_p99_ms": state.get("wait_p99_ms"),
        "errors": phase["errors"],
        "lost": phase["lost"],
        "duplicates": phase["duplicates"],
    }


def measure_mode(
    mode: str, plan: Plan, bootstrap: str, restore_file: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One mode's summary, and every phase's full result."""
    phases: list[dict[str, Any]] = []
    base = Phase(processes=plan.processes, param_bytes=plan.param_bytes, tasks=plan.tasks)
    setup = BrokerSetup(
        store_mode=mode,
        max_tasks=max(plan.tasks, plan.delay_tasks),
        max_workers=WORKER_COUNTS[-1],
        metrics_port=free_port(),
    )
    by_workers: dict[str, dict[str, Any]] = {}
    with session(setup, bootstrap=bootstrap) as under_test:
        for workers in WORKER_COUNTS:
            _say(f"{mode}: {workers} workers, {plan.tasks:,} tasks")
            phase = under_test.run(replace(base, workers=workers, max_seconds=plan.max_seconds))
            _say(summary_line(phase))
            phases.append(phase)
            by_workers[str(workers)] = phase_row(phase)
    no_delay = next(p for p in phases if p["workers"] == DELAY_WORKERS)
    unary = next(p for p in phases if p["workers"] == PROTOCOL_WORKERS)
    batch = _own_broker_phase(
        setup,
        replace(base, workers=PROTOCOL_WORKERS, max_seconds=plan.max_seconds, kind=BatchWorkers()),
        bootstrap,
    )
    phases.append(batch)
    delayed = replace(base, workers=DELAY_WORKERS, max_seconds=plan.sweep_max_seconds)
    phases += [
        _own_broker_phase(replace(setup, commit_delay_ms=delay_ms), delayed, bootstrap)
        for delay_ms in SWEEP_DELAYS_MS
        if delay_ms
    ]
    with_delay = _own_broker_phase(
        replace(setup, commit_delay_ms=COMMIT_DELAY_MS),
        replace(delayed, tasks=plan.delay_tasks, max_seconds=plan.delay_max_seconds),
        bootstrap,
    )
    phases.append(with_delay)
    restore_s = (
        restore_memory_s(restore_file) if mode == "memory" else restore_direct_s(restore_file)
    )
    summary = {
        "by_workers": by_workers,
        "by_protocol": {phase["protocol"]: phase_row(phase) for phase in (unary, batch)},
        "p99_ms_no_delay": no_delay["task_latency_ms"]["p99"],
        "p99_ms_commit_delay": with_delay["task_latency_ms"]["p99"],
        "restore_100k_s": round(restore_s, 3),
    }
    return summary, phases


def _own_broker_phase(setup: BrokerSetup, phase: Phase, bootstrap: str) -> dict[str, Any]:
    """One phase against a broker of its own, with metrics on a port of its own."""
    _say(
        f"{setup.store_mode}: {phase.workers} {phase.kind.name} workers, "
        f"{setup.commit_delay_ms} ms commit delay"
    )
    with session(replace(setup, metrics_port=free_port()), bootstrap=bootstrap) as own:
        result = own.run(phase)
    _say(summary_line(result))
    return result


def measure_delivery(
    plan: Plan, bootstrap: str, pull_rows: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Push delivery at WORKER_COUNTS slots beside the memory mode's pull rows (`by_workers`):
    `{slots: {"pull": R, "push": R}}`, and the push phases' full results."""
    setup = BrokerSetup(
        store_mode="memory",
        max_tasks=plan.tasks,
        max_workers=WORKER_COUNTS[-1],
        metrics_port=free_port(),
        delivery="push",
    )
    base = Phase(
        processes=plan.processes,
        param_bytes=plan.param_bytes,
        tasks=plan.tasks,
        max_seconds=plan.max_seconds,
        kind=PushDelivery(),
    )
    rows: dict[str, dict[str, Any]] = {}
    phases: list[dict[str, Any]] = []
    with session(setup, bootstrap=bootstrap, push_processes=plan.processes) as under_test:
        for workers in WORKER_COUNTS:
            _say(f"memory, push delivery: {workers} worker slots, {plan.tasks:,} tasks")
            phase = under_test.run(replace(base, workers=workers))
            _say(summary_line(phase))
            phases.append(phase)
            rows[str(workers)] = {"pull": pull_rows[str(workers)], "push": phase_row(phase)}
    return rows, phases


def sweep_summary(phases: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The commit-latency sweep, `{delay_ms: {mode: row}}`, from every phase's full result:
    the unary ones at DELAY_WORKERS workers with a delay of SWEEP_DELAYS_MS."""
    sweep: dict[str, dict[str, dict[str, Any]]] = {str(d): {} for d in SWEEP_DELAYS_MS}
    for phase in phases:
        delay = str(phase["commit_delay_ms"])
        unary = phase["protocol"] == "unary"
        if unary and phase["workers"] == DELAY_WORKERS and delay in sweep:
            sweep[delay][phase["store_mode"]] = phase_row(phase)
    return sweep


# --- restore -----------------------------------------------------------------------------------


def write_restore_file(path: Path, records: int, blob_bytes: int) -> None:
    """A store holding `records` records as a running broker leaves them: mostly pending."""
    now = time.time()
    store = SqliteStore(path)
    try:
        chunk = 10_000
        for seq, start in enumerate(range(0, records, chunk)):
            batch = tuple(
                Record(
                    id=ActivationId(f"restore-{index:09d}"),
                    application="loadtest",
                    namespace="default",
                    taskname="loadtest.noop",
                    status=Status.PROCESSING if index % 10 == 0 else Status.PENDING,
                    received_at=now,
                    added_at=now + index * 1e-6,
                    partition=Partition(0),
                    offset=Offset(index),
                    activation=bytes(blob_bytes),
                    processing_deadline_duration_s=600,
                    processing_deadline=now + 600 if index % 10 == 0 else None,
                )
                for index in range(start, min(start + chunk, records))
            )
            blobs = tuple((r.id, r.activation) for r in batch)
            store.apply(Flush(seq, tuple(r.row() for r in batch), (), blobs, ()))
    finally:
        store.close()


def restore_memory_s(path: Path) -> float:
    """Seconds from opening the file to a state actor that holds every record."""
    state = StateActor.start(StateConfig(limits=Limits()), MailboxConfig(size=100))
    try:
        started = time.perf_counter()
        writer = SqliteWriter.start(WriterConfig(db_path=path), state, mailbox=MailboxConfig(16))
        ask(writer, LoadAndRestore(), _RESTORE_TIMEOUT_S)
        # The state takes Restore before this Stats: the writer told it before answering.
        ask(state, Stats(), _RESTORE_TIMEOUT_S)
        return time.perf_counter() - started
    finally:
        pykka.ActorRegistry.stop_all(timeout=_RESTORE_TIMEOUT_S)


def restore_direct_s(path: Path) -> float:
    """Seconds to open the store and serve its first question: how many rows per status."""
    started = time.perf_counter()
    store = DirectStore(path, Limits())
    try:
        store.counts_by_status()
        return time.perf_counter() - started
    finally:
        store.close()


# --- the whole comparison ------------------------------------------------------------------------


def compare(
    plan: Plan, bootstrap: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both modes' summaries, the sweep and pull vs push, and every phase; without
    `bootstrap`, an embedded Kafka."""
    results: dict[str, Any] = {}
    phases: list[dict[str, Any]] = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadtest-")))
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedKafka(port=free_port())).bootstrap
        restore_file = workdir / "restore.sqlite"
        write_restore_file(restore_file, plan.restore_records, plan.param_bytes + 100)
        for mode in MODES:
            results[mode], mode_phases = measure_mode(mode, plan, bootstrap, restore_file)
            phases += mode_phases
        results[DELIVERY], push_phases = measure_delivery(
            plan, bootstrap, results["memory"]["by_workers"]
        )
        phases += push_phases
    results[SWEEP] = sweep_summary(phases)
    return results, phases


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def by_mode(results: dict[str, Any]) -> dict[str, Any]:
    """The per-mode summaries of compare's JSON, without the sweep."""
    return {mode: summary for mode, summary in results.items() if mode in MODES}


def _cell(row: dict[str, Any]) -> str:
    cpu = row["cpu_us_per_task"]
    return (
        f"{row['tasks_per_s']:>7,.0f}/s p50 {row['p50_ms']:>5.0f} p99 {row['p99_ms']:>5.0f} "
        f"cpu {'-' if cpu is None else f'{cpu:,.0f}':>5} µs"
    )


def _state_cell(row: dict[str, Any]) -> str:
    high_water, wait_ms = row["state_high_water"], row["state_wait_p99_ms"]
    return (
        f"state mailbox: high water {'-' if high_water is None else high_water:>5}, "
        f"p99 {'-' if wait_ms is None else f'{wait_ms:.1f}':>5} ms"
    )


def print_table(results: dict[str, Any]) -> None:
    modes = by_mode(results)
    width = 42
    print(f"{'':20}" + "".join(f"{mode:>{width}}" for mode in modes))
    for workers in WORKER_COUNTS:
        cells = [_cell(summary["by_workers"][str(workers)]) for summary in modes.values()]
        print(f"{f'{workers} workers':20}" + "".join(f"{c:>{width}}" for c in cells))
    for key in ("p99_ms_no_delay", "p99_ms_commit_delay", "restore_100k_s"):
        print(f"{key:20}" + "".join(f"{summary[key]:>{width},.3f}" for summary in modes.values()))
    print(f"worker protocol at {PROTOCOL_WORKERS} workers (p50, p99: task latency in ms)")
    for protocol in ("unary", "batch"):
        rows = [summary["by_protocol"][protocol] for summary in modes.values()]
        print(f"{protocol:20}" + "".join(f"{_cell(row):>{width}}" for row in rows))
        print(f"{'':20}" + "".join(f"{_state_cell(row):>{width}}" for row in rows))
    print(f"commit-latency sweep at {DELAY_WORKERS} workers (cpu: broker µs per task)")
    for delay, rows in results[SWEEP].items():
        cells = [_cell(rows[mode]) if mode in rows else "-" for mode in modes]
        print(f"{f'{delay} ms commits':20}" + "".join(f"{c:>{width}}" for c in cells))
    print("pull vs push delivery, memory (p50, p99: task latency in ms)")
    print(f"{'':20}" + "".join(f"{delivery:>{width}}" for delivery in ("pull", "push")))
    for slots, rows in results[DELIVERY].items():
        cells = [_cell(rows[delivery]) for delivery in ("pull", "push")]
        print(f"{f'{slots} slots':20}" + "".join(f"{c:>{width}}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest compare", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the summary JSON here")
    parser.add_argument("--quick", action="store_true", help="a few hundred tasks per phase")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results directory (default {RESULTS_DIR}/<date>; --quick: none)",
    )
    parser.add_argument("--no-report", action="store_true", help="no PNG/HTML report")
    parser.add_argument("--kafka", help="bootstrap servers of a running Kafka (default: embedded)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    results, phases = compare(plan, args.kafka)
    print_table(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    out = args.out
    if out is None and not args.quick:
        out = RESULTS_DIR / datetime.date.today().isoformat()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
        run = {
            "command": "python -m loadtest compare" + (" --quick" if args.quick else ""),
            "plan": asdict(plan),
            "seconds": round(time.monotonic() - started, 1),
            "machine": machine(),
            "phases": phases,
        }
        (out / "phases.json").write_text(json.dumps(run, indent=2) + "\n")
        if not args.no_report:
            # Imported here: matplotlib is the optional `loadtest` extra.
            from loadtest.plots import write_report  # noqa: PLC0415

            for path in write_report(results, run, out):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
