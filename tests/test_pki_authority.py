"""create_ca, ca_networks, issue_certificate, csr_for/verify_csr."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki_fixtures import DAY, NOW, make_ca, rsa_key

from vpnd.pki import (
    PkiError,
    Role,
    ca_networks,
    create_ca,
    csr_for,
    generate_key,
    issue_certificate,
    verify_csr,
)

NET = ipaddress.ip_network("10.8.0.0/16")
NET6 = ipaddress.ip_network("fd00:8::/64")


T = TypeVar("T", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, cls: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(cls)


@pytest.mark.parametrize(
    ("kind", "hash_name"), [("ecdsa-p256", "sha256"), ("ecdsa-p384", "sha384")]
)
def test_create_ca_profile(kind: str, hash_name: str) -> None:
    key = generate_key(kind)
    ca = create_ca(
        name="Corp-CA",
        networks=[NET, NET6, NET],
        key=key,
        not_before=NOW,
        not_after=NOW + 365 * DAY,
    )
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "corp-ca"
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == hash_name
    bc = _ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = _ext(ca, x509.KeyUsage)
    assert (
        ku.critical
        and ku.value.key_cert_sign
        and ku.value.crl_sign
        and not ku.value.digital_signature
    )
    nc = _ext(ca, x509.NameConstraints)
    assert nc.critical
    assert ca_networks(ca) == (NET, NET6)
    ski = _ext(ca, x509.SubjectKeyIdentifier).value
    assert _ext(ca, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert 0 < ca.serial_number < 2**159
    ca.verify_directly_issued_by(ca)


def test_create_ca_path_length() -> None:
    ca = create_ca(
        name="root",
        networks=[NET],
        key=generate_key("ecdsa-p256"),
        not_before=NOW,
        not_after=NOW + DAY,
        path_length=1,
    )
    assert _ext(ca, x509.BasicConstraints).value.path_length == 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "a/b"}, "invalid"),
        ({"networks": []}, "at least one overlay network"),
        ({"networks": ["10.0.0.0/8"]}, "not an IP network"),
        ({"key": "ed25519"}, "CA key must be one of"),
        ({"not_after": NOW - DAY}, "later than"),
        ({"not_before": NOW.replace(tzinfo=None)}, "timezone-aware"),
        ({"path_length": -1}, "path length"),
    ],
)
def test_create_ca_refuses(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {
        "name": "ca",
        "networks": [NET],
        "key": generate_key("ecdsa-p256"),
        "not_before": NOW,
        "not_after": NOW + DAY,
    }
    args.update(kwargs)
    if args["key"] == "ed25519":
        args["key"] = generate_key("ed25519")
    with pytest.raises(PkiError, match=fragment):
        create_ca(**args)  # type: ignore[arg-type]


def test_ca_networks_refuses_foreign_ca() -> None:
    with pytest.raises(PkiError, match="no name constraints"):
        ca_networks(make_ca().raw_leaf(ca=True).cert)


def test_issue_peer_profile() -> None:
    ca = make_ca()
    key = generate_key("ecdsa-p256")
    cert = issue_certificate(
        ca_cert=ca.cert,
        ca_key=ca.key,
        name="Alice",
        public_key=key.public_key(),
        role=Role.PEER,
        addresses=[ipaddress.ip_address("10.77.0.9")],
        groups=["ops"],
        not_before=NOW,
        not_after=NOW + 30 * DAY,
    )
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert cert.issuer == ca.cert.subject
    assert _ext(cert, x509.BasicConstraints).critical
    assert not _ext(cert, x509.BasicConstraints).value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_agreement
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.77.0.9")]
    assert san.get_values_for_type(x509.DNSName) == []
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca.cert, x509.SubjectKeyIdentifier).value.digest
    _ext(cert, x509.SubjectKeyIdentifier)
    assert (
        cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    )
    assert 0 < cert.serial_number < 2**159
    assert cert.not_valid_after_utc == NOW + 30 * DAY
    cert.verify_directly_issued_by(ca.cert)


def test_issue_gateway_and_ed25519_under_p384() -> None:
    ca = make_ca(key_type="ecdsa-p384", networks=["10.77.0.0/16", "fd00:77::/64"])
    gw = ca.issue(
        "gw1",
        role=Role.GATEWAY,
        addresses=["fd00:77::1"],
        dns_names=["GW.Example.", "gw.example"],
        key_type="ed25519",
    )
    assert list(_ext(gw.cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = _ext(gw.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert not _ext(gw.cert, x509.KeyUsage).value.key_agreement  # Ed25519 signs only
    assert gw.cert.signature_hash_algorithm is not None
    assert gw.cert.signature_hash_algorithm.name == "sha384"


def test_issue_explicit_serial() -> None:
    assert make_ca().issue(serial=0x1234).cert.serial_number == 0x1234


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "bad.name"}, "invalid"),
        ({"addresses": []}, "at least one overlay address"),
        ({"addresses": ["10.78.0.1"]}, "outside the CA's overlay networks"),
        ({"addresses": ["fd00:77::1"]}, "outside the CA's overlay networks"),
        ({"dns_names": ["gw.example"]}, "gateway certificates only"),
        ({"dns_names": ["*.example"], "role": Role.GATEWAY}, "invalid"),
        ({"groups": ["bad group"]}, "group name"),
        ({"routes": ["not a net"]}, "not an IP network"),
        ({"not_after": NOW + 400 * DAY}, "after the CA expires"),
        ({"not_before": NOW + 370 * DAY, "not_after": NOW + 371 * DAY}, "CA has expired"),
        ({"not_after": NOW - 2 * DAY}, "later than"),
        ({"serial": 0}, "positive"),
        ({"serial": 2**159}, "159 bits"),
        ({"key": "p384"}, "must be one of ecdsa-p256, ed25519"),
        ({"key": "rsa"}, "must be one of"),
    ],
)
def test_issue_refuses(kwargs: dict[str, object], fragment: str) -> None:
    ca = make_ca()
    args: dict[str, object] = {
        "ca_cert": ca.cert,
        "ca_key": ca.key,
        "name": "alice",
        "public_key": generate_key("ecdsa-p256").public_key(),
        "role": Role.PEER,
        "addresses": [ipaddress.ip_address("10.77.0.2")],
        "not_before": NOW,
        "not_after": NOW + DAY,
    }
    key = kwargs.pop("key", None)
    if key == "p384":
        args["public_key"] = generate_key("ecdsa-p384").public_key()
    elif key == "rsa":
        args["public_key"] = rsa_key(1024).public_key()
    for field in ("addresses",):
        if field in kwargs:
            kwargs[field] = [ipaddress.ip_address(a) for a in kwargs[field]]  # type: ignore[attr-defined]
    args.update(kwargs)
    with pytest.raises(PkiError, match=fragment):
        issue_certificate(**args)  # type: ignore[arg-type]


def test_issue_refuses_expired_ca_and_wrong_key() -> None:
    ca = make_ca(not_before=NOW - 20 * DAY, not_after=NOW - DAY)
    with pytest.raises(PkiError, match="CA has expired"):
        ca.issue(not_before=NOW, not_after=NOW + DAY)
    other = make_ca()
    with pytest.raises(PkiError, match="does not match"):
        issue_certificate(
            ca_cert=ca.cert,
            ca_key=other.key,
            name="x",
            public_key=generate_key("ed25519").public_key(),
            role=Role.PEER,
            addresses=[ipaddress.ip_address("10.77.0.2")],
            not_before=NOW,
            not_after=NOW + DAY,
        )
    leaf = other.issue("not-a-ca")
    with pytest.raises(PkiError, match="not a CA"):
        issue_certificate(
            ca_cert=leaf.cert,
            ca_key=leaf.key,  # type: ignore[arg-type]
            name="x",
            public_key=generate_key("ed25519").public_key(),
            role=Role.PEER,
            addresses=[ipaddress.ip_address("10.77.0.2")],
            not_before=NOW,
            not_after=NOW + DAY,
        )


def test_csr_round_trip() -> None:
    key = generate_key("ed25519")
    csr = csr_for(name=" Bob ", key=key)
    name, public = verify_csr(csr)
    assert name == "bob"
    assert public == key.public_key()
    with pytest.raises(PkiError, match="must be one of"):
        csr_for(name="bob", key=generate_key("ecdsa-p384"))


def test_verify_csr_refuses() -> None:
    # A requested extension is ignored, never copied into a certificate.
    key = generate_key("ecdsa-p256")
    with_ext = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    assert verify_csr(with_ext)[0] == "mallory"
    # Tamper with the signed bytes: the signature must no longer verify.
    der = bytearray(with_ext.public_bytes(serialization.Encoding.DER))
    idx = der.index(b"mallory")
    der[idx] = ord("n")
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(PkiError, match="CSR signature is invalid"):
        verify_csr(tampered)
    no_cn = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="exactly one CN"):
        verify_csr(no_cn)
    dotted = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.example.com")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="invalid"):
        verify_csr(dotted)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")]))
        .sign(rsa_key(1024), hashes.SHA256())
    )
    with pytest.raises(PkiError, match="unsupported public key type rsa-1024"):
        verify_csr(rsa_csr)


def test_times_are_whole_seconds() -> None:
    ca = make_ca()
    leaf = ca.issue(not_before=NOW + dt.timedelta(microseconds=5), not_after=NOW + DAY)
    assert leaf.cert.not_valid_before_utc == NOW
