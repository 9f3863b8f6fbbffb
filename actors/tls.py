"""TLS for the gRPC front end: certificate files that are re-read without closing the listener.

grpc's dynamic server credentials ask a fetcher for a new certificate configuration at each
handshake; the fetcher answers from memory, so files are read only when a reload is asked
for (SIGHUP, through `ReloadTls`), never on a worker's connection. The files are checked
with the `ssl` module before they replace the old ones, because grpc would find a bad pair
only at the next handshake, and then refuse every worker until the files are fixed.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from actors.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str = ""
    """Set: mutual TLS; every client must present a certificate signed by this CA."""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)


class ReloadableCredentials:
    """Server credentials whose certificates `reload` replaces for new connections;
    connections already open keep theirs."""

    def __init__(self, files: TlsFiles) -> None:
        """Reads the files once; a missing or bad file fails the start (fail-fast)."""
        self._files = files
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        try:
            initial = _read(files)
        except (OSError, ssl.SSLError, ValueError) as error:
            raise ConfigError(f"tls: {_why(error)}") from None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial,
            self._fetch,
            require_client_authentication=files.mutual,
        )

    def __repr__(self) -> str:
        return f"<ReloadableCredentials {self._files.cert_file} mutual={self._files.mutual}>"

    def reload(self) -> bool:
        """True when the files were read and new connections will use them; otherwise the
        old certificates stay and the reason is logged, once for this reload."""
        try:
            configuration = _read(self._files)
        except (OSError, ssl.SSLError, ValueError) as error:
            logger.error(  # noqa: TRY400 - the reason is the message; a trace adds nothing
                "TLS reload failed, keeping the current certificates: %s", _why(error)
            )
            return False
        with self._lock:
            self._pending = configuration
        logger.info("TLS certificates reloaded from %s", self._files.cert_file)
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc's core at every handshake: None keeps the configuration in use.
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


def _read(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert_file, files.key_file)  # the key matches the cert
    if files.mutual:
        context.load_verify_locations(files.client_ca_file)
    pair = (Path(files.key_file).read_bytes(), Path(files.cert_file).read_bytes())
    root = Path(files.client_ca_file).read_bytes() if files.mutual else None
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return f"{error} (is each file PEM, and the key the certificate's?)"
