"""Several brokers in one consumer group on one topic, for `loadtest e2e --brokers N`.

Each broker is its own `taskbroker run` with its own database file, gRPC port and metrics
port (a `BrokerSlot`). The topic exists before any of them starts; they start together,
and the cluster is ready once every one is SERVING and the group has settled: every
partition assigned, each broker holding some. One broker can be SIGKILLed and started
again on the same file and ports, as a StatefulSet restarts a pod on its volume;
`KillOne` does that in the middle of a phase and records when each step happened.

A broker's CPU is summed over its lives, read from /proc just before it is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from actors.embedded_kafka import free_port
from loadtest.broker import (
    HOST,
    BrokerSetup,
    cpu_seconds,
    create_topics,
    launch_broker,
    memory_mb,
    start_broker,
    stop_group,
    wait_serving,
)
from loadtest.exposition import samples_by_label, scrape

ASSIGNED = "taskbroker_kafka_assigned_partitions"
ACTIVATIONS = "taskbroker_state_activations"
_SETTLE_TIMEOUT_S = 90.0
_POLL_S = 0.25
_KILL_WAIT_S = 10.0
_KAFKA_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class BrokerSlot:
    """One broker's place in the cluster, kept across a restart: its ports and the
    directory of its database file and log."""

    index: int
    grpc_port: int
    metrics_port: int
    workdir: Path

    @property
    def target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"


def assignment_settled(assigned: Sequence[int], partitions: int) -> bool:
    """Whether the brokers' partition counts show a settled group: every partition held
    once, and each broker holding some when there are enough to go round. Mid-rebalance
    the sum falls short, since an eager rebalance takes every partition away first."""
    if sum(assigned) != partitions:
        return False
    return len(assigned) > partitions or all(count > 0 for count in assigned)


def held_activations(exposition: str) -> int:
    """Activations a broker still has to hand out or hear back about."""
    by_status = samples_by_label(exposition, ACTIVATIONS, "status")
    return int(by_status.get("pending", 0.0) + by_status.get("processing", 0.0))


class Cluster:
    """N brokers on `topic`, one consumer group named after it."""

    def __init__(
        self, setup: BrokerSetup, bootstrap: str, topic: str, partitions: int, workdir: Path
    ) -> None:
        self.setup = setup
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self._workdir = workdir
        self.slots: list[BrokerSlot] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._spent_s: list[float] = []
        """CPU of each broker's earlier lives."""
        self._offsets: Consumer | None = None

    def __repr__(self) -> str:
        return f"<Cluster of {len(self.slots)} on {self.topic} ({self.partitions} partitions)>"

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(slot.target for slot in self.slots)

    def start(self, count: int) -> None:
        """Launch `count` brokers together, then wait for each to be SERVING.

        Raises RuntimeError when one exits or is not SERVING in time.
        """
        for index in range(count):
            workdir = self._workdir / f"broker-{index}"
            workdir.mkdir()
            slot = BrokerSlot(index, free_port(HOST), free_port(HOST), workdir)
            self.slots.append(slot)
            self._processes.append(self._launch(slot))
            self._spent_s.append(0.0)
        for slot, process in zip(self.slots, self._processes, strict=True):
            wait_serving(slot.target, process, slot.workdir / "broker.log")

    def wait_settled(self, timeout_s: float = _SETTLE_TIMEOUT_S) -> list[int]:
        """The partitions each broker holds, once the group has settled (seen twice in a
        row, a poll apart).

        Raises TimeoutError when it has not settled in `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        previous: list[int] | None = None
        while time.monotonic() < deadline:
            assigned = self.assigned(range(len(self.slots)))
            if assignment_settled(assigned, self.partitions) and assigned == previous:
                return assigned
            previous = assigned
            time.sleep(_POLL_S)
        raise TimeoutError(f"{self!r}: the group had not settled in {timeout_s} s: {previous}")

    def assigned(self, indexes: Iterable[int]) -> list[int]:
        """The partitions each of the brokers `indexes` holds, from its /metrics."""
        return [
            int(sum(samples_by_label(scrape(self.slots[i].metrics_url), ASSIGNED, "").values()))
            for i in indexes
        ]

    def held(self, index: int) -> int:
        return held_activations(scrape(self.slots[index].metrics_url))

    def idle(self) -> bool:
        """Every broker alive holds nothing pending or processing."""
        return all(
            self.held(slot.index) == 0
            for slot, process in zip(self.slots, self._processes, strict=True)
            if process.poll() is None
        )

    def caught_up(self) -> bool:
        """The group has committed every partition to its end: every message produced so
        far is durable in some broker's file."""
        if self._offsets is None:
            self._offsets = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.topic})
        wanted = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        committed = self._offsets.committed(wanted, timeout=_KAFKA_TIMEOUT_S)
        for found in committed:
            _, high = self._offsets.get_watermark_offsets(found, timeout=_KAFKA_TIMEOUT_S)
            if found.offset < high:
                return False
        return True

    def cpu_s(self, index: int) -> float:
        """The broker's CPU over all its lives so far."""
        process = self._processes[index]
        alive = cpu_seconds(process.pid) if process.poll() is None else 0.0
        return self._spent_s[index] + alive

    def memory(self, index: int) -> dict[str, float]:
        """The broker's memory now; nothing for one that is not running."""
        process = self._processes[index]
        return memory_mb(process.pid) if process.poll() is None else {}

    def kill(self, index: int) -> None:
        """SIGKILL the broker and its process group, as an OOM kill or a lost node would."""
        process = self._processes[index]
        self._spent_s[index] += cpu_seconds(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(_KILL_WAIT_S)

    def restart(self, index: int) -> None:
        """Start the broker again on its own file and ports, once it is SERVING.

        Raises RuntimeError when it exits or is not SERVING in time.
        """
        slot = self.slots[index]
        self._processes[index] = start_broker(
            self._setup_of(slot), self.bootstrap, self.topic, slot.grpc_port, slot.workdir
        )

    def stop(self) -> None:
        """Stop every broker, the last started first."""
        for process in reversed(self._processes):
            stop_group(process)
        if self._offsets is not None:
            self._offsets.close()

    def _setup_of(self, slot: BrokerSlot) -> BrokerSetup:
        return replace(self.setup, metrics_port=slot.metrics_port)

    def _launch(self, slot: BrokerSlot) -> subprocess.Popen[bytes]:
        return launch_broker(
            self._setup_of(slot), self.bootstrap, self.topic, slot.grpc_port, slot.workdir
        )


@contextmanager
def running_cluster(
    setup: BrokerSetup, bootstrap: str, topic: str, count: int, partitions: int
) -> Iterator[Cluster]:
    """`count` SERVING brokers on a new topic of `partitions` (`Cluster.wait_settled` waits
    for their group); all stopped on the way out."""
    create_topics(bootstrap, topic, partitions)
    with tempfile.TemporaryDirectory(prefix="loadtest-cluster-") as workdir:
        cluster = Cluster(setup, bootstrap, topic, partitions, Path(workdir))
        try:
            cluster.start(count)
            yield cluster
        finally:
            cluster.stop()


# --- a broker killed in the middle of a phase -----------------------------------------------


class Background:
    """A function on a thread of its own, for the length of a phase; `join` re-raises
    what it raised."""

    def __init__(self, name: str, run: Callable[[threading.Event], None]) -> None:
        self.stop = threading.Event()
        self._run = run
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def __repr__(self) -> str:
        return f"<Background {self._thread.name} alive={self._thread.is_alive()}>"

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Ask it to stop and wait; re-raise what it raised."""
        self.stop.set()
        self._thread.join(timeout_s)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            self._run(self.stop)
        except BaseException as error:  # handed to join, in the thread that runs the phase
            self._error = error


@dataclass(slots=True)
class RestartTimeline:
    """When each step of a kill and restart happened, in seconds from the phase start."""

    broker: int
    killed_at_s: float | None = None
    taken_over_at_s: float | None = None
    """The survivors held every partition: the group had dropped the dead broker."""
    back_at_s: float | None = None
    """The restarted broker was SERVING again, on its own file and ports."""
    held_when_back: int | None = None
    """Activations pending or processing it had restored (and ingested since) then."""
    drained_at_s: float | None = None
    """It held nothing pending or processing, for the first time since it came back."""


class KillOne:
    """SIGKILL one broker `at_s` into a phase; start it again once the survivors hold its
    partitions (the session timeout and a rebalance later), or after three session
    timeouts at most; then watch it until it has drained."""

    def __init__(self, cluster: Cluster, index: int, at_s: float) -> None:
        self._cluster = cluster
        self._index = index
        self._at_s = at_s
        self._takeover_limit_s = 3 * cluster.setup.session_timeout_ms / 1000
        self.timeline = RestartTimeline(index)
        self._started = 0.0

    def __repr__(self) -> str:
        return f"<KillOne broker {self._index} at {self._at_s} s: {self.timeline}>"

    def __call__(self, stop: threading.Event) -> None:
        """The phase started now; until `stop` or the broker has drained."""
        self._started = time.monotonic()
        if stop.wait(self._at_s):
            return
        self._cluster.kill(self._index)
        self.timeline.killed_at_s = self._elapsed()
        survivors = [i for i in range(len(self._cluster.slots)) if i != self._index]
        limit = time.monotonic() + self._takeover_limit_s
        while time.monotonic() < limit:
            if assignment_settled(self._cluster.assigned(survivors), self._cluster.partitions):
                self.timeline.taken_over_at_s = self._elapsed()
                break
            if stop.wait(_POLL_S):
                return
        self._cluster.restart(self._index)
        self.timeline.back_at_s = self._elapsed()
        self.timeline.held_when_back = self._cluster.held(self._index)
        while self._cluster.held(self._index) > 0:
            if stop.wait(_POLL_S):
                return
        self.timeline.drained_at_s = self._elapsed()

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._started, 2)
