"""A dead Kafka is reported on every reconnect: the log keeps the first line and a count."""

from __future__ import annotations

import logging

import pytest

from actors.logs import RepeatFilter, quiet_repeats


def test_like_records_pass_once_per_interval_with_the_count_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = logging.getLogger("tests.logs.repeat")
    log.addFilter(RepeatFilter(interval_s=30, clock=lambda: now[0]))
    with caplog.at_level(logging.WARNING, logger="tests.logs.repeat"):
        for attempt in range(50):  # numbers differ, the message is the same
            log.warning("connect to 127.0.0.1:1 failed (after %d ms)", attempt)
        log.warning("something else entirely")
        now[0] = 31.0
        log.warning("connect to 127.0.0.1:1 failed (after %d ms)", 99)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "connect to 127.0.0.1:1 failed (after 0 ms)",
        "something else entirely",
        "connect to 127.0.0.1:1 failed (after 99 ms) (and 49 like it in the last 30 s)",
    ]


def test_quiet_repeats_attaches_one_filter() -> None:
    log = logging.getLogger("tests.logs.once")
    quiet_repeats(log)
    quiet_repeats(log)
    assert sum(isinstance(f, RepeatFilter) for f in log.filters) == 1
