"""`loadtest e2e --brokers N`: how a simulated worker goes round several brokers, how
completions are attributed to them, when a group counts as settled and a broker as
drained, without processes; then one short real run of two brokers in one group."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from actors.embedded_kafka import EmbeddedKafka
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as pb
from loadtest import e2e
from loadtest.cluster import assignment_settled, held_activations
from loadtest.rotation import Held, Rotation
from loadtest.workers import Tally, UnaryWorkers, WorkerPlan, WorkerReport


def _held(target: str, *ids: str) -> Held:
    return Held(target, tuple(pb.TaskActivation(id=task_id) for task_id in ids))


# --- the rotation ------------------------------------------------------------------------------


def test_workers_start_spread_and_move_on_in_order_when_a_broker_is_empty() -> None:
    targets = ("a", "b", "c")
    assert [Rotation(targets, k).next_call(0.0)[0] for k in range(5)] == ["a", "b", "c", "a", "b"]
    rotation = Rotation(targets, 1)
    rotation.empty("b")
    assert rotation.next_call(0.0) == ("c", None)
    rotation.empty("a")  # not the one it asks: an old answer does not move it
    assert rotation.next_call(0.0) == ("c", None)
    rotation.empty("c")
    assert rotation.next_call(0.0) == ("a", None)


def test_an_unavailable_broker_is_passed_over_until_its_pause_ends() -> None:
    rotation = Rotation(("a", "b"), 0, pause_s=1.0)
    rotation.unavailable("a", now=10.0)
    assert rotation.next_call(10.1) == ("b", None)
    rotation.empty("b")  # back to a, which is still paused: b again
    assert rotation.next_call(10.5) == ("b", None)
    rotation.empty("b")
    assert rotation.next_call(11.0) == ("a", None)


def test_with_every_broker_paused_the_worker_asks_the_one_it_is_at() -> None:
    rotation = Rotation(("a", "b"), 0, pause_s=1.0)
    rotation.unavailable("a", now=0.0)
    rotation.unavailable("b", now=0.0)
    assert rotation.next_call(0.5) == ("a", None)


def test_parked_results_go_back_to_their_broker_once_its_pause_is_over() -> None:
    rotation = Rotation(("a", "b"), 0, pause_s=1.0)
    parked = _held("a", "t1")
    rotation.unavailable("a", now=0.0)
    rotation.park(parked)
    assert rotation.next_call(0.5) == ("b", None)
    assert rotation.parked == 1
    assert rotation.next_call(1.0) == ("a", parked)
    assert rotation.parked == 0
    assert "0 parked" in repr(rotation)


def test_a_rotation_needs_a_broker() -> None:
    with pytest.raises(ValueError, match="at least one target"):
        Rotation((), 0)


# --- a unary worker over two brokers ----------------------------------------------------------


class _ScriptedConsumerService:
    """ConsumerService stand-ins behind one channel per target: each call takes the next
    answer of the script (a task id, None for an answer without a task, or a status code)
    and is recorded as (target, method, reported task id, whether it asked for another)."""

    def __init__(self, script: list[str | grpc.StatusCode | None]) -> None:
        self._script = script
        self.calls: list[tuple[str, str, str, bool]] = []

    def channel(self, target: str) -> Any:
        service = self

        class _Channel:
            def unary_unary(self, path: str, **_: Any) -> Any:
                method = path.rsplit("/", 1)[1]

                async def call(request: Any, timeout: float) -> Any:
                    if method == "GetTask":
                        service.calls.append((target, method, "", True))
                    else:
                        asks = request.HasField("fetch_next_task")
                        service.calls.append((target, method, request.id, asks))
                    answer = service._script.pop(0)
                    if isinstance(answer, grpc.StatusCode):
                        raise grpc.aio.AioRpcError(answer, grpc.aio.Metadata(), grpc.aio.Metadata())
                    task = pb.TaskActivation(id=answer) if answer is not None else None
                    if method == "GetTask":
                        return pb.GetTaskResponse(task=task)
                    return pb.SetTaskStatusResponse(task=task)

                return call

        return _Channel()


def test_a_unary_worker_reports_to_the_broker_that_handed_out_the_task() -> None:
    service = _ScriptedConsumerService(
        [
            grpc.StatusCode.NOT_FOUND,  # a has nothing pending: move on to b
            "t1",
            grpc.StatusCode.UNAVAILABLE,  # b dies with t1's result: parked, b paused
            None,  # b is back: it takes the parked result
            "t2",  # a, where the worker went on to
            None,  # a takes t2's result and has nothing next: move on
            "t3",
            None,
        ]
    )
    channels = {target: service.channel(target) for target in ("a", "b")}
    plan = WorkerPlan(("a", "b"), 1, 0.0, 0.0, UnaryWorkers())
    # No pause, so that b's parked result is due at the first step after it failed.
    worker: Any = UnaryWorkers().worker(channels, Rotation(("a", "b"), 0, pause_s=0.0), plan)

    async def steps() -> None:
        held: Held | None = None
        for _ in range(8):
            held = await worker.step(held)

    asyncio.run(steps())
    assert service.calls == [
        ("a", "GetTask", "", True),
        ("b", "GetTask", "", True),
        ("b", "SetTaskStatus", "t1", True),
        ("b", "SetTaskStatus", "t1", False),  # a parked result asks for nothing more
        ("a", "GetTask", "", True),
        ("a", "SetTaskStatus", "t2", True),
        ("b", "GetTask", "", True),
        ("b", "SetTaskStatus", "t3", True),
    ]
    report = worker.tally.report
    assert report.completed == ["t1", "t2", "t3"]
    assert report.completed_by_target == {"b": 2, "a": 1}
    assert report.received_from == ["b", "a", "b"]
    assert (dict(report.errors), report.empty_polls) == ({"UNAVAILABLE": 1}, 1)


def test_duplicates_are_told_apart_by_the_broker_they_came_from() -> None:
    report = WorkerReport(
        received=["t1", "t2", "t1", "t3", "t3", "t3", "t4"],
        received_from=["a", "a", "a", "a", "b", "b", "b"],
    )
    # t1 twice from a; t3 from a, then twice from b: one more from a's, one from another.
    assert e2e.duplicates_by_source(report) == {"same_broker": 2, "across_brokers": 1}
    assert e2e.duplicates_by_source(WorkerReport()) == {"same_broker": 0, "across_brokers": 0}


def test_completions_are_attributed_to_the_broker_that_acknowledged_them() -> None:
    tally = Tally(("SetTaskStatus",))
    tally.completed(["x"], 1.0, "a")
    tally.completed(["y", "z"], 1.0, "b")
    other = WorkerReport()
    other.completed_by_target.update({"b": 3})
    tally.report.merge(other)
    assert tally.report.completed_by_target == {"a": 1, "b": 5}


# --- the cluster ---------------------------------------------------------------------------------


def test_a_group_is_settled_when_every_partition_is_held_once_and_no_broker_is_idle() -> None:
    assert assignment_settled([2, 2], 4)
    assert assignment_settled([1, 1, 1, 1], 4)
    assert not assignment_settled([4, 0], 4)  # before a rebalance takes partitions away
    assert not assignment_settled([0, 2], 4)  # mid-rebalance
    assert not assignment_settled([0, 0], 4)
    assert assignment_settled([1, 1, 0], 2)  # more brokers than partitions: some get none


def test_a_broker_holds_what_is_pending_or_processing() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("taskbroker_state_activations", "held", ["status"], registry=registry)
    gauge.labels("pending").set(3)
    gauge.labels("processing").set(2)
    gauge.labels("delay").set(7)
    assert held_activations(generate_latest(registry).decode()) == 5
    assert held_activations("") == 0


def test_the_phase_s_tasks_are_produced_in_chunks_of_consecutive_ids() -> None:
    ids = [str(n) for n in range(10)]
    assert e2e.chunked(ids, 4) == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9"]]
    assert e2e.chunked(ids[:2], 20) == [["0"], ["1"]]
    assert e2e.partitions_for(1) == e2e.partitions_for(4) == 4
    assert e2e.partitions_for(6) == 6


def test_broker_counts_and_the_options_they_go_with(capsys: pytest.CaptureFixture[str]) -> None:
    assert e2e.broker_counts("1,2,4") == [1, 2, 4]
    for bad in (["--brokers", "0"], ["--brokers", "two"], ["--kill-one-at", "5"]):
        with pytest.raises(SystemExit):
            e2e.main(bad)
    with pytest.raises(SystemExit):
        e2e.main(["--brokers", "1,2", "--kill-one-at", "5"])  # one broker cannot lose one
    assert "--kill-one-at needs --brokers of 2 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        e2e.main(["--brokers", "2", "--delivery", "push"])


def _brokers_result(**changes: Any) -> dict[str, Any]:
    """The keys of a multi-broker result that its line and its verdict read."""
    per_broker = [
        {"index": i, "completed": 500, "cpu_percent": 90.0, "cpu_us_per_task": 400.0}
        for i in range(2)
    ]
    return {
        "brokers": 2,
        "partitions": 4,
        "store_mode": "memory",
        "protocol": "unary",
        "batch": 1,
        "workers": 256,
        "tasks_per_s": 2500.0,
        "per_broker": per_broker,
        "kafka_cpu": {"cpu_percent": 12.0},
        "workers_cpu": {"cpu_percent": 80.0},
        "lost": 0,
        "duplicates": 0,
        "unexpected": 0,
        "errors": 0,
        **changes,
    }


def test_a_brokers_line_shows_each_broker_and_the_restart() -> None:
    line = e2e.brokers_line(_brokers_result())
    assert "2 brokers (4 partitions), memory, unary, 256 workers: 2,500 tasks/s" in line
    assert "broker 1: 500 tasks, 90% CPU, 400 µs/task" in line
    assert line.endswith("0 lost, 0 duplicates, 0 errors")
    timeline = {
        "broker": 1,
        "killed_at_s": 5.0,
        "taken_over_at_s": 14.2,
        "back_at_s": 17.0,
        "held_when_back": 40,
        "drained_at_s": None,
    }
    sources = {"same_broker": 2, "across_brokers": 5}
    line = e2e.brokers_line(
        _brokers_result(kill_one=timeline, duplicates=7, duplicates_by_source=sources)
    )
    assert "7 duplicates (2 from the same broker, 5 from another), 0 errors" in line
    assert line.endswith("broker 1 killed at 5.0 s, taken over 14.2 s, back 17.0 s, drained - s")


def test_duplicates_are_accepted_only_where_a_broker_was_killed() -> None:
    assert e2e.accounted(_brokers_result())
    assert not e2e.accounted(_brokers_result(duplicates=3))
    assert e2e.accounted(_brokers_result(duplicates=3, kill_one={}))
    assert not e2e.accounted(_brokers_result(lost=1, kill_one={}))


# --- a real run ---------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_two_brokers_in_one_group_complete_every_task_once(
    kafka: EmbeddedKafka, tmp_path: Path
) -> None:
    result_path = tmp_path / "brokers.json"
    exit_code = e2e.main(
        [
            "--brokers",
            "2",
            "--tasks",
            "600",
            "--workers",
            "16",
            "--processes",
            "1",
            "--kafka",
            kafka.bootstrap,
            "--json",
            str(result_path),
        ]
    )
    assert exit_code == 0
    (run,) = json.loads(result_path.read_text())["runs"]
    assert (run["brokers"], run["partitions"]) == (2, 4)
    assert (run["completed"], run["lost"], run["duplicates"]) == (600, 0, 0)
    assert [b["partitions_at_start"] for b in run["per_broker"]] == [2, 2]
    # Keyed produces spread the tasks, and the workers take them from both brokers.
    assert all(b["completed"] > 0 for b in run["per_broker"])
    assert sum(b["completed"] for b in run["per_broker"]) == 600
    assert all(b["cpu_us_per_task"] > 0 for b in run["per_broker"])
