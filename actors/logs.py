"""Keeping the log readable when a dependency repeats itself.

librdkafka reports a dead Kafka on every reconnect attempt, tens of lines a second; the
operator needs the first line, the fact that it goes on, and the end of it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

_DIGITS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets the first of a run of like records through, then one per `interval_s` carrying
    how many were held back. Records are alike when they differ only in numbers."""

    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage()))
        now = self._clock()
        with self._lock:
            shown_at, held = self._seen.get(key, (None, 0))
            if shown_at is not None and now - shown_at < self._interval_s:
                self._seen[key] = (shown_at, held + 1)
                return False
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} like it in the last {self._interval_s:.0f} s)"
        return True


def quiet_repeats(logger: logging.Logger, interval_s: float = 30.0) -> logging.Logger:
    """`logger`, with a RepeatFilter attached once."""
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter(interval_s))
    return logger
