"""The chaos run's faults: the schedule (pure: `plan`) and the means to cause each one, on
this machine, to processes this run started.

- A SIGKILL of the broker's process group; `aimed` kills wait until the broker's metrics
  show a flush with the writer, so that the kill lands inside one.
- Kafka unreachable: SIGSTOP of the Tansu process group, SIGCONT after the window. Clients
  see a broker that takes connections and never answers: what a hung or partitioned
  Kafka looks like.
- The disk full: the database lives on a tmpfs of its own (`SmallDisk`), and a ballast
  file fills what is left of it for the window.
- The database locked: a child process holds `BEGIN EXCLUSIVE` on it for the window.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KILL = "kill"
KAFKA_UNREACHABLE = "kafka_unreachable"
RETRY_PRODUCER_FAILING = "retry_producer_failing"
DISK_FULL = "disk_full"
DB_LOCKED = "db_locked"
WINDOW_KINDS = (KAFKA_UNREACHABLE, RETRY_PRODUCER_FAILING, DISK_FULL, DB_LOCKED)
_WINDOW_AT = {
    KAFKA_UNREACHABLE: 0.15,
    RETRY_PRODUCER_FAILING: 0.35,
    DISK_FULL: 0.55,
    DB_LOCKED: 0.75,
}
"""Where in the production window each longer fault starts, as a fraction of it: apart,
so that each one's effect is its own."""
_BALLAST_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Planned:
    kind: str
    at_s: float
    """Seconds from the start of the run."""
    duration_s: float = 0.0
    aimed: bool = False
    """A kill timed to land inside a flush."""


def plan(
    *,
    production_s: float,
    kills: int,
    aimed_kills: int,
    windows: dict[str, float],
    gap_s: float,
    seed: int,
) -> list[Planned]:
    """The faults in time order: each window fault of `windows` (kind: seconds) at its
    place in the production window, and `kills` kills at random moments, `aimed_kills` of
    them aimed, none within `gap_s` of a window fault or of another kill.

    Raises ValueError when the kills do not fit: ask for fewer, or a longer run.
    """
    unknown = set(windows) - set(WINDOW_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}")
    if not 0 <= aimed_kills <= kills:
        raise ValueError(f"aimed kills must be between 0 and {kills}, got {aimed_kills}")
    faults = [
        Planned(kind, round(_WINDOW_AT[kind] * production_s, 2), duration)
        for kind, duration in windows.items()
    ]
    # Time the window faults really take pushes what follows them back: the kills are
    # planned on a clock that leaves the window faults' durations out.
    busy = [(f.at_s - gap_s, f.at_s + gap_s) for f in faults]
    rng = random.Random(seed)
    moments: list[float] = []
    for _ in range(kills):
        for _attempt in range(10_000):
            at = rng.uniform(0.03 * production_s, 0.97 * production_s)
            if all(not low <= at <= high for low, high in busy) and all(
                abs(at - other) >= gap_s for other in moments
            ):
                moments.append(at)
                break
        else:
            raise ValueError(
                f"{kills} kills {gap_s} s apart do not fit in {production_s:.0f} s of production "
                "beside the other faults: fewer kills or more tasks"
            )
    aimed = set(rng.sample(range(kills), aimed_kills))
    faults += [Planned(KILL, round(at, 2), aimed=i in aimed) for i, at in enumerate(moments)]
    return sorted(faults, key=lambda fault: fault.at_s)


# --- Kafka ------------------------------------------------------------------------------------


def pause_group(pid: int) -> None:
    os.killpg(pid, signal.SIGSTOP)


def resume_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)


# --- a small disk of the database's own -------------------------------------------------------


class SmallDisk:
    """A tmpfs of `size_mb` mounted for the run (we need root), where the database lives;
    `fill()` takes all its free space with a ballast file, `empty()` gives it back.

    When the mount fails, `mounted` is False and `reason` says why: the run then keeps the
    database on the ordinary disk and reports the disk-full fault as not applied.
    """

    def __init__(self, size_mb: int) -> None:
        self.size_mb = size_mb
        self.path = Path(tempfile.mkdtemp(prefix="chaos-disk-"))
        self.mounted = False
        self.reason = ""
        self._ballast = self.path / "ballast"

    def __enter__(self) -> SmallDisk:
        command = ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except OSError as error:
            self.reason = f"mount could not run: {error}"
        else:
            self.mounted = done.returncode == 0
            self.reason = "" if self.mounted else f"mount failed: {done.stderr.strip()}"
        return self

    def __exit__(self, *_: object) -> None:
        if self.mounted:
            # Lazy: a broker still dying must not leave the mount behind.
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False
        with contextlib.suppress(OSError):
            for child in self.path.iterdir():
                child.unlink()
            self.path.rmdir()

    def fill(self) -> int:
        """Write the ballast until the disk is full; the bytes written."""
        written = 0
        chunk = b"\0" * _BALLAST_CHUNK
        with self._ballast.open("wb", buffering=0) as ballast:
            while True:
                try:
                    written += ballast.write(chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
        # The last partial chunk: take the pages that are left too.
        with self._ballast.open("ab", buffering=0) as ballast:
            for size in (65_536, 4096, 512):
                while True:
                    try:
                        written += ballast.write(b"\0" * size)
                    except OSError:
                        break
        return written

    def empty(self) -> None:
        self._ballast.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize


# --- a lock held by another process -----------------------------------------------------------

_LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", time.time(), flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("ROLLBACK")
print("released", time.time(), flush=True)
"""


@contextlib.contextmanager
def exclusive_lock(db_path: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A child process holding `BEGIN EXCLUSIVE` on `db_path` for `seconds`, yielded once
    it holds it (it waits up to a minute for the broker's writer to let go first). The child
    is killed on the way out, which releases the lock, if it is still there.

    Raises RuntimeError when it could not take the lock.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db_path), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert child.stdout is not None
        first = child.stdout.readline()
        if not first.startswith("locked"):
            raise RuntimeError(f"the locker did not take the lock: {first}{child.stdout.read()}")
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
