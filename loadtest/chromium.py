"""Headless Chromium from the distribution's packages: the status page as a browser renders
it (its DOM after the page settled, a screenshot). Shared by the status page's test and
`python -m loadtest.status_screenshot`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

EXECUTABLES: Final = ("chromium", "chromium-browser")
_INSTALL_TIMEOUT_S: Final = 300.0
_RUN_TIMEOUT_S: Final = 60.0
SETTLE_MS: Final = 2000
"""Virtual time the page gets before its DOM is read or its picture taken; less than the
page's own refresh, so what is read is the page as first drawn."""

_FLAGS: Final = (
    "--headless",
    "--no-sandbox",  # tests and CI run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class ChromiumUnavailable(RuntimeError):
    """No Chromium here, and the package could not be installed; the message says why."""


def find_chromium() -> str | None:
    return next((found for name in EXECUTABLES if (found := shutil.which(name))), None)


def ensure_chromium() -> str:
    """The Chromium executable, installed with apt-get (Debian's `chromium` package) when
    missing. Raises ChromiumUnavailable with apt's last words when that fails."""
    found = find_chromium()
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable("no chromium on PATH and no apt-get to install it with")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=_INSTALL_TIMEOUT_S,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ChromiumUnavailable(f"{' '.join(command)} failed: {error}") from None
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ChromiumUnavailable(
                f"{' '.join(command)} exited {done.returncode}: {' / '.join(last)}"
            )
    found = find_chromium()
    if found is None:
        raise ChromiumUnavailable("apt-get installed chromium, but it is not on PATH")
    return found


def _run(chromium: str, url: str, *flags: str) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [chromium, *_FLAGS, f"--user-data-dir={profile}", *flags, url],
            capture_output=True,
            text=True,
            timeout=_RUN_TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(chromium: str, url: str, settle_ms: int = SETTLE_MS) -> str:
    """The page's DOM as Chromium holds it after `settle_ms` of virtual time."""
    return _run(chromium, url, f"--virtual-time-budget={settle_ms}", "--dump-dom")


def screenshot(
    chromium: str,
    url: str,
    path: Path,
    *,
    width: int = 1400,
    height: int = 1300,
    settle_ms: int = SETTLE_MS,
) -> Path:
    """A PNG of the page at `width` x `height` CSS pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        chromium,
        url,
        f"--virtual-time-budget={settle_ms}",
        f"--window-size={width},{height}",
        f"--screenshot={path.resolve()}",
    )
    if not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {path}")
    return path
