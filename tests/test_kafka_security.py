"""Kafka security: the settings reach every librdkafka client, and no secret is ever shown.

The embedded Kafka (Tansu) authenticates with SCRAM only, not SASL/PLAIN, and keeps its
users in the storage a broker in memory cannot be given a user for before authentication
is required (`tansu user create` against a broker with `--authentication` is refused as
unauthenticated). So no test authenticates for real: these check that the librdkafka
settings built for the consumer, the producer (retries and dead letters) and the
consumer's dead-letter producer carry the security settings, and that a broker started
with secrets (PLAINTEXT, the sasl fields set only to prove masking) never shows them.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from actors import cli, config, supervisor
from actors.config import KafkaSecurity
from actors.consumer import ConsumerConfig
from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import ConfigError
from actors.producer import ProducerConfig
from tests.conftest import TopicFactory
from tests.kafka_support import broker_config

SASL_PASSWORD = "sasl-pw-7f3e9c1d"
SHARED_SECRET = "grpc-secret-b52a0e44"
KEY_PASSWORD = "key-pw-0d9a6b71"

FULL = KafkaSecurity(
    security_protocol="sasl_ssl",
    sasl_mechanism="PLAIN",
    sasl_username="broker",
    sasl_password=SASL_PASSWORD,
    ssl_ca_location="/etc/kafka/ca.pem",
    ssl_certificate_location="/etc/kafka/client.pem",
    ssl_key_location="/etc/kafka/client.key",
    ssl_key_password=KEY_PASSWORD,
)
FULL_SETTINGS = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "PLAIN",
    "sasl.username": "broker",
    "sasl.password": SASL_PASSWORD,
    "ssl.ca.location": "/etc/kafka/ca.pem",
    "ssl.certificate.location": "/etc/kafka/client.pem",
    "ssl.key.location": "/etc/kafka/client.key",
    "ssl.key.password": KEY_PASSWORD,
}


def test_each_key_maps_to_its_librdkafka_setting() -> None:
    assert FULL.client_settings() == FULL_SETTINGS
    assert KafkaSecurity().client_settings() == {"security.protocol": "PLAINTEXT"}


def test_secrets_come_from_files_or_the_environment(tmp_path: Path) -> None:
    password_file = tmp_path / "sasl-password"
    password_file.write_text(SASL_PASSWORD + "\n")
    path = tmp_path / "broker.toml"
    path.write_text(f'[kafka_security]\nsasl_password_file = "{password_file}"\n')
    from_file = config.load(path).kafka_security
    assert from_file.client_settings()["sasl.password"] == SASL_PASSWORD

    env = {"TASKBROKER_KAFKA_SECURITY__SSL_KEY_PASSWORD": KEY_PASSWORD}
    from_env = config.load(env=env).kafka_security
    assert from_env.client_settings()["ssl.key.password"] == KEY_PASSWORD


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"kafka_security.security_protocol": "tls"},
            "kafka_security.security_protocol: 'tls' is not one of PLAINTEXT",
        ),
        (
            {"kafka_security.sasl_password": "a", "kafka_security.sasl_password_file": "/f"},
            "kafka_security.sasl_password: set either it or sasl_password_file",
        ),
    ],
)
def test_bad_security_settings_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=overrides)


def test_an_unreadable_secret_file_names_its_key(tmp_path: Path) -> None:
    security = KafkaSecurity(sasl_password_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"kafka_security\.sasl_password_file: No such file"):
        security.client_settings()


def test_consumer_and_producer_settings_carry_security_and_repr_hides_it() -> None:
    consumer = ConsumerConfig("kafka:9092", security=FULL_SETTINGS)
    producer = ProducerConfig("kafka:9092", security=FULL_SETTINGS)
    for client in (consumer, producer):
        assert FULL_SETTINGS.items() <= client.client_settings().items()
        assert SASL_PASSWORD not in repr(client)
    assert SASL_PASSWORD not in repr(FULL)
    assert KEY_PASSWORD not in repr(FULL)


def test_produce_takes_security_from_its_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(f'[kafka_security]\nsasl_password = "{SASL_PASSWORD}"\n')
    probed: list[dict[str, str] | None] = []

    def no_kafka(_servers: str, _timeout_s: float, security: dict[str, str] | None) -> bool:
        probed.append(security)
        return False

    monkeypatch.setattr(cli, "kafka_answers", no_kafka)
    arguments = ["--count", "1", "--namespace", "n", "--taskname", "t", "--config", str(path)]
    assert cli.main(["produce", *arguments]) == 1
    assert probed == [{"security.protocol": "PLAINTEXT", "sasl.password": SASL_PASSWORD}]


def _recording(cls: type[Any], into: list[Any]) -> Any:
    def build(*args: Any, **kwargs: Any) -> Any:
        built = cls(*args, **kwargs)
        into.append(built)
        return built

    return build


def test_a_running_broker_passes_security_on_and_never_shows_a_secret(
    kafka: EmbeddedKafka,
    kafka_topics: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    consumers: list[ConsumerConfig] = []
    producers: list[ProducerConfig] = []
    monkeypatch.setattr(supervisor, "ConsumerConfig", _recording(ConsumerConfig, consumers))
    monkeypatch.setattr(supervisor, "ProducerConfig", _recording(ProducerConfig, producers))
    caplog.set_level(logging.DEBUG)
    # The embedded Kafka listens in PLAINTEXT; librdkafka ignores sasl.* there.
    security = {
        "kafka_security.sasl_mechanism": "PLAIN",
        "kafka_security.sasl_username": "broker",
        "kafka_security.sasl_password": SASL_PASSWORD,
    }
    topic, dlq = kafka_topics()
    settings = broker_config(
        kafka.bootstrap,
        topic,
        dlq,
        tmp_path / "b.db",
        grpc_shared_secret=[SHARED_SECRET],
        log_level="DEBUG",
        metrics_port=free_port(),
        **security,
    )
    running = supervisor.Supervisor(settings)
    broker = running.start()
    try:
        deadline = time.monotonic() + 30
        while not broker.is_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert broker.is_ready()
        assert broker.ops is not None
        assert broker.ops.url is not None
        with urllib.request.urlopen(f"{broker.ops.url}/status", timeout=5) as response:
            status = response.read().decode()
        with urllib.request.urlopen(f"{broker.ops.url}/status.html", timeout=5) as response:
            status += response.read().decode()
    finally:
        running.stop(broker)

    # Producer for retries, the consumer, the consumer's dead-letter producer.
    assert (len(producers), len(consumers)) == (2, 1)
    expected = {
        "security.protocol": "PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "broker",
        "sasl.password": SASL_PASSWORD,
    }
    built = [p.client_settings() for p in producers] + [c.client_settings() for c in consumers]
    for client_settings in built:
        assert expected.items() <= client_settings.items()

    assert '"actors"' in status  # the fetch worked
    shown = config.to_toml(settings)
    output = capfd.readouterr()
    logs = "\n".join([record.getMessage() for record in caplog.records] + [output.out, output.err])
    assert "taskbroker started" in logs  # the capture worked
    for secret in (SASL_PASSWORD, SHARED_SECRET):
        for where, text in (("config", shown), ("logs", logs), ("/status", status)):
            assert secret not in text, f"{secret} in {where}"
