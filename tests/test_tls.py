"""TLS and mutual TLS on the gRPC front end with real certificates from a throwaway CA, and
the reload that swaps them while the listener stays open."""

from __future__ import annotations

import datetime
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pykka
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from actors.embedded_kafka import EmbeddedKafka, free_port
from actors.errors import ConfigError
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import ReloadTls
from actors.runtime import MailboxConfig
from actors.state import StateActor, StateConfig
from actors.tls import TlsFiles
from actors.wire.grpc.health.v1 import health_pb2, health_pb2_grpc
from tests.broker_process import BrokerProcess, run_args, wait_for

if TYPE_CHECKING:
    from tests.conftest import TopicFactory

TIMEOUT_S = 5.0
HOST = "127.0.0.1"


# --- a throwaway PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


class Authority:
    """A CA that signs server and client certificates, all in memory."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(self._name, self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _builder(subject, self._name, key.public_key())
        if server:
            san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def write_server_files(folder: Path, ca: Authority, client_ca: Authority | None) -> TlsFiles:
    issued = ca.issue("broker", server=True)
    (folder / "server.pem").write_bytes(issued.cert_pem)
    (folder / "server.key").write_bytes(issued.key_pem)
    client_ca_file = ""
    if client_ca is not None:
        (folder / "clients.pem").write_bytes(client_ca.pem)
        client_ca_file = str(folder / "clients.pem")
    return TlsFiles(str(folder / "server.pem"), str(folder / "server.key"), client_ca_file)


# --- a front end and its clients -------------------------------------------------------------


@pytest.fixture
def start_frontend() -> Iterator[Any]:
    def start(tls: TlsFiles) -> tuple[pykka.ActorRef[GrpcFrontend], int]:
        state = StateActor.start(StateConfig(), MailboxConfig(size=100))
        config = FrontendConfig(host=HOST, port=0, tls=tls, stop_grace_s=0.5)
        frontend = GrpcFrontend.start(config, state)
        return frontend, frontend.proxy().port.get(timeout=TIMEOUT_S)

    yield start
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)


def health_check(channel: grpc.Channel) -> None:
    """Raises grpc.RpcError unless the call went through (NOT_SERVING is an answer)."""
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)


def tls_channel(port: int, ca: Authority, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.pem,
        private_key=None if client is None else client.key_pem,
        certificate_chain=None if client is None else client.cert_pem,
    )
    # The certificate names localhost; the connection goes to 127.0.0.1.
    options = [("grpc.ssl_target_name_override", "localhost")]
    return grpc.secure_channel(f"{HOST}:{port}", credentials, options)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        health_check(channel)
    code: grpc.StatusCode = caught.value.code()
    return code


# --- TLS -------------------------------------------------------------------------------------


def test_tls_accepts_a_client_trusting_the_ca_and_refuses_plaintext(
    tmp_path: Path, start_frontend: Any
) -> None:
    ca = Authority("ca")
    _, port = start_frontend(write_server_files(tmp_path, ca, None))
    health_check(tls_channel(port, ca))
    assert refused(grpc.insecure_channel(f"{HOST}:{port}")) is grpc.StatusCode.UNAVAILABLE
    assert refused(tls_channel(port, Authority("stranger"))) is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    tmp_path: Path, start_frontend: Any
) -> None:
    ca, clients = Authority("ca"), Authority("clients")
    _, port = start_frontend(write_server_files(tmp_path, ca, clients))
    assert refused(tls_channel(port, ca)) is grpc.StatusCode.UNAVAILABLE
    health_check(tls_channel(port, ca, clients.issue("worker", server=False)))
    stranger = Authority("stranger").issue("worker", server=False)
    assert refused(tls_channel(port, ca, stranger)) is grpc.StatusCode.UNAVAILABLE


def test_reload_serves_the_new_certificates_on_the_same_listener(
    tmp_path: Path, start_frontend: Any
) -> None:
    old, new = Authority("old"), Authority("new")
    frontend, port = start_frontend(write_server_files(tmp_path, old, None))
    kept_open = tls_channel(port, old)
    stub = health_pb2_grpc.HealthStub(kept_open)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)

    write_server_files(tmp_path, new, None)
    frontend.ask(ReloadTls(), timeout=TIMEOUT_S)

    health_check(tls_channel(port, new))
    assert refused(tls_channel(port, old)) is grpc.StatusCode.UNAVAILABLE
    # The connection made before the reload is still served: the listener never closed.
    stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    kept_open.close()


def test_a_bad_file_at_reload_keeps_the_old_certificates_and_says_why_once(
    tmp_path: Path, start_frontend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Authority("ca")
    files = write_server_files(tmp_path, ca, None)
    frontend, port = start_frontend(files)
    Path(files.key_file).write_text("not a key")
    caplog.set_level(logging.INFO, logger="actors.tls")

    frontend.ask(ReloadTls(), timeout=TIMEOUT_S)
    for _ in range(3):
        health_check(tls_channel(port, ca))

    failures = [r for r in caplog.records if "TLS reload failed" in r.getMessage()]
    assert len(failures) == 1
    assert "keeping the current certificates" in failures[0].getMessage()


def test_a_missing_file_fails_the_start_naming_it(tmp_path: Path) -> None:
    state = StateActor.start(StateConfig(), MailboxConfig(size=100))
    try:
        files = TlsFiles(str(tmp_path / "absent.pem"), str(tmp_path / "absent.key"))
        with pytest.raises(ConfigError, match="tls: "):
            GrpcFrontend(FrontendConfig(host=HOST, port=0, tls=files), state)
    finally:
        state.stop()


@pytest.mark.kafka
def test_sighup_makes_a_running_broker_serve_the_new_certificates(
    tmp_path: Path, kafka: EmbeddedKafka, kafka_topics: TopicFactory
) -> None:
    old, new = Authority("old"), Authority("new")
    tls = write_server_files(tmp_path, old, None)
    topic, dlq = kafka_topics()
    port = free_port()
    args = [
        *run_args(kafka, topic, dlq, tmp_path / "broker.sqlite", port),
        "--set", f"tls.cert_file={tls.cert_file}",
        "--set", f"tls.key_file={tls.key_file}",
    ]  # fmt: skip
    with BrokerProcess(args, tmp_path / "broker.log") as broker:
        broker.start()
        health_check(tls_channel(port, old))
        write_server_files(tmp_path, new, None)
        broker.send_signal(signal.SIGHUP)
        wait_for(lambda: answers(tls_channel(port, new)), 10.0, "the new certificates")
        assert refused(tls_channel(port, old)) is grpc.StatusCode.UNAVAILABLE
        assert "SIGHUP received: reloading the gRPC TLS certificates" in broker.log


def answers(channel: grpc.Channel) -> bool:
    try:
        health_check(channel)
    except grpc.RpcError:
        return False
    return True
