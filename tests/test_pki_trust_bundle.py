"""The signed trust bundle: who may sign it, rollback, and garbage."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pki_fixtures import DAY, NOW, TestCA, make_ca

from vpnd.pki.identity import PkiError
from vpnd.pki.keys import fingerprint
from vpnd.pki.trust_bundle import MAX_BYTES, lineage, parse_bundle, sign_bundle, verify_bundle


def cross_of(new: TestCA, old: TestCA) -> x509.Certificate:
    """The new root's subject and key, vouched for by the old root."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(new.cert.subject)
        .issuer_name(old.cert.subject)
        .public_key(new.cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 100 * DAY)
    )
    for ext in new.cert.extensions:
        if ext.oid != x509.AuthorityKeyIdentifier.oid:
            builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(old.key, hashes.SHA256())


@pytest.fixture
def old() -> TestCA:
    return make_ca("corp-ca")


@pytest.fixture
def new() -> TestCA:
    return make_ca("corp-ca-next")


def test_signed_by_a_trusted_root_is_accepted(old: TestCA, new: TestCA) -> None:
    b = sign_bundle(
        version=1,
        roots=[old.cert, new.cert],
        crls=[old.crl(), new.crl()],
        cross=[],
        signers=[(old.cert, old.key)],
        now=NOW,
    )
    got = verify_bundle(b.raw, [old.cert], current_version=0, now=NOW)
    assert got.version == 1
    assert got.root_fingerprints == (fingerprint(old.cert), fingerprint(new.cert))


def test_a_stranger_signature_is_refused(old: TestCA, new: TestCA) -> None:
    b = sign_bundle(
        version=1, roots=[new.cert], crls=[], cross=[], signers=[(new.cert, new.key)], now=NOW
    )
    with pytest.raises(PkiError, match="not signed by a CA this client trusts"):
        verify_bundle(b.raw, [old.cert], current_version=0, now=NOW)


def test_a_cross_signed_new_root_may_sign(old: TestCA, new: TestCA) -> None:
    b = sign_bundle(
        version=3,
        roots=[new.cert],
        crls=[new.crl()],
        cross=[cross_of(new, old)],
        signers=[(new.cert, new.key)],
        now=NOW,
    )
    assert verify_bundle(b.raw, [old.cert], current_version=2, now=NOW).version == 3


def test_a_cross_cert_by_a_stranger_vouches_for_nothing(old: TestCA, new: TestCA) -> None:
    stranger = make_ca("evil-ca")
    b = sign_bundle(
        version=3,
        roots=[new.cert],
        crls=[],
        cross=[cross_of(new, stranger)],
        signers=[(new.cert, new.key)],
        now=NOW,
    )
    with pytest.raises(PkiError, match="not signed"):
        verify_bundle(b.raw, [old.cert], current_version=0, now=NOW)


def test_rollback_is_refused_and_the_same_version_is_accepted(old: TestCA) -> None:
    b = sign_bundle(
        version=4, roots=[old.cert], crls=[], cross=[], signers=[(old.cert, old.key)], now=NOW
    )
    assert verify_bundle(b.raw, [old.cert], current_version=4, now=NOW).version == 4
    with pytest.raises(PkiError, match="rollback"):
        verify_bundle(b.raw, [old.cert], current_version=5, now=NOW)


def test_a_tampered_body_fails_the_signature(old: TestCA, new: TestCA) -> None:
    b = sign_bundle(
        version=1, roots=[old.cert], crls=[], cross=[], signers=[(old.cert, old.key)], now=NOW
    )
    doc = json.loads(b.raw)
    body = json.loads(base64.b64decode(doc["body"]))
    body["roots"].append(new.cert.public_bytes(Encoding.PEM).decode())
    doc["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(PkiError, match="not signed"):
        verify_bundle(json.dumps(doc).encode(), [old.cert], current_version=0, now=NOW)


def test_an_expired_root_in_the_bundle_is_refused(old: TestCA) -> None:
    dead = make_ca("dead-ca", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    b = sign_bundle(
        version=1,
        roots=[old.cert, dead.cert],
        crls=[],
        cross=[],
        signers=[(old.cert, old.key)],
        now=NOW,
    )
    with pytest.raises(PkiError, match="not valid now"):
        verify_bundle(b.raw, [old.cert], current_version=0, now=NOW)


def test_a_crl_of_a_root_outside_the_bundle_is_refused(old: TestCA, new: TestCA) -> None:
    b = sign_bundle(
        version=1,
        roots=[old.cert],
        crls=[new.crl()],
        cross=[],
        signers=[(old.cert, old.key)],
        now=NOW,
    )
    with pytest.raises(PkiError, match="CRL"):
        verify_bundle(b.raw, [old.cert], current_version=0, now=NOW)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{}",
        b"[]",
        b'{"format": "vpnd-trust/1"}',
        b'{"format": "vpnd-trust/1", "body": "!!", "signatures": []}',
        b'{"format": "vpnd-trust/1", "body": "e30=", "signatures": []}',
        b'{"format": "vpnd-trust/1", "body": "e30=", "signatures": "x"}',
        b"\xff\xfe",
        b"x" * (MAX_BYTES + 1),
    ],
)
def test_garbage_is_one_clear_error(raw: bytes, old: TestCA) -> None:
    with pytest.raises(PkiError):
        verify_bundle(raw, [old.cert], current_version=0, now=NOW)
    with pytest.raises(PkiError):
        parse_bundle(raw)


def test_lineage_ignores_the_generation_qualifier() -> None:
    base = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp-ca")])
    gen2 = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "corp-ca"),
            x509.NameAttribute(NameOID.GENERATION_QUALIFIER, "2"),
        ]
    )
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other-ca")])
    assert lineage(base) == lineage(gen2) == "CN=corp-ca"
    assert lineage(other) != lineage(base)
