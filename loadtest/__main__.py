"""`python -m loadtest <benchmark> [options]`: dispatches to one module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

from actors.runtime import tune_garbage_collector

BENCHMARKS = {
    "actors": "state machine and state actor throughput, ask round trip",
    "writer": "SQLite flush throughput and restore time",
    "ingest": "Kafka to durable state, activations per second",
    "grpc": "GetTask/SetTaskStatus cycles per second against a bare grpcio ceiling",
    "e2e": "Kafka to broker to workers until every task is complete, tasks/s and latency",
    "compare": "memory vs sqlite-direct: throughput, latency, commit delay, restore; report",
    "latency": "produce to first claim at low load, p50/p99 from workers and the broker",
    "chaos": "kills, Kafka and disk faults under load: lost, duplicates, drain; report",
    "sweep": "mailbox size x overflow policy for one actor: throughput, p99, recommendation",
    "paused": "claims per second with 1,000 paused namespaces holding 100,000 tasks vs none",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        lines = [f"  {name:8} {about}" for name, about in BENCHMARKS.items()]
        print("usage: python -m loadtest <benchmark> [--json PATH]\n" + "\n".join(lines))
        return 2
    tune_garbage_collector()  # measured under the broker's own process settings
    module = importlib.import_module(f"loadtest.{argv[0]}")
    exit_code: int = module.main(argv[1:])
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
