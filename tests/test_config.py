"""Configuration: defaults, file < environment < flags, and a clear error for bad input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from actors import config
from actors.cli import main
from actors.config import Config, DeliveryMode, OffsetReset, StoreMode
from actors.errors import ConfigError
from actors.runtime import MailboxPolicy


def test_defaults_follow_taskbroker() -> None:
    defaults = config.load()
    assert (defaults.grpc_port, defaults.kafka_topic, defaults.kafka_deadletter_topic) == (
        50051,
        "taskworker",
        "taskworker-dlq",
    )
    assert defaults.kafka_consumer_group == "taskworker"
    assert defaults.kafka_session_timeout_ms == 6000
    assert defaults.kafka_auto_offset_reset is OffsetReset.LATEST
    assert (defaults.max_pending_count, defaults.max_processing_count) == (2048, 2048)
    assert defaults.max_delay_count == 8192
    assert defaults.max_processing_attempts == 5
    assert defaults.processing_deadline_grace_sec == 3
    assert defaults.max_delayed_task_allowed_sec == 3600
    assert defaults.upkeep_task_interval_ms == 1000
    assert (defaults.db_insert_batch_max_len, defaults.db_insert_batch_max_size) == (
        256,
        16_000_000,
    )
    assert defaults.db_insert_batch_max_time_ms == 1000
    assert defaults.grpc_shared_secret == ()
    assert defaults.store_mode is StoreMode.MEMORY
    assert defaults.retry_topic == "taskworker"


@pytest.mark.parametrize(
    ("text", "secrets"),
    [
        ("old, new", ("old", "new")),
        ('["old", "new"]', ("old", "new")),
        ("['a,b', 'c']", ("a,b", "c")),
        ("[]", ()),
    ],
)
def test_a_list_from_text_is_a_toml_array_or_comma_separated(
    text: str, secrets: tuple[str, ...]
) -> None:
    assert config.load(overrides={"grpc_shared_secret": text}).grpc_shared_secret == secrets


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('["old", "new"', "grpc_shared_secret: .* is not a TOML array"),
        ("[1, 2]", "grpc_shared_secret: expected a list of strings"),
    ],
)
def test_a_broken_array_is_refused_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(overrides={"grpc_shared_secret": text})


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        'grpc_port = 6000\nkafka_topic = "from-file"\ndb_path = "file.sqlite"\n'
        '[mailbox.state]\nsize = 77\npolicy = "fail"\n'
        "[store]\ndebug_commit_delay_ms = 5\n"
    )
    env = {
        "TASKBROKER_KAFKA_TOPIC": "from-env",
        "TASKBROKER_DB_PATH": "env.sqlite",
        "TASKBROKER_MAILBOX__STATE__PUSH_TIMEOUT_MS": "250",
        "TASKBROKER_GRPC_SHARED_SECRET": "old, new",
        "UNRELATED": "ignored",
    }
    loaded = config.load(path, env, {"db_path": "flag.sqlite"})
    assert loaded.grpc_port == 6000  # file only
    assert loaded.kafka_topic == "from-env"  # env beats file
    assert loaded.db_path == "flag.sqlite"  # flag beats env
    assert loaded.mailbox.state.size == 77
    assert loaded.mailbox.state.policy is MailboxPolicy.FAIL
    assert loaded.mailbox.state.push_timeout_ms == 250
    assert loaded.mailbox.writer == Config().mailbox.writer  # untouched neighbours keep defaults
    assert loaded.store.debug_commit_delay_ms == 5
    assert loaded.grpc_shared_secret == ("old", "new")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"grpc_prot": 1}, "grpc_prot: unknown configuration key"),
        ({"mailbox.statee.size": 1}, "mailbox.statee: unknown configuration key"),
        ({"grpc_port": 70000}, "grpc_port: 70000 is not a TCP port"),
        ({"grpc_port": "many"}, "grpc_port: 'many' is not an integer"),
        ({"max_pending_count": 0}, "max_pending_count: must be at least 1"),
        ({"mailbox.state.size": 0}, "mailbox.state.size: must be at least 1"),
        ({"mailbox.writer.policy": "spill"}, "mailbox.writer.policy: 'spill' is not one of"),
        ({"store_mode": "disk"}, "store_mode: 'disk' is not one of memory, sqlite-direct"),
        ({"kafka_topic": ""}, "kafka_topic: must not be empty"),
        ({"log_level": "LOUD"}, "log_level: 'LOUD' is not a logging level"),
        ({"grpc_shared_secret": 5}, "grpc_shared_secret: expected a list of strings"),
        ({"store": 3}, "store: expected a table of settings"),
        ({"mailbox.state.policy": "drop_newest"}, "mailbox.state.policy: drop_newest could lose"),
        ({"mailbox.writer.policy": "drop_oldest"}, "mailbox.writer.policy: drop_oldest could lose"),
        ({"batch.max_fetch": 0}, "batch.max_fetch must be at least 1"),
        ({"delivery_mode": "push"}, "worker_map: push delivery needs at least one"),
        ({"delivery_mode": "teleport"}, "delivery_mode: 'teleport' is not one of pull, push"),
        (
            {"delivery_mode": "push", "worker_map.s": "w:1", "store_mode": "sqlite-direct"},
            "delivery_mode: push works with store_mode memory only",
        ),
        ({"worker_map.sentry": "nohost"}, "worker_map.sentry: 'nohost' is not host:port"),
        ({"worker_map": 3}, "worker_map: expected a table"),
        ({"push.lease_ms": 1000}, "push.lease_ms \\(1000\\) must be longer than timeout_ms"),
        ({"fetch.batch_length": 0}, "fetch.batch_length: must be at least 1"),
        ({"batch.max_wait_ms": -1}, "batch.max_wait_ms must not be negative"),
        ({"grpc_batch_interval_ms": -1}, "grpc_batch_interval_ms: must be at least 0"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=overrides)


def test_a_broken_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("grpc_port = = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        config.load(broken)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        config.load(tmp_path / "missing.toml")


def test_effective_config_prints_as_toml_with_secrets_masked() -> None:
    loaded = config.load(overrides={"grpc_shared_secret": ["s3cret"], "mailbox.state.size": 9})
    text = config.to_toml(loaded)
    assert "s3cret" not in text
    parsed = tomllib.loads(text)
    assert parsed["grpc_shared_secret"] == ["****"]
    assert parsed["mailbox"]["state"]["size"] == 9
    parsed["grpc_shared_secret"] = ["s3cret"]
    flat = {k: v for k, v in parsed.items() if not isinstance(v, dict)}
    reloaded = config.load(overrides=flat | {"mailbox.state.size": 9})
    assert reloaded == loaded


def test_worker_map_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "push.toml"
    path.write_text('delivery_mode = "push"\n[worker_map]\nsentry = "127.0.0.1:50052"\n')
    loaded = config.load(path, env={"TASKBROKER_WORKER_MAP__BILLING": "w1:50052,w2:50052"})
    assert loaded.delivery_mode is DeliveryMode.PUSH
    assert loaded.worker_map == {
        "sentry": ("127.0.0.1:50052",),
        "billing": ("w1:50052", "w2:50052"),
    }
    shown = config.to_toml(loaded)
    assert '[worker_map]\nsentry = ["127.0.0.1:50052"]' in shown


def test_nested_secrets_are_masked_wherever_they_come_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[kafka_security]\nsasl_username = "broker"\nsasl_password = "pw-in-file"\n')
    monkeypatch.setenv("TASKBROKER_KAFKA_SECURITY__SSL_KEY_PASSWORD", "pw-in-env")
    assert main(["config", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "pw-in-file" not in shown
    assert "pw-in-env" not in shown
    security = tomllib.loads(shown)["kafka_security"]
    assert security["sasl_username"] == "broker"
    assert (security["sasl_password"], security["ssl_key_password"]) == ("****", "****")
    unset = tomllib.loads(config.to_toml(Config()))["kafka_security"]
    assert unset["sasl_password"] == ""  # nothing to hide: no mask that would read as set
