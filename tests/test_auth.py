"""Request signing as WIRE.md "Authentication" defines it, without a server."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from actors.auth import SIGNATURE_METADATA_KEY, SignatureCheck, sign

PATH = "/sentry_protos.taskbroker.v1.ConsumerService/GetTask"
BODY = b"\x12\x03app"


def test_sign_is_the_hex_hmac_sha256_of_path_colon_body() -> None:
    expected = hmac.new(b"secret", PATH.encode() + b":" + BODY, hashlib.sha256).hexdigest()
    assert sign("secret", PATH, BODY) == expected


def test_any_configured_secret_is_accepted() -> None:
    check = SignatureCheck(["new", "old"])
    for secret in ("new", "old"):
        assert check.verify(PATH, BODY, [(SIGNATURE_METADATA_KEY, sign(secret, PATH, BODY))])


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("other-key", sign("new", PATH, BODY))],
        [(SIGNATURE_METADATA_KEY, sign("third", PATH, BODY))],
        [(SIGNATURE_METADATA_KEY, sign("new", PATH, BODY + b"x"))],
        [(SIGNATURE_METADATA_KEY, sign("new", "/other/Method", BODY))],
        [(SIGNATURE_METADATA_KEY, sign("new", PATH, BODY).upper())],
        [(SIGNATURE_METADATA_KEY, "ünicode")],
    ],
    ids=[
        "missing",
        "other key",
        "third secret",
        "other body",
        "other path",
        "upper hex",
        "non-ascii",
    ],
)
def test_anything_else_is_refused(metadata: list[tuple[str, str | bytes]]) -> None:
    assert not SignatureCheck(["new", "old"]).verify(PATH, BODY, metadata)


def test_bytes_metadata_values_are_read_too() -> None:
    signature = sign("new", PATH, BODY).encode()
    assert SignatureCheck(["new"]).verify(PATH, BODY, [(SIGNATURE_METADATA_KEY, signature)])


def test_no_secrets_turns_signing_off() -> None:
    check = SignatureCheck([])
    assert not check.enabled
    assert check.verify(PATH, BODY, [])


def test_an_empty_secret_is_refused_and_secrets_never_show() -> None:
    with pytest.raises(ValueError, match=r"shared_secrets\[1\]"):
        SignatureCheck(["good", ""])
    assert "hunter2" not in repr(SignatureCheck(["hunter2"]))
