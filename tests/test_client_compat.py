"""An existing worker library, unchanged, against this broker: the PyPI `taskbroker-client`
pull API, run from its own venv (tests/client_venv.py builds it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from actors.messages import Stats
from actors.records import Status
from tests import client_venv
from tests.grpc_support import StartBroker, activation_record

WORKER = Path(__file__).parent / "compat" / "taskbroker_client_worker.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client_python() -> Path:
    return client_venv.client_python()


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


class FakeBuild:
    """Stands in for the venv and pip commands: records them, makes the interpreter."""

    def __init__(self, venv: Path, fail: bool = False) -> None:
        self.venv = venv
        self.fail = fail
        self.commands: list[str] = []

    def __call__(self, command: list[str], what: str) -> None:
        self.commands.append(what)
        if self.fail and what.startswith("install"):
            raise client_venv.ClientVenvError(f"{what}: exit 1")
        (self.venv / "bin").mkdir(parents=True, exist_ok=True)
        (self.venv / "bin" / "python").touch()


def test_the_client_venv_is_reused_while_its_requirements_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    build = FakeBuild(venv)
    monkeypatch.setattr(client_venv, "_run", build)
    assert client_venv.client_python(venv) == venv / "bin" / "python"
    assert client_venv.client_python(venv) == venv / "bin" / "python"
    assert len(build.commands) == 2  # one build: the venv, then pip
    (venv / client_venv.STAMP_NAME).write_text("taskbroker-client==26.5.0\n")
    (venv / "leftover").touch()
    client_venv.client_python(venv)
    assert len(build.commands) == 4
    assert not (venv / "leftover").exists(), "a stale venv is rebuilt from scratch"


def test_a_failed_client_venv_build_raises_and_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    monkeypatch.setattr(client_venv, "_run", FakeBuild(venv, fail=True))
    with pytest.raises(client_venv.ClientVenvError, match="install taskbroker-client"):
        client_venv.client_python(venv)
    build = FakeBuild(venv)
    monkeypatch.setattr(client_venv, "_run", build)
    client_venv.client_python(venv)
    assert len(build.commands) == 2, "a half-built venv is built again"
