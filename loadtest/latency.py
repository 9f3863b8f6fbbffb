"""Produce → first claim latency at low load: how soon a task reaching Kafka is in a worker's
hands when the broker is idle.

Run with `python -m loadtest latency [--tasks 200] [--rate 20] [--json PATH]`. It starts the
embedded Kafka and a broker as `loadtest e2e` does, then produces the tasks one at a time at
`--rate` per second, each stamped with `received_at` just before it is produced, while a few
polling workers in one process claim and complete them. A task's latency is the worker's
wall clock when the task arrived minus its `received_at` (one machine, one clock).

Workers wait `--poll-sleep-ms` (5 ms here, 20 ms in e2e) after an empty answer before asking
again; that sleep is part of what is measured. With the broker's metrics on (a free port on
127.0.0.1 by default), the broker's own histogram `taskbroker_first_claim_latency_seconds`
is read before and after the run, and its p50/p99, estimated from the buckets, are printed
beside the workers' numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actors.activation import encode_activation
from actors.embedded_kafka import free_port
from actors.errors import KafkaUnavailable
from actors.producer import KafkaProducer, OutgoingMessage, ProducerConfig
from loadtest.broker import BrokerSetup
from loadtest.e2e import percentiles, session
from loadtest.exposition import histogram_buckets, observed_between, scrape
from loadtest.producer import APPLICATION, task_ids
from loadtest.report import machine
from loadtest.workers import run_workers

BROKER_HISTOGRAM = "taskbroker_first_claim_latency_seconds"
_PRODUCE_TIMEOUT_S = 10.0
_SETTLE_S = 30.0
"""Added to the producing time to bound a run: room for the last tasks to be claimed."""


@dataclass(frozen=True, slots=True)
class LatencyPlan:
    tasks: int = 200
    rate_per_s: float = 20.0
    workers: int = 2
    """Few, since every empty poll costs the broker CPU that an idle broker would not spend."""
    poll_sleep_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"tasks must be positive, got {self.tasks}")
        if self.rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {self.rate_per_s}")
        if self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")

    @property
    def max_seconds(self) -> float:
        return self.tasks / self.rate_per_s + _SETTLE_S


# --- producing one at a time ----------------------------------------------------------------


def produce_paced(
    bootstrap: str,
    topic: str,
    ids: list[str],
    rate_per_s: float,
    *,
    started: threading.Event,
    stop: threading.Event,
) -> None:
    """Once `started` is set, produce one activation per id at `rate_per_s`, each stamped
    with the time it is produced, until done or `stop` is set.

    Raises KafkaUnavailable when a produce is not acknowledged.
    """
    # No linger: a message waiting for company would count as broker latency.
    producer = KafkaProducer(ProducerConfig(bootstrap_servers=bootstrap, linger_ms=0))
    try:
        started.wait()
        began = time.monotonic()
        for index, activation_id in enumerate(ids):
            # On a schedule rather than a fixed sleep, so a slow acknowledgement is not
            # added to every later interval.
            if stop.wait(max(began + index / rate_per_s - time.monotonic(), 0.0)):
                return
            value = encode_activation(
                activation_id=activation_id,
                application=APPLICATION,
                namespace="default",
                taskname="loadtest.noop",
                received_at=time.time(),
                processing_deadline_duration_s=600,
            )
            report = producer.produce_many(
                [OutgoingMessage(activation_id, topic, value)], _PRODUCE_TIMEOUT_S
            )
            if report.failed:
                raise KafkaUnavailable(f"{activation_id} not acknowledged: {report.failed}")
    finally:
        producer.close(_PRODUCE_TIMEOUT_S)


# --- the broker's histogram -------------------------------------------------------------------


def _scrape(url: str) -> dict[float, float] | None:
    return histogram_buckets(scrape(url), BROKER_HISTOGRAM)


# --- one run ------------------------------------------------------------------------------------


def measure(plan: LatencyPlan, bootstrap: str | None, metrics_port: int) -> dict[str, Any]:
    """Start a broker (and without `bootstrap` the embedded Kafka), produce and claim."""
    setup = BrokerSetup(max_tasks=plan.tasks, max_workers=plan.workers, metrics_port=metrics_port)
    with session(setup, bootstrap=bootstrap) as under_test:
        url = setup.metrics_url
        # After the warm-up, whose tasks the broker's histogram has observed too.
        before = _scrape(url) if url else None
        ids = task_ids(f"{under_test.topic}-latency", plan.tasks)
        started, stop = threading.Event(), threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="producer") as pool:
            producing = pool.submit(
                produce_paced,
                under_test.bootstrap,
                under_test.topic,
                ids,
                plan.rate_per_s,
                started=started,
                stop=stop,
            )
            try:
                report, _, _ = run_workers(
                    (under_test.target,),
                    processes=1,
                    threads=plan.workers,
                    work_ms=0.0,
                    until_completed=plan.tasks,
                    max_seconds=plan.max_seconds,
                    empty_poll_sleep_ms=plan.poll_sleep_ms,
                    on_started=started.set,
                )
            finally:
                stop.set()
                started.set()
            producing.result()
        broker = observed_between(before, _scrape(url)) if url else None
    produced = set(ids)
    latencies = [ms for task_id, ms in report.claim_latencies_ms.items() if task_id in produced]
    return {
        **asdict(plan),
        "claimed": len(latencies),
        "lost": len(produced - set(report.completed)),
        "duplicates": len(report.received) - len(set(report.received)),
        "latency_ms": percentiles(latencies),
        "broker_latency_ms": broker,
    }


def print_result(result: dict[str, Any]) -> None:
    latency, broker = result["latency_ms"], result["broker_latency_ms"]
    print(
        f"produce → first claim: {result['tasks']} tasks at {result['rate_per_s']:g}/s, "
        f"{result['workers']} workers that sleep {result['poll_sleep_ms']:g} ms after an "
        "empty poll (the sleep counts in the latency)"
    )
    print(
        f"  workers (arrival - received_at): p50 {latency['p50']:,.1f} ms, "
        f"p99 {latency['p99']:,.1f} ms, max {latency['max']:,.1f} ms; "
        f"{result['claimed']} claimed, {result['lost']} lost, {result['duplicates']} duplicates"
    )
    if broker is None:
        print(f"  broker: metrics off, {BROKER_HISTOGRAM} not read")
    elif broker["absent"]:
        print(f"  broker: no {BROKER_HISTOGRAM} on /metrics (this broker does not export it)")
    else:
        print(
            f"  broker ({BROKER_HISTOGRAM}, estimated from buckets): "
            f"p50 {broker['p50_ms']} ms, p99 {broker['p99_ms']} ms, {broker['count']} observed"
        )


def main(argv: list[str] | None = None) -> int:
    defaults = LatencyPlan()
    parser = argparse.ArgumentParser(prog="python -m loadtest latency", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the result to this file")
    parser.add_argument("--tasks", type=int, default=defaults.tasks)
    parser.add_argument("--rate", type=float, default=defaults.rate_per_s, help="tasks per s")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="polling workers")
    parser.add_argument(
        "--poll-sleep-ms",
        type=float,
        default=defaults.poll_sleep_ms,
        help="a worker's wait after an empty poll",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="the broker's metrics port on 127.0.0.1 (default: a free one; 0: off)",
    )
    parser.add_argument("--kafka", help="bootstrap servers of a running Kafka (default: embedded)")
    args = parser.parse_args(argv)
    try:
        plan = LatencyPlan(args.tasks, args.rate, args.workers, args.poll_sleep_ms)
    except ValueError as error:
        parser.error(str(error))
    metrics_port = free_port() if args.metrics_port is None else args.metrics_port
    result = measure(plan, args.kafka, metrics_port)
    print_result(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
