"""Benchmark of the gRPC front end: worker cycles per second, and the server's CPU per call,
against bare grpcio servers facing the same clients.

Run with `python -m loadtest grpc --json grpc.json`. Client processes each run coroutines on
one grpc.aio channel (as `loadtest e2e`'s workers do) that loop like a worker: GetTask when
they hold no task, then SetTaskStatus(COMPLETE, fetch_next_task) for the task held, whose
answer is the next task. A cycle is one task completed. Three servers face the same
clients, in interleaved rounds, in this process, so that this process's CPU time over a
run is the server's:

- ceiling (sync): a bare grpcio server with a thread pool whose handlers answer a canned
  task of the broker's size at once: what grpcio and the clients allow;
- ceiling (aio): the same on grpc.aio, one event loop;
- broker: `GrpcFrontend` over a `StateActor` preloaded with tasks.

The ratio that matters is the broker's CPU per completed task over a bare server's CPU per
call: what the broker adds to grpcio.
"""

from __future__ import annotations

import argparse
import asyncio
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
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import Ingest, Stats
from actors.records import KafkaOffset, Offset, Partition, Status
from actors.runtime import MailboxConfig
from actors.services import GET_TASK, SERVICE_NAME, SET_TASK_STATUS
from actors.state import StateActor, StateConfig
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc
from loadtest.report import machine

_APPLICATION = "loadtest"
_HOST = "127.0.0.1"
_TIMEOUT_S = 10.0
_CLIENT_START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class ClientPlan:
    port: int
    coroutines: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ClientResult:
    cycles: int
    rpcs: int
    errors: int


@dataclass(frozen=True, slots=True)
class Phase:
    """One server's run: throughput, and this process's CPU over it."""

    name: str
    cycles_per_s: float
    rpcs_per_s: float
    errors: int
    cpu_s: float
    cpu_us_per_rpc: float
    cpu_us_per_cycle: float


# --- Clients (each in its own process) -----------------------------------------------------


async def _worker_loop(
    stub: pb_grpc.ConsumerServiceStub, until: float, totals: Counter[str]
) -> None:
    held: pb.TaskActivation | None = None
    cycles = rpcs = errors = 0
    get_request = pb.GetTaskRequest(application=_APPLICATION)
    fetch_next = pb.FetchNextTask(application=_APPLICATION)
    while time.monotonic() < until:
        rpcs += 1
        try:
            if held is None:
                answer = await stub.GetTask(get_request, timeout=_TIMEOUT_S)  # type: ignore[misc]
                held = answer.task
                continue
            response = await stub.SetTaskStatus(  # type: ignore[misc]
                pb.SetTaskStatusRequest(
                    id=held.id,
                    status=pb.TASK_ACTIVATION_STATUS_COMPLETE,
                    fetch_next_task=fetch_next,
                ),
                timeout=_TIMEOUT_S,
            )
            cycles += 1
            held = response.task if response.HasField("task") else None
        except grpc.aio.AioRpcError:
            errors += 1
            held = None
    totals.update(cycles=cycles, rpcs=rpcs, errors=errors)


async def _run_client(plan: ClientPlan, ready: Any, go: EventType) -> ClientResult:
    async with grpc.aio.insecure_channel(f"{_HOST}:{plan.port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), _CLIENT_START_TIMEOUT_S)
        stub = pb_grpc.ConsumerServiceStub(channel)
        ready.put(True)
        await asyncio.to_thread(go.wait, _CLIENT_START_TIMEOUT_S)
        totals: Counter[str] = Counter()
        until = time.monotonic() + plan.seconds
        await asyncio.gather(*(_worker_loop(stub, until, totals) for _ in range(plan.coroutines)))
    return ClientResult(totals["cycles"], totals["rpcs"], totals["errors"])


def _client_process(plan: ClientPlan, ready: Any, go: EventType, results: Any) -> None:
    results.put(asyncio.run(_run_client(plan, ready, go)))


def run_clients(port: int, processes: int, coroutines: int, seconds: float) -> ClientResult:
    """Start the client processes, let them connect, then run them for `seconds` together."""
    # spawn, not fork: the parent runs grpc threads, and a forked grpc is not safe.
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    plan = ClientPlan(port, coroutines, seconds)
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


def _canned_handlers(answer: Callable[..., Any]) -> grpc.GenericRpcHandler:
    handlers = {
        GET_TASK: grpc.unary_unary_rpc_method_handler(answer),
        SET_TASK_STATUS: grpc.unary_unary_rpc_method_handler(answer),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


@contextmanager
def sync_ceiling_server(max_workers: int) -> Iterator[int]:
    """A bare grpcio server: the same methods answer a canned task of the broker's size."""
    canned = get_task_response_bytes(_activation(0))

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return canned

    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers),
        handlers=[_canned_handlers(answer)],
        options=[("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port(f"{_HOST}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(_TIMEOUT_S)


@contextmanager
def aio_ceiling_server() -> Iterator[int]:
    """The canned answers on grpc.aio, its loop in a thread of its own (as the broker's)."""
    canned = get_task_response_bytes(_activation(0))

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return canned

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="aio-ceiling", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            handlers=[_canned_handlers(answer)], options=[("grpc.so_reuseport", 0)]
        )
        port = server.add_insecure_port(f"{_HOST}:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(_TIMEOUT_S)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_TIMEOUT_S)
        loop.close()


@contextmanager
def broker(tasks: int) -> Iterator[tuple[int, pykka.ActorRef[Any]]]:
    """A state actor preloaded with `tasks` activations and a front end over it."""
    state = StateActor.start(StateConfig(), MailboxConfig(size=100_000))
    try:
        now = time.time()
        records = tuple(
            decode_record(_activation(i), 0, i, now, max_delay_s=3600) for i in range(tasks)
        )
        state.tell(Ingest(records, (KafkaOffset(Partition(0), Offset(tasks - 1)),)))
        config = FrontendConfig(host=_HOST, port=0)
        frontend = GrpcFrontend.start(config, state)
        port: int = frontend.proxy().port.get(timeout=_TIMEOUT_S)
        yield port, state
    finally:
        pykka.ActorRegistry.stop_all(timeout=_TIMEOUT_S)


def _measured(name: str, port: int, args: argparse.Namespace) -> Phase:
    cpu_before = time.process_time()
    result = run_clients(port, args.processes, args.coroutines, args.seconds)
    cpu_s = time.process_time() - cpu_before
    return Phase(
        name=name,
        cycles_per_s=round(result.cycles / args.seconds, 1),
        rpcs_per_s=round(result.rpcs / args.seconds, 1),
        errors=result.errors,
        cpu_s=round(cpu_s, 3),
        cpu_us_per_rpc=round(cpu_s * 1e6 / max(result.rpcs, 1), 1),
        cpu_us_per_cycle=round(cpu_s * 1e6 / max(result.cycles, 1), 1),
    )


def measure_sync_ceiling(args: argparse.Namespace) -> Phase:
    with sync_ceiling_server(args.max_workers) as port:
        return _measured("ceiling (grpcio sync)", port, args)


def measure_aio_ceiling(args: argparse.Namespace) -> Phase:
    with aio_ceiling_server() as port:
        return _measured("ceiling (grpc.aio)", port, args)


def measure_broker(args: argparse.Namespace) -> Phase:
    with broker(args.tasks) as (port, state):
        phase = _measured("broker", port, args)
        stats = state.ask(Stats(), block=True, timeout=_TIMEOUT_S)
    if not stats.by_status.get(Status.PENDING):
        print(f"  warning: all {args.tasks} tasks were used up; raise --tasks", flush=True)
    return phase


def summarize(phases: dict[str, list[Phase]]) -> dict[str, Any]:
    """Medians per server, and the broker's CPU per task over each bare server's per call."""
    medians = {
        name: {
            "cycles_per_s": statistics.median(p.cycles_per_s for p in runs),
            "cpu_us_per_rpc": statistics.median(p.cpu_us_per_rpc for p in runs),
            "cpu_us_per_cycle": statistics.median(p.cpu_us_per_cycle for p in runs),
        }
        for name, runs in phases.items()
    }
    broker_cpu = medians["broker"]["cpu_us_per_cycle"]
    broker_rate = medians["broker"]["cycles_per_s"]
    return {
        "medians": medians,
        "cpu_ratio_to_sync": round(broker_cpu / medians["sync"]["cpu_us_per_rpc"], 3),
        "cpu_ratio_to_aio": round(broker_cpu / medians["aio"]["cpu_us_per_rpc"], 3),
        "rate_ratio_to_sync": round(broker_rate / medians["sync"]["cycles_per_s"], 3),
        "rate_ratio_to_aio": round(broker_rate / medians["aio"]["cycles_per_s"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest grpc", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument(
        "--coroutines", type=int, default=64, help="worker coroutines per client process"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per server")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every server; medians")
    parser.add_argument("--tasks", type=int, default=60_000, help="tasks preloaded per broker")
    parser.add_argument(
        "--max-workers", type=int, default=16, help="threads of the sync ceiling server"
    )
    args = parser.parse_args(argv)

    print(
        f"{args.processes} client processes x {args.coroutines} coroutines, {args.rounds} "
        f"rounds of {args.seconds:.0f} s per server; CPU is this process's, the server's",
        flush=True,
    )
    runs: dict[str, Callable[[argparse.Namespace], Phase]] = {
        "sync": measure_sync_ceiling,
        "aio": measure_aio_ceiling,
        "broker": measure_broker,
    }
    # Interleaved rounds, so that a neighbour's load on the machine hits all three alike.
    phases: dict[str, list[Phase]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            phase = run(args)
            phases[name].append(phase)
            print(
                f"{phase.name:24} {phase.cycles_per_s:8.0f} cycles/s {phase.rpcs_per_s:8.0f} "
                f"rpcs/s  {phase.cpu_us_per_rpc:6.0f} us CPU/rpc  "
                f"{phase.cpu_us_per_cycle:6.0f} us CPU/cycle  errors {phase.errors}",
                flush=True,
            )
    summary = summarize(phases)
    print(
        f"broker CPU per task / bare CPU per call: {summary['cpu_ratio_to_sync']:.2f}x sync, "
        f"{summary['cpu_ratio_to_aio']:.2f}x aio; broker tasks/s / bare calls/s: "
        f"{summary['rate_ratio_to_sync']:.2f} sync, {summary['rate_ratio_to_aio']:.2f} aio"
    )
    report = {
        **summary,
        "processes": args.processes,
        "coroutines_per_process": args.coroutines,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "phases": {name: [asdict(p) for p in runs_of] for name, runs_of in phases.items()},
        "machine": machine(),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(p.errors == 0 for runs_of in phases.values() for p in runs_of) else 1


if __name__ == "__main__":
    sys.exit(main())
