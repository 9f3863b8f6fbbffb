"""Claim throughput on the bare state machine with paused namespaces holding many tasks,
against the same claims with nothing paused: a paused group's heap must be skipped, not
scanned, so the two should be equal within noise.

Claims name the application, as workers do. The paused tasks are the oldest and share the
claimers' application, so without holding they would be first in every claim's scope. A
third setting holds the same tasks unpaused in another application: the memory they take
without any pause, which tells what holding them costs apart from what keeping them costs.
Each setting runs `--rounds` times, interleaved, and the median counts. Rates are per
second of this process's CPU time.

    python -m loadtest paused [--json PATH] [--paused-namespaces N] [--paused-tasks N]
                              [--claims N] [--rounds N]
"""

from __future__ import annotations

import gc
import statistics
import time

from actors.records import ActivationId, KafkaOffset, Offset, Partition, Record, Status
from actors.runtime_rules import RuntimeRules
from actors.statemachine import StateMachine
from loadtest.actors import APPLICATION, UNLIMITED, make_records
from loadtest.report import emit, parser


def paused_records(namespaces: int, tasks: int, application: str) -> list[Record]:
    """`tasks` records spread over `namespaces` namespaces named paused-N."""
    return [
        Record(
            id=ActivationId(f"paused-{i}"),
            application=application,
            namespace=f"paused-{i % namespaces}",
            taskname="bench.paused",
            status=Status.PENDING,
            received_at=0.0,
            added_at=0.0,
            partition=Partition(0),
            offset=Offset(i),
            activation=b"paused",
            processing_deadline_duration_s=60,
        )
        for i in range(tasks)
    ]


def claims_per_s(claims: int, namespaces: int, tasks: int, *, paused: bool) -> float:
    """Claim + COMPLETE pairs by application, with `tasks` more in `namespaces` namespaces
    of the claimers' application, all paused (`paused`), or else of another application."""
    names = frozenset(f"paused-{n}" for n in range(namespaces))
    machine = StateMachine(
        UNLIMITED, RuntimeRules(paused_namespaces=names if paused else frozenset())
    )
    now = time.time()
    application = APPLICATION if paused else "elsewhere"
    held = paused_records(namespaces, tasks, application) if namespaces else []
    for batch in (held, make_records(claims)):
        for start in range(0, len(batch), 5000):
            chunk = tuple(batch[start : start + 5000])
            machine.ingest(chunk, (KafkaOffset(chunk[-1].partition, chunk[-1].offset),), now)
    # The paused ones are ingested after `now`-stamped admission like the rest; make them
    # the oldest so that an unheld queue would meet them first.
    for record in held:
        record.added_at = 0.0
    flush = machine.take_flush()
    if flush is not None:
        machine.flush_done(flush.seq)
    if machine.held_pending_count != (tasks if paused else 0):
        raise RuntimeError(f"{machine.held_pending_count} held, expected {tasks}")
    gc.collect()
    # CPU time, not wall time: on a shared machine another process's burst would otherwise
    # read as a difference between the settings.
    started = time.process_time()
    for done in range(claims):
        claimed = machine.claim(now, APPLICATION)
        if claimed is None or claimed.namespace.startswith("paused-"):
            raise RuntimeError(f"claim {done} handed out {claimed!r}")
        machine.conclude(claimed.id, Status.COMPLETE)
    return claims / (time.process_time() - started)


def main(argv: list[str] | None = None) -> int:
    arguments_parser = parser(__doc__ or "")
    arguments_parser.add_argument("--paused-namespaces", type=int, default=1000)
    arguments_parser.add_argument("--paused-tasks", type=int, default=100_000)
    arguments_parser.add_argument("--claims", type=int, default=100_000)
    arguments_parser.add_argument("--rounds", type=int, default=5)
    arguments = arguments_parser.parse_args(argv)
    namespaces, tasks, claims = (
        arguments.paused_namespaces,
        arguments.paused_tasks,
        arguments.claims,
    )
    runs: dict[str, list[float]] = {"none": [], "paused": [], "elsewhere": []}
    for _ in range(arguments.rounds):
        runs["none"].append(claims_per_s(claims, 0, 0, paused=False))
        runs["paused"].append(claims_per_s(claims, namespaces, tasks, paused=True))
        runs["elsewhere"].append(claims_per_s(claims, namespaces, tasks, paused=False))
    none_s, paused_s, elsewhere_s = (statistics.median(runs[k]) for k in runs)
    emit(
        {
            "claims_per_s_none_paused": none_s,
            "claims_per_s_paused": paused_s,
            "claims_per_s_same_tasks_unpaused_elsewhere": elsewhere_s,
            "paused_vs_none_percent": 100 * paused_s / none_s,
            "paused_vs_elsewhere_percent": 100 * paused_s / elsewhere_s,
            "paused_namespaces": arguments.paused_namespaces,
            "paused_tasks": arguments.paused_tasks,
            "claims": arguments.claims,
            "rounds": arguments.rounds,
        },
        arguments.json,
    )
    return 0
