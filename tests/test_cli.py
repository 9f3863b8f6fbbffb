"""`taskbroker <command> --help`: every flag says what it does and what it defaults to."""

from __future__ import annotations

import re

import pytest

from actors.cli import main
from actors.config import Config


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # argparse wraps at the terminal's width, and would break a path at its hyphen.
    monkeypatch.setenv("COLUMNS", "200")


def option_help(command: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Each option's help text from `taskbroker <command> --help`, by its flag."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    options = text.split("\noptions:\n", 1)[1]
    blocks = re.split(r"\n(?=  -)", options.split("\n\n", 1)[0])
    found: dict[str, str] = {}
    for block in blocks:
        flag, _, rest = block.strip().partition(" ")
        found[flag.rstrip(",")] = " ".join(rest.split())
    return found


@pytest.mark.parametrize("command", ["produce", "run", "config"])
def test_every_flag_has_help_and_shows_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    helps = option_help(command, capsys)
    helps.pop("-h")
    assert len(helps) >= 7  # the parse found the options, not an empty section
    for flag, text in helps.items():
        assert re.search(r"\(default: [^)]+\)|\(required\)", text), f"{flag}: {text!r}"
        described = re.sub(r"\(default: [^)]+\)|\(required\)|[A-Z_:]+", "", text).strip()
        assert len(described) > 10, f"{flag} is not described: {text!r}"


def test_run_shows_the_built_in_defaults_not_none(capsys: pytest.CaptureFixture[str]) -> None:
    helps = option_help("run", capsys)
    defaults = Config()
    assert f"(default: {defaults.grpc_port})" in helps["--grpc-port"]
    assert f"(default: {defaults.metrics_port})" in helps["--metrics-port"]
    assert f"(default: {defaults.embedded_kafka_port})" in helps["--embedded-kafka-port"]
    assert f"(default: {defaults.db_path})" in helps["--db"]
    assert not any("(default: None)" in text for text in helps.values())


def test_produce_defaults_to_where_run_starts_its_kafka(capsys: pytest.CaptureFixture[str]) -> None:
    helps = option_help("produce", capsys)
    assert f"(default: 127.0.0.1:{Config().embedded_kafka_port})" in helps["--kafka"]
    assert "(default: 30.0)" in helps["--timeout"]
    assert not any("(default: None)" in text for text in helps.values())
