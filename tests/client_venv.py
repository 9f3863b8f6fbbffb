"""The venv that runs the PyPI `taskbroker-client`, for the compatibility tests.

It pins its own protobuf and sentry-protos, so it cannot share our venv. It is built once
into `.venv-client` and reused while its recorded requirements match `REQUIREMENTS`; a pin
change, or a build that died half way, rebuilds it from scratch. A build that fails raises
with pip's output: CI builds it on a fresh clone, and a compatibility test must fail there
rather than skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

CLIENT_VERSION = "0.20.30"
"""The first numbering (0.x) is the current one: a plain install picks 26.5.0, an older
release with no push worker."""
REQUIREMENTS = (
    f"taskbroker-client=={CLIENT_VERSION}",
    # The worker CLI (`taskbroker_client.cli`) imports click, which the wheel declares only
    # under its `examples` extra.
    "click>=8.3",
)
ROOT = Path(__file__).resolve().parent.parent
CLIENT_VENV = ROOT / ".venv-client"
STAMP_NAME = "compat-requirements.txt"
BUILD_TIMEOUT_S = 240


class ClientVenvError(RuntimeError):
    """The client venv could not be built; the message carries pip's output."""


def client_python(venv: Path = CLIENT_VENV) -> Path:
    """The client venv's interpreter, building the venv first unless it is current."""
    python = venv / "bin" / "python"
    stamp = venv / STAMP_NAME
    wanted = "\n".join(REQUIREMENTS) + "\n"
    # Two pytest runs in one tree must not build it at the same time; the lock is taken on
    # the folder that holds the venv, so that no lock file is left in the work tree.
    folder = os.open(venv.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "create the venv")
        _run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *REQUIREMENTS],
            f"install {' '.join(REQUIREMENTS)}",
        )  # fmt: skip
        # Written last: a venv without it is a build that did not finish.
        stamp.write_text(wanted)
    finally:
        os.close(folder)  # releases the lock
    return python


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise ClientVenvError(f"{what}: no answer in {BUILD_TIMEOUT_S} s") from error
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-4000:]
        raise ClientVenvError(f"{what}: exit {result.returncode}\n{output}")
