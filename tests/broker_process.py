"""`taskbroker run` as a child process, the way an operator runs it, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from actors.embedded_kafka import EmbeddedKafka

READY_LINE = "taskbroker ready"


class BrokerProcess:
    """One broker process; its log is kept in memory and on failure shown in the assertion."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._ready = threading.Event()

    @property
    def log(self) -> str:
        return "".join(self._lines)

    def start(self, timeout_s: float = 30.0) -> None:
        self._lines.clear()
        self._ready.clear()
        command = [sys.executable, "-m", "actors.cli", "run", *self.args]
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(timeout_s):
            self.kill()
            raise AssertionError(f"broker not ready in {timeout_s} s:\n{self.log}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the exit code of a clean stop."""
        process = self._require()
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"broker did not stop in {timeout_s} s:\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL: a crash, with no flush and no commit."""
        process = self._require()
        if process.poll() is None:
            process.kill()
            process.wait(10)

    def send_signal(self, signum: int) -> None:
        self._require().send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self._require().wait(timeout_s)

    def _require(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise RuntimeError("the broker process was never started")
        return self._process

    def _drain(self) -> None:
        process = self._require()
        assert process.stdout is not None
        with self.log_path.open("a") as log_file:
            for line in process.stdout:
                self._lines.append(line)
                log_file.write(line)
                if READY_LINE in line:
                    self._ready.set()
        process.stdout.close()

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self.kill()


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    """Poll a zero-argument callable until it is truthy."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def run_args(
    kafka: EmbeddedKafka,
    topic: str,
    dlq: str,
    db_path: Path,
    grpc_port: int,
    metrics_port: int = 0,
) -> list[str]:
    """`taskbroker run` flags for a broker in the topic's group, on its own file and ports."""
    return [
        "--kafka", kafka.bootstrap,
        "--db", str(db_path),
        "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        "--set", f"kafka_topic={topic}",
        "--set", f"kafka_deadletter_topic={dlq}",
        "--set", f"kafka_consumer_group=group-{topic}",
        "--set", "kafka_auto_offset_reset=earliest",
        "--set", "grpc_addr=127.0.0.1",
        "--set", "metrics_addr=127.0.0.1",
        "--set", "processing_deadline_grace_sec=0",
        "--set", "upkeep_task_interval_ms=200",
        "--set", "upkeep_deadline_reset_skip_after_startup_sec=0",
    ]  # fmt: skip
