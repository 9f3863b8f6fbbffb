"""`python -m loadtest.status_screenshot PATH [--minutes M] [--wave N]`: a `taskbroker run`
under a load that comes in waves for a few minutes, then its status page as headless
Chromium draws it, saved as a PNG (the picture in loadtest/results/<date>/status-page.png).

Each wave produces up to `--wave` tasks (their number rises and falls from wave to wave) and
one unary worker completes them (one: a worker that reaches its count may hold one more task
it fetched, and several would leave tasks held until their deadlines), so the charts show
ingest running ahead of claims, the backlog filling and draining, and the mailboxes under a
changing load. The picture is taken after `--minutes`, wherever the waves then are; the
wave in progress then finishes (each is bounded at two minutes) and everything stops.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from actors.embedded_kafka import EmbeddedKafka, free_port
from loadtest.broker import HOST, BrokerSetup, broker_process, create_topics
from loadtest.chromium import ensure_chromium, screenshot
from loadtest.producer import TaskSpec, produce_tasks, task_ids
from loadtest.workers import complete_tasks

_TOPIC = "status-screenshot"
_WAVE_TIMEOUT_S = 120.0


def wave_size(wave: int, largest: int) -> int:
    """Between a quarter of `largest` and all of it, rising and falling over ~12 waves."""
    return max(1, int(largest * (0.625 + 0.375 * math.sin(wave / 2))))


def run_waves(bootstrap: str, target: str, largest: int, stopping: threading.Event) -> None:
    """Waves until `stopping` is set; the wave in progress then finishes."""
    wave = 0
    while not stopping.is_set():
        count = wave_size(wave, largest)
        produce_tasks(bootstrap, _TOPIC, task_ids(f"w{wave}", count), TaskSpec())
        complete_tasks((target,), count, _WAVE_TIMEOUT_S)
        print(f"wave {wave}: {count} tasks", file=sys.stderr)
        wave += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.status_screenshot")
    parser.add_argument("path", type=Path, help="where to write the PNG")
    parser.add_argument("--minutes", type=float, default=3.0, help="load before the picture")
    parser.add_argument("--wave", type=int, default=4000, help="tasks in the largest wave")
    arguments = parser.parse_args(argv)
    chromium = ensure_chromium()
    with (
        EmbeddedKafka(port=free_port(HOST)) as kafka,
        tempfile.TemporaryDirectory(prefix="status-shot-") as workdir,
    ):
        create_topics(kafka.bootstrap, _TOPIC, partitions=2)
        setup = BrokerSetup(metrics_port=free_port(HOST))
        with broker_process(setup, kafka.bootstrap, _TOPIC, Path(workdir)) as broker:
            stopping = threading.Event()
            load = threading.Thread(
                target=run_waves,
                args=(kafka.bootstrap, broker.target, arguments.wave, stopping),
                name="waves",
            )
            load.start()
            try:
                time.sleep(arguments.minutes * 60)
                page = f"http://{HOST}:{setup.metrics_port}/status.html"
                screenshot(chromium, page, arguments.path, width=1400, height=1250)
            finally:
                stopping.set()
                load.join()
    print(f"wrote {arguments.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
