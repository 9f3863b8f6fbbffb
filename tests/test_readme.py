"""What the README promises, held by tests: its worker snippets do every task against a real
broker and end on Ctrl-C without a traceback, also when nothing is pending at first; its
configuration table names every key `taskbroker config` prints; its Sentry worker commands
use options the pinned `taskbroker-client` has, and its pull command runs that worker."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from actors.config import Config, to_toml
from actors.embedded_kafka import free_port
from actors.messages import StateStats, Stats
from actors.records import Status
from tests import client_venv
from tests.broker_process import wait_for
from tests.grpc_support import Broker, StartBroker, activation_record

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMPAT_DIR = Path(__file__).parent / "compat"
README_BROKER = "127.0.0.1:50051"
"""The broker address the README's examples use; the tests put their broker's in its place."""
TASKS = 5
RAN = re.compile(r"running readme\.hello (readme-\d+)")
RUN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
AWAY_S = 2.5
CLIENT_COMMAND = 'python -c "from taskbroker_client.cli import worker; worker()"'


# --- reading the README ---------------------------------------------------------------------


def section(heading: str) -> str:
    """The README's `## heading` section, its subsections included."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def shell_commands(text: str) -> list[str]:
    """The indented command lines of `text`, a backslash-continued command as one line."""
    commands: list[str] = []
    continued = False
    for line in text.splitlines():
        if not line.startswith("    "):
            continued = False
            continue
        part = line.strip().removesuffix("\\").strip()
        if continued:
            commands[-1] += " " + part
        else:
            commands.append(part)
        continued = line.rstrip().endswith("\\")
    return commands


def client_command(mode: str) -> list[str]:
    """The README's `taskbroker-client` worker command for `mode` (pull or push), as argv."""
    prefix = f"{CLIENT_COMMAND} {mode} "
    found = [c for c in shell_commands(section("Sentry workers")) if c.startswith(prefix)]
    assert len(found) == 1, f"one `{prefix}...` command in Sentry workers, found {found}"
    return shlex.split(found[0])


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with the value of `option` replaced."""
    index = argv.index(option)
    return [*argv[: index + 1], value, *argv[index + 2 :]]


def configuration_table_keys() -> set[str]:
    """Every key the configuration table names, expanded: `` `batch.max_fetch`, `.max_results` ``
    is `batch.max_results` too, and `mailbox.<actor>.size` is that key for each actor the
    row's last cell names."""
    keys: set[str] = set()
    for row in section("Configuration").splitlines():
        if not row.startswith("| `"):
            continue
        name_cell, _default, meaning = (cell.strip() for cell in row.strip("|").split("|"))
        full = ""
        for name in re.findall(r"`([^`]+)`", name_cell):
            full = full.rpartition(".")[0] + name if name.startswith(".") else name
            if "<actor>" in full:
                actors = re.findall(r"`([a-z_]+)`", meaning)
                keys.update(full.replace("<actor>", actor) for actor in actors)
            else:
                keys.add(full)
    return keys


def dotted_keys(table: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            yield from dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"  # a value, or a table with nothing in it (worker_map)


# --- the worker snippets --------------------------------------------------------------------

WORKER_SNIPPETS = python_blocks(section("A worker in five minutes"))


class Snippet:
    """A README snippet running in its own interpreter, pointed at the test's broker."""

    def __init__(self, code: str, port: int, folder: Path) -> None:
        assert README_BROKER in code, f"the snippet does not connect to {README_BROKER}"
        self._code = code.replace(README_BROKER, f"127.0.0.1:{port}")
        self._stdout = folder / "stdout.txt"
        self._stderr = folder / "stderr.txt"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def stderr(self) -> str:
        return self._stderr.read_text() if self._stderr.exists() else ""

    def start(self) -> None:
        with self._stdout.open("wb") as stdout, self._stderr.open("wb") as stderr:
            self._process = subprocess.Popen(
                [sys.executable, "-u", "-c", self._code], cwd=ROOT, stdout=stdout, stderr=stderr
            )

    def ran(self) -> list[str]:
        """The ids of the tasks it ran: it prints `running TASKNAME ID` for each. Found by
        pattern, not by line: the batch worker prints from several threads, and `print`
        writes the text and its newline apart, so lines may interleave."""
        return RAN.findall(self._stdout.read_text())

    def running(self) -> bool:
        """True while it runs; an exit before Ctrl-C fails the test at once."""
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"the snippet exited ({self._process.returncode}):\n{self.stderr}")
        return True

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT, as the terminal sends it; its exit code."""
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            return self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT_S)
            raise AssertionError(f"no exit {STOP_TIMEOUT_S} s after Ctrl-C") from None


def stats(broker: Broker) -> StateStats:
    answer: StateStats = broker.ask_state(Stats())
    return answer


def test_the_worker_section_has_its_two_snippets() -> None:
    assert len(WORKER_SNIPPETS) == 2, "the unary and the batch worker"


@pytest.mark.parametrize("code", WORKER_SNIPPETS, ids=["unary", "batch"])
@pytest.mark.parametrize("pending_at_start", [True, False], ids=["pending", "nothing-pending"])
def test_a_readme_worker_does_every_task_then_ends_on_ctrl_c(
    start_broker: StartBroker, tmp_path: Path, code: str, pending_at_start: bool
) -> None:
    broker = start_broker()
    port = broker.frontend.proxy().port.get(timeout=5)
    records = [activation_record(f"readme-{i}", taskname="readme.hello") for i in range(TASKS)]
    snippet = Snippet(code, port, tmp_path)
    if pending_at_start:
        broker.ingest(*records)
    snippet.start()
    try:
        if not pending_at_start:
            # It asked, found nothing, and asked again: it waits rather than dies.
            wait_for(
                lambda: snippet.running() and stats(broker).claims.get("miss", 0) >= 2,
                RUN_TIMEOUT_S,
                "the worker to ask twice with nothing pending",
            )
            assert snippet.ran() == []
            broker.ingest(*records)
        wait_for(
            lambda: snippet.running() and len(snippet.ran()) >= TASKS,
            RUN_TIMEOUT_S,
            "every task to run",
        )
        wait_for(
            lambda: stats(broker).conclusions.get("applied", 0) >= TASKS,
            RUN_TIMEOUT_S,
            "every result to reach the broker",
        )
    finally:
        exit_code = snippet.interrupt()
    assert exit_code == 0, snippet.stderr
    assert "Traceback" not in snippet.stderr, snippet.stderr
    assert sorted(snippet.ran()) == sorted(r.id for r in records), "each task ran once"
    after = stats(broker)
    assert after.conclusions == {"applied": TASKS}
    assert after.by_status[Status.PENDING] == after.by_status[Status.PROCESSING] == 0


def test_the_unary_worker_waits_while_no_broker_answers(tmp_path: Path) -> None:
    # UNAVAILABLE, from a port where nothing listens: it asks again each second, and
    # Ctrl-C ends it. (The batch client gives up after about 5 s by design.)
    snippet = Snippet(WORKER_SNIPPETS[0], free_port(), tmp_path)
    snippet.start()
    try:
        time.sleep(AWAY_S)
        assert snippet.running()
    finally:
        exit_code = snippet.interrupt()
    assert exit_code == 0, snippet.stderr
    assert snippet.stderr == ""


# --- the configuration table ----------------------------------------------------------------


def test_the_configuration_table_names_every_key_taskbroker_config_prints() -> None:
    printed = set(dotted_keys(tomllib.loads(to_toml(Config()))))
    named = configuration_table_keys()
    assert sorted(printed - named) == [], "keys missing from the README's table"
    assert sorted(named - printed) == [], "keys in the README's table that do not exist"


# --- Sentry workers -------------------------------------------------------------------------


def test_the_readme_installs_the_client_the_compatibility_tests_pin() -> None:
    installs = [c for c in shell_commands(section("Sentry workers")) if c.startswith("pip ")]
    assert len(installs) == 1, installs
    assert shlex.split(installs[0])[2:] == list(client_venv.REQUIREMENTS)


@pytest.fixture(scope="module")
def client_python() -> Path:
    return client_venv.client_python()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_the_readme_worker_commands_use_options_the_client_has(
    client_python: Path, mode: str
) -> None:
    listing = (
        "import json; from taskbroker_client import cli; "
        f"print(json.dumps([o for p in cli.{mode}.params for o in p.opts]))"
    )
    result = subprocess.run(
        [str(client_python), "-c", listing], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    options = set(json.loads(result.stdout))
    used = {arg for arg in client_command(mode) if arg.startswith("--")}
    assert used <= options, f"not options of `worker {mode}`: {sorted(used - options)}"


@pytest.mark.slow
def test_the_readme_pull_command_runs_the_sentry_worker_against_the_broker(
    client_python: Path, start_broker: StartBroker, tmp_path: Path
) -> None:
    broker = start_broker()
    port = broker.frontend.proxy().port.get(timeout=5)
    records = [
        activation_record(f"readme-pull-{i}", application="compat", namespace="compat",
                          taskname="record", kwargs={"sleep_s": 0.0})
        for i in range(TASKS)
    ]  # fmt: skip
    broker.ingest(*records)
    argv = client_command("pull")
    assert argv[0] == "python"
    argv = with_option(argv, "--app-module", "push_app:app")  # tests/compat's app
    argv = with_option(argv, "--broker-host", f"127.0.0.1:{port}")
    ledger = tmp_path / "ledger.txt"
    ledger.write_text("")
    env = {
        **os.environ,
        "PYTHONPATH": str(COMPAT_DIR),
        "COMPAT_APPLICATION": "compat",
        "COMPAT_LEDGER": str(ledger),
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(client_python), *argv[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its spawned children end with the group
        )  # fmt: skip
    try:
        wait_for(
            lambda: len(ledger.read_text().split()) >= TASKS or process.poll() is not None,
            RUN_TIMEOUT_S * 2,
            "every task to run",
        )
        wait_for(
            lambda: stats(broker).conclusions.get("applied", 0) >= TASKS,
            RUN_TIMEOUT_S,
            "every result to reach the broker",
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(STOP_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)
            raise
    assert exit_code == 0, log_path.read_text(errors="replace")
    assert sorted(ledger.read_text().split()) == sorted(r.id for r in records)
