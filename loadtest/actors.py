"""How fast the state lives in memory: the plain state machine, the state actor fed batched
messages from several threads, and one ask round trip.

    python -m loadtest actors [--json PATH] [--in-flight N] [--pairs N]
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import pykka

from actors.messages import (
    Claim,
    Conclude,
    Connect,
    Flush,
    FlushDone,
    Ingest,
    WorkBatch,
)
from actors.records import (
    ActivationId,
    KafkaOffset,
    Offset,
    Partition,
    Record,
    Status,
)
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.statemachine import Limits, StateMachine
from loadtest.report import emit, parser

APPLICATION = "bench"
NAMESPACES = ("ns0", "ns1", "ns2", "ns3")
PAYLOAD = b"x" * 300
ASK_TIMEOUT_S = 10.0
UNLIMITED = Limits(max_pending_count=10**9, max_processing_count=10**9, max_delay_count=10**9)


def make_records(count: int, start: int = 0) -> list[Record]:
    return [
        Record(
            id=ActivationId(f"bench-{i}"),
            application=APPLICATION,
            namespace=NAMESPACES[i % len(NAMESPACES)],
            taskname="bench.task",
            status=Status.PENDING,
            received_at=0.0,
            added_at=0.0,
            partition=Partition(i % 8),
            offset=Offset(i),
            activation=f"bench-{i}:".encode() + PAYLOAD,
            processing_deadline_duration_s=60,
        )
        for i in range(start, start + count)
    ]


def id_of(activation: bytes) -> ActivationId:
    return ActivationId(activation.split(b":", 1)[0].decode())


def ingest_all(send: Any, records: list[Record], batch: int = 5000) -> None:
    for start in range(0, len(records), batch):
        chunk = tuple(records[start : start + batch])
        send(chunk, (KafkaOffset(chunk[-1].partition, chunk[-1].offset),))


def machine_pairs_per_s(in_flight: int, pairs: int) -> float:
    """Claim + COMPLETE pairs on the bare state machine, flushing every 1,000 pairs as the
    actor would, with `in_flight` records left when the run ends."""
    machine = StateMachine(UNLIMITED)
    now = time.time()
    ingest_all(lambda r, o: machine.ingest(r, o, now), make_records(in_flight + pairs))
    flush = machine.take_flush()
    if flush is not None:
        machine.flush_done(flush.seq)
    gc.collect()  # the set-up's garbage is not the run's to pay for
    started = time.perf_counter()
    for done in range(1, pairs + 1):
        record = machine.claim(now, APPLICATION)
        if record is None:
            raise RuntimeError("ran out of pending records")
        machine.conclude(record.id, Status.COMPLETE)
        if done % 1000 == 0:
            flush = machine.take_flush()
            if flush is not None:
                machine.flush_done(flush.seq)
    return pairs / (time.perf_counter() - started)


class InstantWriter:
    """Stands in for the SQLite writer: every flush is acknowledged at once."""

    def __init__(self, state: pykka.ActorRef[StateActor]) -> None:
        self._state = state

    def tell(self, message: object) -> None:
        if isinstance(message, Flush):
            self._state.tell(FlushDone(message.seq))


def actor_pairs_per_s(in_flight: int, pairs: int, threads: int, batch: int) -> float:
    """Conclude-with-fetch-next through the state actor, `batch` per message, from threads."""
    state = StateActor.start(StateConfig(limits=UNLIMITED), MailboxConfig(size=10_000))
    try:
        state.tell(Connect(writer=InstantWriter(state)))
        ingest_all(lambda r, o: state.tell(Ingest(r, o)), make_records(in_flight + pairs))
        claim = Claim(application=APPLICATION)
        held: list[list[ActivationId]] = []
        for _ in range(threads):
            claimed = state.ask(WorkBatch((claim,) * batch), block=True, timeout=ASK_TIMEOUT_S)
            held.append([id_of(activation) for activation in claimed])
        rounds = pairs // threads // batch

        def worker(mine: list[ActivationId]) -> None:
            for _ in range(rounds):
                message = WorkBatch(
                    tuple(Conclude(i, Status.COMPLETE, fetch_next=claim) for i in mine)
                )
                results = state.ask(message, block=True, timeout=ASK_TIMEOUT_S)
                mine[:] = [id_of(r.next_task) for r in results if r.next_task is not None]

        workers = [threading.Thread(target=worker, args=(mine,)) for mine in held]
        started = time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(timeout=120)
        return rounds * batch * threads / (time.perf_counter() - started)
    finally:
        state.stop(timeout=ASK_TIMEOUT_S)


def ask_rtt_us(asks: int) -> float:
    state = StateActor.start(StateConfig(), MailboxConfig(size=100))
    try:
        claim = Claim(application="nothing-here")
        state.ask(claim, block=True, timeout=ASK_TIMEOUT_S)
        started = time.perf_counter()
        for _ in range(asks):
            state.ask(claim, block=True, timeout=ASK_TIMEOUT_S)
        return (time.perf_counter() - started) / asks * 1e6
    finally:
        state.stop(timeout=ASK_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__ or "").parse_args(argv)
    results = {
        "machine_pairs_per_s": machine_pairs_per_s(in_flight=100_000, pairs=100_000),
        "actor_pairs_per_s": actor_pairs_per_s(
            in_flight=100_000, pairs=200_000, threads=4, batch=64
        ),
        "ask_rtt_us": ask_rtt_us(asks=5_000),
    }
    emit(results, arguments.json)
    return 0
