"""Request signing (WIRE.md, "Authentication"): the hex HMAC-SHA256 of
`method_path + b":" + serialized request`, under any one of a list of shared secrets, in the
metadata entry `sentry-signature`.

The signature covers the request bytes exactly as they arrived, so the broker checks it
before parsing and never re-serializes (a re-serialization need not reproduce the bytes).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Final

SIGNATURE_METADATA_KEY: Final = "sentry-signature"


def sign(secret: str, method_path: str, request: bytes) -> str:
    """The signature a worker sends for `request` to `method_path` under `secret`."""
    payload = method_path.encode() + b":" + request
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class SignatureCheck:
    """Accepts a request signed under any of the secrets, or every request when there are none.

    A list of secrets lets keys rotate: the new one is added beside the old, workers move
    over, then the old one is removed, and no request is refused along the way.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        for index, secret in enumerate(secrets):
            if not secret:
                raise ValueError(f"shared_secrets[{index}] is empty; an empty key signs nothing")
        self._keys = tuple(secret.encode() for secret in secrets)

    def __repr__(self) -> str:
        # Never the secrets themselves: reprs end up in logs.
        return f"<SignatureCheck {len(self._keys)} secret(s)>"

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(
        self,
        method_path: str,
        request: bytes,
        metadata: Iterable[tuple[str, str | bytes]],
    ) -> bool:
        """True when signing is off, or the request's signature matches one of the secrets."""
        if not self._keys:
            return True
        signature = _signature_of(metadata)
        if signature is None:
            return False
        payload = method_path.encode() + b":" + request
        # compare_digest against every key, so the time taken does not tell which one failed.
        matches = [
            hmac.compare_digest(
                hmac.new(key, payload, hashlib.sha256).hexdigest().encode(), signature
            )
            for key in self._keys
        ]
        return any(matches)


def _signature_of(metadata: Iterable[tuple[str, str | bytes]]) -> bytes | None:
    # Bytes, because compare_digest refuses a str that is not ASCII.
    for key, value in metadata:
        if key.lower() == SIGNATURE_METADATA_KEY:
            return value if isinstance(value, bytes) else value.encode()
    return None
