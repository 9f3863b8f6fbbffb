"""The status page's last 15 minutes: readings of the broker's counters taken every few
seconds, turned into rates and kept in a bounded ring.

`History` is plain Python: it is given `Reading`s (cumulative counters and momentary values,
with the time they were read) and keeps one `Sample` per interval, computed from each
reading and the one before it. `HistoryRecorder` is the thread that reads every
`interval_s`; what it reads is a callable the ops endpoint hands it, so nothing here knows
an actor.

The ring holds `capacity` samples (180 at 5 s: 15 minutes), a few hundred bytes each, so a
broker's memory and the page's size do not grow with its uptime.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from typing import Any, Final

from actors.metrics import MAILBOX_BUCKETS

logger = logging.getLogger(__name__)

HISTORY_INTERVAL_S: Final = 5.0
HISTORY_SAMPLES: Final = 180
"""At one reading every 5 s: the last 15 minutes."""


@dataclass(frozen=True, slots=True)
class Reading:
    """What the broker's counters said at one moment. A counter is None while its actor has
    not answered yet (its rate is then unknown, not zero)."""

    at: float
    """Unix seconds."""
    ingested: int | None = None
    """Activations the consumer handed to the state since it started."""
    claims: int | None = None
    """Claims that handed out a task."""
    results: int | None = None
    """Worker results the state handled, whatever their outcome."""
    flushes: int = 0
    """Flushes the writer committed."""
    flush_seconds: float = 0.0
    """The time those flushes took, in all."""
    kafka_lag: int | None = None
    """Messages consumed or not yet consumed but not committed, over every partition."""
    depth: Mapping[str, int] = field(default_factory=dict)
    """Messages in each actor's mailbox now."""
    waits: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Each actor's time-in-mailbox counts per bucket since it started (`wait_bounds_s`,
    then one above every bound)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One interval of the history: rates over it, and the momentary values at its end."""

    at: float
    ingested_per_s: float | None
    claims_per_s: float | None
    results_per_s: float | None
    flushes_per_s: float | None
    flush_ms: float | None
    """Mean duration of the interval's flushes; None when there was none."""
    kafka_lag: int | None
    depth: dict[str, int]
    wait_p99_ms: dict[str, float | None]
    """Each actor's time in the mailbox, p99 over the interval's messages; None: none."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class History:
    """The last `capacity` samples, oldest first. `record` is called by one thread at a time
    (the recorder); readers may call `samples` and `latest` from any thread."""

    def __init__(
        self,
        *,
        interval_s: float = HISTORY_INTERVAL_S,
        capacity: int = HISTORY_SAMPLES,
        wait_bounds_s: Sequence[float] = MAILBOX_BUCKETS,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"history capacity must be at least 1, got {capacity}")
        self.interval_s = interval_s
        self.capacity = capacity
        self._wait_bounds_s = tuple(wait_bounds_s)
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._previous: Reading | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<History {len(self._samples)}/{self.capacity} every {self.interval_s}s>"

    def record(self, reading: Reading) -> Sample | None:
        """Add the interval that ends with `reading`; the first reading only starts one, and
        a reading that does not move the clock forward is ignored."""
        previous = self._previous
        if previous is not None and reading.at <= previous.at:
            return None
        self._previous = reading
        if previous is None:
            return None
        elapsed_s = reading.at - previous.at
        flushes = _increase(previous.flushes, reading.flushes)
        flush_seconds = reading.flush_seconds - previous.flush_seconds
        sample = Sample(
            at=reading.at,
            ingested_per_s=_rate(previous.ingested, reading.ingested, elapsed_s),
            claims_per_s=_rate(previous.claims, reading.claims, elapsed_s),
            results_per_s=_rate(previous.results, reading.results, elapsed_s),
            flushes_per_s=_rate(previous.flushes, reading.flushes, elapsed_s),
            flush_ms=round(flush_seconds / flushes * 1000, 3) if flushes else None,
            kafka_lag=reading.kafka_lag,
            depth=dict(reading.depth),
            wait_p99_ms={
                actor: _p99_ms(previous.waits.get(actor), counts, self._wait_bounds_s)
                for actor, counts in reading.waits.items()
            },
        )
        with self._lock:
            self._samples.append(sample)
        return sample

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def to_json(self) -> dict[str, Any]:
        """What /status/history answers."""
        return {
            "interval_s": self.interval_s,
            "capacity": self.capacity,
            "samples": [sample.to_json() for sample in self.samples()],
        }


def _increase(before: int | None, after: int | None) -> int | None:
    """How much a counter grew; None when unknown, or when it went back (its actor
    restarted, and what it counted before is gone)."""
    if before is None or after is None or after < before:
        return None
    return after - before


def _rate(before: int | None, after: int | None, elapsed_s: float) -> float | None:
    grown = _increase(before, after)
    return None if grown is None else round(grown / elapsed_s, 2)


def _p99_ms(
    before: Sequence[int] | None, after: Sequence[int], bounds_s: Sequence[float]
) -> float | None:
    """The 99th percentile of the observations made between two readings of the counts per
    bucket, linear within its bucket as Prometheus' histogram_quantile reads one; past the
    last bound, the last bound."""
    counts = [n - (before[i] if before else 0) for i, n in enumerate(after)]
    total = sum(counts)
    if total <= 0 or any(n < 0 for n in counts):
        return None
    rank = 0.99 * total
    cumulative = list(accumulate(counts))
    index = bisect_left(cumulative, rank)  # the first bucket that reaches the rank
    below = cumulative[index - 1] if index else 0
    count = counts[index]
    if index >= len(bounds_s):
        return round(bounds_s[-1] * 1000, 3)
    lower = bounds_s[index - 1] if index else 0.0
    upper = bounds_s[index]
    return round((lower + (upper - lower) * (rank - below) / count) * 1000, 3)


class HistoryRecorder:
    """Takes a reading every `history.interval_s` on a daemon thread, the first at once."""

    def __init__(self, history: History, read: Callable[[], Reading]) -> None:
        self._history = history
        self._read = read
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-history", daemon=True)

    def __repr__(self) -> str:
        return f"<HistoryRecorder {self._history!r}>"

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            try:
                self._history.record(self._read())
            except Exception:
                # A reading that failed leaves a gap in the charts; the page must not
                # lose every later one for it.
                logger.exception("the status history could not take a reading")
            if self._stopping.wait(self._history.interval_s):
                return
