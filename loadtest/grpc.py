"""Benchmark of the gRPC front end: worker cycles per second against a bare grpcio ceiling.

Run with `python -m loadtest grpc --json grpc.json`. Client processes each run threads that
loop like a worker: GetTask when they hold no task, then SetTaskStatus(COMPLETE,
fetch_next_task) for the task held, whose answer is the next task. A cycle is one task
completed. Three servers face the same clients in one run:

- ceiling: a bare grpcio server with the same thread pool whose handlers answer a canned
  task at once, so its cycles per second are what grpcio and the clients allow;
- broker with coalescing: `GrpcFrontend` over a `StateActor` preloaded with tasks;
- broker without coalescing: one state ask per call.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import grpc
import pykka

from actors.activation import decode_record, encode_activation, get_task_response_bytes
from actors.frontend import (
    GET_TASK,
    SERVICE_NAME,
    SET_TASK_STATUS,
    FrontendConfig,
    GrpcFrontend,
)
from actors.messages import Ingest, Stats
from actors.records import KafkaOffset, Offset, Partition, Status
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc

_APPLICATION = "loadtest"
_HOST = "127.0.0.1"
_TIMEOUT_S = 10.0
_CLIENT_START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class ClientPlan:
    port: int
    threads: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ClientResult:
    cycles: int
    rpcs: int
    errors: int


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    cycles_per_s: float
    rpcs_per_s: float
    errors: int
    mean_batch: dict[str, float]


# --- Clients (each in its own process) -----------------------------------------------------


def _worker_loop(stub: pb_grpc.ConsumerServiceStub, until: float, totals: Counter[str]) -> None:
    held: pb.TaskActivation | None = None
    cycles = rpcs = errors = 0
    get_request = pb.GetTaskRequest(application=_APPLICATION)
    fetch_next = pb.FetchNextTask(application=_APPLICATION)
    while time.monotonic() < until:
        try:
            rpcs += 1
            if held is None:
                held = stub.GetTask(get_request, timeout=_TIMEOUT_S).task
                continue
            response = stub.SetTaskStatus(
                pb.SetTaskStatusRequest(
                    id=held.id,
                    status=pb.TASK_ACTIVATION_STATUS_COMPLETE,
                    fetch_next_task=fetch_next,
                ),
                timeout=_TIMEOUT_S,
            )
            cycles += 1
            held = response.task if response.HasField("task") else None
        except grpc.RpcError:
            errors += 1
            held = None
    totals.update(cycles=cycles, rpcs=rpcs, errors=errors)


def _client_process(plan: ClientPlan, ready: Any, go: EventType, results: Any) -> None:
    channel = grpc.insecure_channel(f"{_HOST}:{plan.port}")
    grpc.channel_ready_future(channel).result(timeout=_CLIENT_START_TIMEOUT_S)
    stub = pb_grpc.ConsumerServiceStub(channel)
    ready.put(True)
    go.wait(_CLIENT_START_TIMEOUT_S)
    totals: Counter[str] = Counter()
    until = time.monotonic() + plan.seconds
    threads = [
        threading.Thread(target=_worker_loop, args=(stub, until, totals))
        for _ in range(plan.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(plan.seconds + _TIMEOUT_S)
    channel.close()
    results.put(ClientResult(totals["cycles"], totals["rpcs"], totals["errors"]))


def run_clients(port: int, processes: int, threads: int, seconds: float) -> ClientResult:
    """Start the client processes, let them connect, then run them for `seconds` together."""
    # spawn, not fork: the parent runs grpc threads, and a forked grpc is not safe.
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    plan = ClientPlan(port, threads, seconds)
    workers = [
        context.Process(target=_client_process, args=(plan, ready, go, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=_CLIENT_START_TIMEOUT_S)
        go.set()
        collected = [results.get(timeout=seconds + 2 * _TIMEOUT_S) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=_TIMEOUT_S)
            if worker.is_alive():
                worker.kill()
    return ClientResult(
        cycles=sum(r.cycles for r in collected),
        rpcs=sum(r.rpcs for r in collected),
        errors=sum(r.errors for r in collected),
    )


# --- Servers ---------------------------------------------------------------------------------


def _activation(index: int) -> bytes:
    return encode_activation(
        activation_id=f"loadtest-{index:09d}",
        application=_APPLICATION,
        namespace="default",
        taskname="loadtest.noop",
        kwargs={"payload": "x" * 256},
        processing_deadline_duration_s=600,
    )


@contextmanager
def ceiling_server(max_workers: int) -> Iterator[int]:
    """A bare grpcio server: the same methods answer a canned task of the broker's size."""
    canned = get_task_response_bytes(_activation(0))

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return canned

    handlers = {
        GET_TASK: grpc.unary_unary_rpc_method_handler(answer),
        SET_TASK_STATUS: grpc.unary_unary_rpc_method_handler(answer),
    }
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers),
        handlers=[grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)],
        options=[("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port(f"{_HOST}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(_TIMEOUT_S)


class BatchCounter:
    """A FrontendObserver that keeps the sizes of coalesced batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sizes: dict[str, list[int]] = {"claim": [], "conclude": []}

    def handled(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        pass

    def batch_sent(self, kind: str, size: int) -> None:
        with self._lock:
            self.sizes[kind].append(size)

    def means(self) -> dict[str, float]:
        with self._lock:
            return {
                kind: round(statistics.fmean(sizes), 2)
                for kind, sizes in self.sizes.items()
                if sizes
            }


@contextmanager
def broker(
    tasks: int, max_workers: int, *, coalesce: bool, observer: BatchCounter
) -> Iterator[tuple[int, pykka.ActorRef[Any]]]:
    """A state actor preloaded with `tasks` activations and a front end over it."""
    state = StateActor.start(StateConfig(), MailboxConfig(size=100_000))
    try:
        now = time.time()
        records = tuple(
            decode_record(_activation(i), 0, i, now, max_delay_s=3600) for i in range(tasks)
        )
        state.tell(Ingest(records, (KafkaOffset(Partition(0), Offset(tasks - 1)),)))
        config = FrontendConfig(host=_HOST, port=0, max_workers=max_workers, coalesce=coalesce)
        frontend = GrpcFrontend.start(config, state, observer=observer)
        port: int = frontend.proxy().port.get(timeout=_TIMEOUT_S)
        yield port, state
    finally:
        pykka.ActorRegistry.stop_all(timeout=_TIMEOUT_S)


def _phase(name: str, result: ClientResult, seconds: float, mean_batch: dict[str, float]) -> Phase:
    return Phase(
        name=name,
        cycles_per_s=round(result.cycles / seconds, 1),
        rpcs_per_s=round(result.rpcs / seconds, 1),
        errors=result.errors,
        mean_batch=mean_batch,
    )


def measure_broker(args: argparse.Namespace, *, coalesce: bool) -> Phase:
    counter = BatchCounter()
    with broker(args.tasks, args.max_workers, coalesce=coalesce, observer=counter) as (port, state):
        result = run_clients(port, args.processes, args.threads, args.seconds)
        stats = state.ask(Stats(), block=True, timeout=_TIMEOUT_S)
        if not stats.by_status.get(Status.PENDING):
            print(f"  warning: all {args.tasks} tasks were used up; raise --tasks", flush=True)
    name = "broker (coalescing)" if coalesce else "broker (one ask per call)"
    return _phase(name, result, args.seconds, counter.means())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest grpc", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="worker threads per process")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per server")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of all three servers; medians reported"
    )
    parser.add_argument("--tasks", type=int, default=40_000, help="tasks preloaded per broker")
    parser.add_argument("--max-workers", type=int, default=FrontendConfig().max_workers)
    args = parser.parse_args(argv)

    print(
        f"{args.processes} client processes x {args.threads} threads, {args.rounds} rounds of "
        f"{args.seconds:.0f} s per server, {args.max_workers} server threads",
        flush=True,
    )
    runs: dict[str, Callable[[], Phase]] = {
        "ceiling": lambda: measure_ceiling(args),
        "coalescing": lambda: measure_broker(args, coalesce=True),
        "direct": lambda: measure_broker(args, coalesce=False),
    }
    # Interleaved rounds, so that a neighbour's load on the machine hits all three alike.
    phases: dict[str, list[Phase]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            phase = run()
            phases[name].append(phase)
            batches = f"  mean batch {phase.mean_batch}" if phase.mean_batch else ""
            print(
                f"{phase.name:28} {phase.cycles_per_s:9.0f} cycles/s "
                f"{phase.rpcs_per_s:9.0f} rpcs/s  errors {phase.errors}{batches}",
                flush=True,
            )
    median = {
        name: statistics.median(p.cycles_per_s for p in runs_of) for name, runs_of in phases.items()
    }
    default = "coalescing" if FrontendConfig().coalesce else "direct"
    report = {
        "cycles_per_s": median[default],
        "ceiling_per_s": median["ceiling"],
        "fraction_of_ceiling": round(median[default] / median["ceiling"], 3),
        "default_mode": default,
        "cycles_per_s_coalescing": median["coalescing"],
        "cycles_per_s_direct": median["direct"],
        "fraction_of_ceiling_coalescing": round(median["coalescing"] / median["ceiling"], 3),
        "fraction_of_ceiling_direct": round(median["direct"] / median["ceiling"], 3),
        "processes": args.processes,
        "threads_per_process": args.threads,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "max_workers": args.max_workers,
        "phases": {name: [asdict(p) for p in runs_of] for name, runs_of in phases.items()},
    }
    print(
        f"medians: ceiling {median['ceiling']:.0f}, coalescing {median['coalescing']:.0f} "
        f"({report['fraction_of_ceiling_coalescing']:.0%}), direct {median['direct']:.0f} "
        f"({report['fraction_of_ceiling_direct']:.0%}) cycles/s; the default is {default}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def measure_ceiling(args: argparse.Namespace) -> Phase:
    with ceiling_server(args.max_workers) as port:
        result = run_clients(port, args.processes, args.threads, args.seconds)
    return _phase("ceiling (bare grpcio)", result, args.seconds, {})


if __name__ == "__main__":
    sys.exit(main())
