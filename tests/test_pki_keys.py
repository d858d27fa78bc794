"""Key generation and loading keys, certificates and CSRs from files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pki_fixtures import make_ca, rsa_key

from vpnd.pki import (
    KEY_TYPES_CA,
    KEY_TYPES_LEAF,
    PkiError,
    certificate_pem,
    csr_for,
    fingerprint,
    generate_key,
    key_type,
    load_certificate,
    load_certificates,
    load_csr,
    load_private_key,
    private_key_pem,
)


@pytest.mark.parametrize("kind", sorted({*KEY_TYPES_CA, *KEY_TYPES_LEAF}))
def test_generate_and_round_trip(kind: str, tmp_path: Path) -> None:
    key = generate_key(kind)
    assert key_type(key) == kind
    path = tmp_path / "k.pem"
    path.write_bytes(private_key_pem(key))
    loaded = load_private_key(path)
    assert key_type(loaded) == kind
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert loaded.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)


def test_generate_unknown_type() -> None:
    with pytest.raises(PkiError, match="unknown key type 'rsa'"):
        generate_key("rsa")


def test_pem_is_pkcs8() -> None:
    assert private_key_pem(generate_key("ed25519")).startswith(b"-----BEGIN PRIVATE KEY-----")
    enc = private_key_pem(generate_key("ecdsa-p256"), b"pw")
    assert enc.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(PkiError, match="empty"):
        private_key_pem(generate_key("ecdsa-p256"), b"")


def test_encrypted_key(tmp_path: Path) -> None:
    key = generate_key("ecdsa-p384")
    path = tmp_path / "ca.key"
    path.write_bytes(private_key_pem(key, b"correct horse"))
    assert key_type(load_private_key(path, b"correct horse")) == "ecdsa-p384"
    with pytest.raises(PkiError, match=r"^ca\.key is encrypted: give --passphrase-file$"):
        load_private_key(path)
    with pytest.raises(PkiError, match="wrong passphrase"):
        load_private_key(path, b"wrong")


def test_plain_key_with_passphrase_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(private_key_pem(generate_key("ed25519")))
    with pytest.raises(PkiError, match="not encrypted"):
        load_private_key(path, b"pw")


def test_load_private_key_errors(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no such file"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(PkiError, match="is a directory"):
        load_private_key(tmp_path)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"hello\n")
    with pytest.raises(PkiError, match="not a PEM private key"):
        load_private_key(garbage)
    broken = tmp_path / "broken.key"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PkiError, match="not a valid PEM private key"):
        load_private_key(broken)
    rsa_path = tmp_path / "rsa.key"
    rsa_path.write_bytes(
        rsa_key(1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(PkiError, match="unsupported key type rsa-1024"):
        load_private_key(rsa_path)
    k1 = tmp_path / "p521.key"
    k1.write_bytes(
        ec.generate_private_key(ec.SECP521R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(PkiError, match="unsupported key type ecdsa-p521"):
        load_private_key(k1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file regardless of mode")
def test_unreadable_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(private_key_pem(generate_key("ed25519")))
    path.chmod(0)
    with pytest.raises(PkiError, match="cannot read"):
        load_private_key(path)


def test_load_certificates(tmp_path: Path) -> None:
    ca = make_ca()
    leaf = ca.issue("alice")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(certificate_pem(leaf.cert) + b"junk between\n" + certificate_pem(ca.cert))
    certs = load_certificates(bundle)
    assert [fingerprint(c) for c in certs] == [fingerprint(leaf.cert), fingerprint(ca.cert)]
    assert load_certificate(bundle) == leaf.cert
    der = tmp_path / "leaf.der"
    der.write_bytes(leaf.cert.public_bytes(serialization.Encoding.DER))
    assert load_certificate(der) == leaf.cert


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "holds no PEM certificate"),
        (b"not a cert", "holds no PEM certificate"),
        (b"0\x03\x02\x01\x00", "not a valid certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "damaged"),
    ],
)
def test_load_certificate_garbage(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(content)
    with pytest.raises(PkiError, match=fragment):
        load_certificate(path)


def test_load_csr(tmp_path: Path) -> None:
    csr = csr_for(name="alice", key=generate_key("ed25519"))
    pem_path, der_path = tmp_path / "a.csr", tmp_path / "a.der"
    pem_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    der_path.write_bytes(csr.public_bytes(serialization.Encoding.DER))
    assert load_csr(pem_path) == csr
    assert load_csr(der_path) == csr
    bad = tmp_path / "bad.csr"
    bad.write_bytes(b"hello")
    with pytest.raises(PkiError, match="not a certificate signing request"):
        load_csr(bad)
    bad.write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(PkiError, match="damaged"):
        load_csr(bad)


def test_fingerprint_is_sha256_hex() -> None:
    cert = make_ca().cert
    fp = fingerprint(cert)
    assert len(fp) == 64
    assert fp == fp.lower()
    assert bytes.fromhex(fp) == cert.fingerprint(hashes.SHA256())


def test_key_type_names() -> None:
    assert key_type(rsa_key(1024).public_key()) == "rsa-1024"
    assert key_type(ed25519.Ed25519PrivateKey.generate().public_key()) == "ed25519"
    assert key_type(object()) == "unknown"


def test_traditional_encrypted_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "trad.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(PkiError, match=r"trad\.pem is encrypted"):
        load_private_key(path)
    assert key_type(load_private_key(path, b"pw")) == "ecdsa-p256"
