"""A `taskbroker run` process under test: its configuration, its start (until SERVING) and
stop, and its CPU and memory read from /proc. `loadtest e2e` runs one; `loadtest.cluster`
runs several in one consumer group, and restarts one on its own file and ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from actors.embedded_kafka import free_port
from actors.wire.grpc.health.v1 import health_pb2, health_pb2_grpc
from loadtest.producer import APPLICATION

HOST = "127.0.0.1"
_READY_TIMEOUT_S = 90.0
_STOP_GRACE_S = 30.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class BrokerSetup:
    """How the broker under test is configured; one broker process serves several phases."""

    store_mode: str = "memory"
    commit_delay_ms: int = 0
    grpc_max_workers: int | None = None
    """Broker handler threads; None keeps the broker's default."""
    max_tasks: int = 20_000
    max_workers: int = 768
    """The largest phase, so that no `max_*_count` limit pauses ingest during a run."""
    metrics_port: int = 0
    """The broker's /metrics port on 127.0.0.1; 0: off. Not the default 9090: brokers of
    different runs may share the machine, so a run that scrapes picks a free port."""
    delivery: str = "pull"
    worker_endpoints: tuple[str, ...] = ()
    """Push delivery: the load-test application's workers (`session` fills it in)."""
    session_timeout_ms: int = 6_000
    """The consumer group's session timeout (the broker's default, named here because a
    run that kills a broker waits on it)."""
    db_path: Path | None = None
    """The database file; None: `db` in the broker's work directory."""
    settings: tuple[tuple[str, str], ...] = ()
    """Further configuration, (KEY, value) as in TASKBROKER_KEY, set last."""

    @property
    def metrics_url(self) -> str | None:
        return f"http://{HOST}:{self.metrics_port}/metrics" if self.metrics_port else None


def broker_environment(
    setup: BrokerSetup, bootstrap: str, topic: str, port: int, db_path: Path
) -> dict[str, str]:
    """The broker's configuration for one run, as TASKBROKER_ variables; every broker on
    `topic` is in the consumer group named after it."""
    settings = {
        "KAFKA_CLUSTER": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_DEADLETTER_TOPIC": f"{topic}-dlq",
        "KAFKA_CONSUMER_GROUP": topic,
        "KAFKA_AUTO_OFFSET_RESET": "earliest",
        "KAFKA_SESSION_TIMEOUT_MS": str(setup.session_timeout_ms),
        "GRPC_ADDR": HOST,
        "GRPC_PORT": str(port),
        "METRICS_ADDR": HOST,
        "METRICS_PORT": str(setup.metrics_port),
        "DB_PATH": str(db_path),
        "STORE_MODE": setup.store_mode,
        "STORE__DEBUG_COMMIT_DELAY_MS": str(setup.commit_delay_ms),
        # Room for the whole run: the test is about serving, not about ingest pausing.
        "MAX_PENDING_COUNT": str(max(2 * setup.max_tasks, 2048)),
        "MAX_PROCESSING_COUNT": str(max(4 * setup.max_workers, 2048)),
        "LOG_LEVEL": "WARNING",
        # Calls still waiting at the end of a bounded run need not hold the shutdown.
        "GRPC_SHUTDOWN_GRACE_MS": "1000",
    }
    if setup.grpc_max_workers is not None:
        settings["GRPC_MAX_WORKERS"] = str(setup.grpc_max_workers)
    if setup.delivery == "push":
        settings["DELIVERY_MODE"] = "push"
        settings[f"WORKER_MAP__{APPLICATION.upper()}"] = ",".join(setup.worker_endpoints)
    settings.update(setup.settings)
    return {f"TASKBROKER_{key}": value for key, value in settings.items()}


def create_topics(bootstrap: str, topic: str, partitions: int = 1) -> None:
    """The topic the brokers consume and its dead-letter topic."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, partitions), NewTopic(f"{topic}-dlq", partitions)]
    )
    for future in futures.values():
        future.result(timeout=30)


# --- the process ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerProcess:
    pid: int
    target: str
    log_path: Path


def _broker_command() -> list[str]:
    # The console script installed beside this interpreter, so the venv's broker runs.
    return [str(Path(sys.executable).with_name("taskbroker")), "run"]


def launch_broker(
    setup: BrokerSetup, bootstrap: str, topic: str, port: int, workdir: Path
) -> subprocess.Popen[bytes]:
    """A `taskbroker run` on `port` in its own process group, its database `workdir/db`
    unless `setup.db_path` says, not yet waited for. Its output is appended to
    `workdir/broker.log`, so that a restart's follows the first life's."""
    db_path = setup.db_path or workdir / "db"
    env = {**os.environ, **broker_environment(setup, bootstrap, topic, port, db_path)}
    with (workdir / "broker.log").open("ab") as log:
        return subprocess.Popen(
            _broker_command(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_broker(
    setup: BrokerSetup, bootstrap: str, topic: str, port: int, workdir: Path
) -> subprocess.Popen[bytes]:
    """`launch_broker`, once the broker is SERVING.

    Raises RuntimeError (after stopping it) when it exits or is not SERVING in time.
    """
    process = launch_broker(setup, bootstrap, topic, port, workdir)
    try:
        wait_serving(f"{HOST}:{port}", process, workdir / "broker.log")
    except BaseException:
        stop_group(process)
        raise
    return process


@contextmanager
def broker_process(
    setup: BrokerSetup, bootstrap: str, topic: str, workdir: Path
) -> Iterator[BrokerProcess]:
    """A SERVING broker on a free port; stopped with SIGTERM, then SIGKILL."""
    port = free_port(HOST)
    process = start_broker(setup, bootstrap, topic, port, workdir)
    try:
        yield BrokerProcess(process.pid, f"{HOST}:{port}", workdir / "broker.log")
    finally:
        stop_group(process)


def wait_serving(target: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Raises RuntimeError when the broker exits or is not SERVING in time."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the broker exited with {process.returncode}: {tail(log_path)}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                answer = None
            if answer is not None and answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
    raise RuntimeError(f"the broker was not SERVING within {_READY_TIMEOUT_S} s: {tail(log_path)}")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(_STOP_GRACE_S)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- CPU and memory ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": round(values["VmRSS"], 1), "rss_peak_mb": round(values["VmHWM"], 1)}


def cpu_share(cpu_s: float, wall_s: float) -> dict[str, float]:
    """CPU seconds, and as a percentage of one core over `wall_s`."""
    return {"cpu_s": round(cpu_s, 2), "cpu_percent": round(100 * cpu_s / max(wall_s, 1e-9), 1)}


def cpu_us_per_task(cpu_s: float, completed: int) -> float | None:
    """The broker's CPU per completed task, the number to set beside tasks/s; None when
    nothing completed."""
    return round(cpu_s * 1e6 / completed, 1) if completed else None
