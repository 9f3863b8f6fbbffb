"""Benchmark of ingest: activations per second from Kafka into the state actor and
durable in SQLite.

Run with `python -m loadtest ingest --json ingest.json`. It starts an embedded Kafka,
produces the activations first (300-byte parameters by default), then starts the real
state actor, SQLite writer and Kafka consumer and times consume → Ingest → flush →
Persisted: from the consumer's first `Ingest` to the state until the writer reports the
last offset durable. The one-off startup costs stay outside the clock: the consumer-group
join (half the session timeout on Tansu) and the first fetch after the assignment (about
half a second against Tansu). The state's pending limit is raised above the count, so
backpressure does not cap the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pykka

from actors.cli import ActivationSpec, produce_activations
from actors.consumer import ConsumerConfig, KafkaConsumer
from actors.embedded_kafka import EmbeddedKafka, TopicSpec, free_port
from actors.messages import Connect, ConsumerStats, ConsumerStatsQuery, Ingest, Persisted, Recipient
from actors.producer import KafkaProducer, ProducerConfig
from actors.records import Offset, Partition
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.statemachine import Limits
from actors.writer import SqliteWriter, WriterConfig

_TOPIC = "taskworker"
_DLQ_TOPIC = "taskworker-dlq"
_ASK_TIMEOUT_S = 10.0


class IngestWatch:
    """Stands between the actors to see the pipeline's progress without slowing it.

    Forwards `Ingest` from the consumer to the state and `Persisted` from the writer to
    the consumer, noting the highest offset ingested and made durable per partition.
    """

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self._lock = threading.Lock()
        self._ingested = 0
        self._highest: dict[Partition, Offset] = {}
        self._durable: dict[Partition, Offset] = {}
        self.state: Recipient | None = None
        self.consumer: Recipient | None = None
        self.done = threading.Event()
        self.first_ingest_at = 0.0
        self.done_at = 0.0

    def tell(self, message: object) -> None:
        match message:
            case Ingest(records, offsets):
                with self._lock:
                    if not self._ingested:
                        self.first_ingest_at = time.perf_counter()
                    self._ingested += len(records)
                    for item in offsets:
                        self._highest[item.partition] = item.offset
                if self.state is not None:
                    self.state.tell(message)
            case Persisted(offsets):
                with self._lock:
                    for item in offsets:
                        self._durable[item.partition] = item.offset
                    if self._complete():
                        self.done_at = time.perf_counter()
                        self.done.set()
                if self.consumer is not None:
                    self.consumer.tell(message)
            case _:
                raise TypeError(f"ingest watch got an unexpected message: {message!r}")

    def _complete(self) -> bool:
        return self._ingested >= self._expected and all(
            self._durable.get(p, -1) >= o for p, o in self._highest.items()
        )


def measure(kafka: EmbeddedKafka, count: int, timeout_s: float, db_path: Path) -> dict[str, Any]:
    watch = IngestWatch(count)
    state = StateActor.start(
        StateConfig(limits=Limits(max_pending_count=count + 1)), MailboxConfig(size=10_000)
    )
    try:
        watch.state = state
        consumer = KafkaConsumer.start(
            ConsumerConfig(
                bootstrap_servers=kafka.bootstrap,
                topic=_TOPIC,
                dlq_topic=_DLQ_TOPIC,
                group_id="loadtest-ingest",
                auto_offset_reset="earliest",
            ),
            watch,
            KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap)),
            mailbox=MailboxConfig(size=10_000),
        )
        watch.consumer = consumer
        writer = SqliteWriter.start(
            WriterConfig(db_path=db_path),
            state,
            mailbox=MailboxConfig(size=1_000),
            persisted_listener=watch,
        )
        state.tell(Connect(writer=writer, consumer=consumer))

        if not watch.done.wait(timeout_s):
            raise TimeoutError(f"not all {count} activations were durable within {timeout_s} s")
        seconds = watch.done_at - watch.first_ingest_at
        stats = _stats(consumer)
    finally:
        pykka.ActorRegistry.stop_all(timeout=_ASK_TIMEOUT_S)
    return {
        "ingest_per_s": count / seconds,
        "ingest_seconds": seconds,
        "ingest_batches": stats.batches,
        "decode_failures": sum(stats.decode_failures.values()),
    }


def _stats(consumer: pykka.ActorRef[KafkaConsumer]) -> ConsumerStats:
    stats: ConsumerStats = consumer.ask(ConsumerStatsQuery(), block=True, timeout=_ASK_TIMEOUT_S)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtest.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--param-bytes", type=int, default=300)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each phase")
    parser.add_argument("--dir", type=Path, help="where the SQLite file goes (default: temp)")
    args = parser.parse_args(argv)

    topics = (TopicSpec(_TOPIC), TopicSpec(_DLQ_TOPIC))
    spec = ActivationSpec(
        namespace="loadtest", taskname="loadtest.ingest", param_bytes=args.param_bytes
    )
    with (
        EmbeddedKafka(port=free_port(), topics=topics, partitions=args.partitions) as kafka,
        tempfile.TemporaryDirectory(dir=args.dir) as directory,
    ):
        producer = KafkaProducer(ProducerConfig(bootstrap_servers=kafka.bootstrap))
        produce_started = time.perf_counter()
        try:
            outcome = produce_activations(producer, _TOPIC, spec, args.count, args.timeout)
        finally:
            producer.close(timeout_s=args.timeout)
        produce_s = time.perf_counter() - produce_started
        if outcome.failed:
            print(f"producing failed: {outcome.first_failure}", file=sys.stderr)
            return 1
        result = measure(kafka, args.count, args.timeout, Path(directory) / "ingest.sqlite")

    print(
        f"produce: {args.count:,} activations ({args.param_bytes}-byte parameters) on "
        f"{args.partitions} partitions in {produce_s:.2f} s ({args.count / produce_s:,.0f}/s)"
    )
    print(
        f"ingest: {args.count:,} activations consumed, ingested and durable in "
        f"{result['ingest_seconds']:.2f} s: {result['ingest_per_s']:,.0f}/s "
        f"in {result['ingest_batches']} Ingest batches"
    )
    if args.json is not None:
        output = {
            **result,
            "count": args.count,
            "param_bytes": args.param_bytes,
            "partitions": args.partitions,
            "produce_per_s": args.count / produce_s,
        }
        args.json.write_text(json.dumps(output) + os.linesep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
