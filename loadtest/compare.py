"""The design's three questions, answered for both store modes in one run.

Run with `python -m loadtest compare [--quick] [--json PATH]`. For each store mode:

1. throughput and latency at 32, 256 and 768 concurrent workers (one broker serves the
   three phases, after a warm-up);
2. p99 latency at 256 workers with and without a 200 ms delay before every SQLite commit
   (a second broker, started with the delay);
3. restore: the time from a file of 100,000 records to a broker state that serves them
   (memory: the writer's LoadAndRestore into the state actor; sqlite-direct: opening the
   store and counting its rows, since the rows are its state).

The JSON is `{"memory": M, "sqlite-direct": M}` with M = `{"by_workers": {"32": R, ...},
"p99_ms_no_delay", "p99_ms_commit_delay", "restore_100k_s"}` and R = `{"tasks_per_s",
"p50_ms", "p99_ms", "errors", "lost", "duplicates"}`. The run also writes
`loadtest/results/<date>/`: that JSON, every phase's full numbers, and the report
(PNG plots and one HTML page).
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
from loadtest.e2e import BrokerSetup, Phase, session
from loadtest.report import machine

MODES = ("memory", "sqlite-direct")
WORKER_COUNTS = (32, 256, 768)
DELAY_WORKERS = 256
COMMIT_DELAY_MS = 200
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
    processes: int
    param_bytes: int
    restore_records: int


FULL = Plan(
    tasks=15_000,
    delay_tasks=15_000,
    max_seconds=60.0,
    delay_max_seconds=30.0,
    processes=4,
    param_bytes=512,
    restore_records=100_000,
)
QUICK = Plan(
    tasks=300,
    delay_tasks=300,
    max_seconds=20.0,
    delay_max_seconds=3.0,
    processes=1,
    param_bytes=128,
    restore_records=2_000,
)


def _row(phase: dict[str, Any]) -> dict[str, Any]:
    return {
        "tasks_per_s": phase["tasks_per_s"],
        "p50_ms": phase["latency_ms"]["p50"],
        "p99_ms": phase["latency_ms"]["p99"],
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
        store_mode=mode, max_tasks=max(plan.tasks, plan.delay_tasks), max_workers=WORKER_COUNTS[-1]
    )
    by_workers: dict[str, dict[str, Any]] = {}
    with session(setup, bootstrap=bootstrap) as under_test:
        for workers in WORKER_COUNTS:
            _say(f"{mode}: {workers} workers, {plan.tasks:,} tasks")
            phase = under_test.run(replace(base, workers=workers, max_seconds=plan.max_seconds))
            phases.append(phase)
            by_workers[str(workers)] = _row(phase)
    no_delay = next(p for p in phases if p["workers"] == DELAY_WORKERS)
    _say(f"{mode}: {DELAY_WORKERS} workers, {COMMIT_DELAY_MS} ms commit delay")
    with session(replace(setup, commit_delay_ms=COMMIT_DELAY_MS), bootstrap=bootstrap) as delayed:
        with_delay = delayed.run(
            replace(
                base,
                workers=DELAY_WORKERS,
                tasks=plan.delay_tasks,
                max_seconds=plan.delay_max_seconds,
            )
        )
    phases.append(with_delay)
    restore_s = (
        restore_memory_s(restore_file) if mode == "memory" else restore_direct_s(restore_file)
    )
    summary = {
        "by_workers": by_workers,
        "p99_ms_no_delay": no_delay["latency_ms"]["p99"],
        "p99_ms_commit_delay": with_delay["latency_ms"]["p99"],
        "restore_100k_s": round(restore_s, 3),
    }
    return summary, phases


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
    """Both modes' summaries and every phase; without `bootstrap`, an embedded Kafka."""
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
    return results, phases


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'':14}" + "".join(f"{mode:>28}" for mode in results))
    for workers in WORKER_COUNTS:
        cells = []
        for summary in results.values():
            row = summary["by_workers"][str(workers)]
            cells.append(
                f"{row['tasks_per_s']:>8,.0f}/s p50 {row['p50_ms']:>6.0f} p99 {row['p99_ms']:>6.0f}"
            )
        print(f"{workers:>4} workers   " + "".join(f"{c:>28}" for c in cells))
    for key in ("p99_ms_no_delay", "p99_ms_commit_delay", "restore_100k_s"):
        print(f"{key:14}" + "".join(f"{summary[key]:>28,.3f}" for summary in results.values()))


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
