"""An existing worker library, unchanged, against this broker: the PyPI `taskbroker-client`
(which pins its own protobuf, so it runs from its own venv, built here once if missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actors.messages import Stats
from actors.records import Status
from tests.grpc_support import StartBroker, activation_record

CLIENT_VERSION = "26.5.0"
ROOT = Path(__file__).resolve().parent.parent
CLIENT_VENV = ROOT / ".venv-client"
WORKER = Path(__file__).parent / "compat" / "taskbroker_client_worker.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client_python() -> Path:
    python = CLIENT_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CLIENT_VENV)], check=True, timeout=120)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                f"taskbroker-client=={CLIENT_VERSION}",
            ],
            check=True,
            timeout=600,
        )
    return python


def run_worker(python: Path, port: int, application: str, *secrets: str) -> dict[str, object]:
    result = subprocess.run(
        [str(python), str(WORKER), str(port), application, *secrets],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.parametrize("secrets", [(), ("old-secret", "new-secret")], ids=["plain", "signed"])
def test_taskbroker_client_fetches_and_completes_every_task(
    client_python: Path, start_broker: StartBroker, secrets: tuple[str, ...]
) -> None:
    broker = start_broker(shared_secrets=secrets)
    records = [activation_record(f"compat-{i}", application="sentry") for i in range(5)]
    broker.ingest(activation_record("other-app", application="getsentry"), *records)
    port = broker.frontend.proxy().port.get(timeout=5)
    answer = run_worker(client_python, port, "sentry", *secrets[-1:])
    assert answer["completed"] == [r.id for r in records]
    assert answer["then"] == "None"
    stats = broker.ask_state(Stats())
    assert stats.by_status[Status.PENDING] == 1  # the other application's task
    assert stats.by_status[Status.PROCESSING] == 0
