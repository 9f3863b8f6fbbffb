"""A stand-in recipient for actor tests: it keeps what it is told and lets a test wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

TIMEOUT_S = 5.0


class Collector:
    """Anything a message can be told to (an actor's writer, consumer, front end...)."""

    def __init__(self) -> None:
        self.messages: list[object] = []
        self._changed = threading.Condition()

    def tell(self, message: object) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, kind: type, count: int = 1) -> list[Any]:
        """The messages of `kind` so far, once there are at least `count` of them."""
        found: list[Any] = []

        def enough() -> bool:
            found[:] = [m for m in self.messages if isinstance(m, kind)]
            return len(found) >= count

        self._wait(enough, lambda: f"no {count} x {kind.__name__} in {self.messages!r}")
        return found

    def wait_until_told(self, message: object) -> None:
        self._wait(lambda: message in self.messages, lambda: f"no {message!r} in {self.messages!r}")

    def _wait(self, condition: Callable[[], bool], failure: Callable[[], str]) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                assert remaining > 0, failure()
                self._changed.wait(remaining)
