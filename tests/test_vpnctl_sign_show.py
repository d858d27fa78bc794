"""vpnd keygen + vpnctl sign round trip, CSR refusals, and vpnctl show."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import warnings
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl, run_vpnd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vpnd.pki.identity import Role
from vpnd.pki.keys import load_certificate, load_private_key
from vpnd.pki.profile import describe_certificate
from vpnd.pki.verify import load_trust_store, verify_peer

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def records(pki: Path) -> list[dict[str, object]]:
    code, text, err = run_vpnctl("--pki", str(pki), "list", "--json")
    assert code == 0, err
    data: list[dict[str, object]] = json.loads(text)
    return data


def write_csr(path: Path, csr: x509.CertificateSigningRequest) -> Path:
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519"])
def test_keygen_then_sign_round_trip(pki: Path, out: Path, key_type: str) -> None:
    key_path, csr_path, cert_path = out / "carol.key", out / "carol.csr", out / "carol.pem"
    code, _, err = run_vpnd(
        "keygen", "--name", "Carol", "--out-key", str(key_path), "--out-csr", str(csr_path),
        "--key-type", key_type,
    )  # fmt: skip
    assert code == 0, err
    code, text, err = run_vpnctl("sign", str(csr_path), "--groups", "dev", "--out", str(cert_path))
    assert code == 0, err
    assert "issued carol" in text
    assert cert_path.stat().st_mode & 0o777 == 0o644
    cert = load_certificate(cert_path)
    assert cert.public_key() == load_private_key(key_path).public_key()
    info = describe_certificate(cert)
    assert (info.name, info.role, info.groups) == ("carol", "peer", ("dev",))
    assert [str(a) for a in info.addresses] == ["10.8.0.2"]
    trust = load_trust_store(pki / "ca.pem", pki / "crl.pem")
    verify_peer([cert], now=dt.datetime.now(dt.UTC), role=Role.PEER, trust=trust)
    [row] = records(pki)
    assert row["serial"] == f"{cert.serial_number:x}" and row["name"] == "carol"
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_sign_ignores_requested_extensions(pki: Path, out: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.8.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    csr_path = write_csr(out / "m.csr", csr)
    code, _, err = run_vpnctl("sign", str(csr_path), "--out", str(out / "m.pem"))
    assert code == 0, err
    info = describe_certificate(load_certificate(out / "m.pem"))
    assert not info.is_ca
    assert info.eku == ("clientAuth",)
    assert [str(a) for a in info.addresses] == ["10.8.0.2"]  # not the gateway's .1


def test_sign_a_gateway_csr(pki: Path, out: Path) -> None:
    csr = out / "gw.csr"
    assert (
        run_vpnd("keygen", "--name", "gw", "--out-key", str(out / "gw.key"), "--out-csr", str(csr))[
            0
        ]
        == 0
    )
    code, _, err = run_vpnctl(
        "sign", str(csr), "--gateway", "--dns", "vpn.example.com", "--out", str(out / "gw.pem")
    )
    assert code == 0, err
    info = describe_certificate(load_certificate(out / "gw.pem"))
    assert info.role == "gateway" and [str(a) for a in info.addresses] == ["10.8.0.1"]


def test_csr_with_bad_signature_is_refused(pki: Path, out: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eve")]))
        .sign(key, hashes.SHA256())
    )
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    bad = out / "bad.csr"
    bad.write_bytes(bytes(der))
    code, _, err = run_vpnctl("sign", str(bad), "--out", str(out / "eve.pem"))
    assert code == 1
    assert_one_error_line(err)
    assert "signature" in err
    assert not (out / "eve.pem").exists()
    assert records(pki) == []


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"garbage", "not a certificate signing request"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "damaged",
        ),
    ],
)
def test_garbled_csr(pki: Path, out: Path, content: bytes, needle: str) -> None:
    bad = out / "bad.csr"
    bad.write_bytes(content)
    code, _, err = run_vpnctl("sign", str(bad), "--out", str(out / "x.pem"))
    assert code == 1
    assert_one_error_line(err)
    assert needle in err
    code, _, err = run_vpnctl("sign", str(out / "missing.csr"), "--out", str(out / "x.pem"))
    assert code == 1
    assert_one_error_line(err)
    assert "no such file" in err


@pytest.mark.filterwarnings("ignore:Attribute's length")
@pytest.mark.parametrize("cn", ["a/b", "x.example.com", "x" * 200])
def test_csr_with_bad_name(pki: Path, out: Path, cn: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)]))
        .sign(key, hashes.SHA256())
    )
    path = write_csr(out / "n.csr", csr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_vpnctl("sign", str(path), "--out", str(out / "n.pem"))
    assert not caught  # nothing but the one error line reaches the admin
    assert code == 1
    assert_one_error_line(err)
    assert "peer name" in err


def test_sign_refusals_write_nothing(pki: Path, out: Path, tmp_path: Path) -> None:
    csr = out / "c.csr"
    assert (
        run_vpnd("keygen", "--name", "c", "--out-key", str(out / "c.key"), "--out-csr", str(csr))[0]
        == 0
    )
    assert run_vpnctl("issue", "alice", "--out", str(out), "--ip", "10.8.0.7")[0] == 0
    ca_before = (pki / "ca.pem").read_bytes()
    cases = [
        (["--out", str(tmp_path / "nope" / "c.pem")], 1, "does not exist"),
        (["--out", str(pki / "ca.pem")], 1, "PKI directory"),
        (["--out", str(out / "c.pem"), "--ip", "10.8.0.7"], 1, "already held by alice"),
        (["--out", str(out / "c.pem"), "--dns", "x.example"], 2, "--gateway"),
        (["--out", str(out / "c.pem"), "--days", "0"], 2, "at least 1"),
    ]
    for extra, code, needle in cases:
        got, _, err = run_vpnctl("sign", str(csr), *extra)
        assert got == code, (extra, err)
        assert_one_error_line(err)
        assert needle in err
    assert not (out / "c.pem").exists()
    assert (pki / "ca.pem").read_bytes() == ca_before
    assert len(records(pki)) == 1


# --- show -----------------------------------------------------------------------------------


def test_show_text(pki: Path, out: Path) -> None:
    assert (
        run_vpnctl(
            "issue", "alice", "--out", str(out), "--groups", "dev,ops", "--routes", "192.168.9.0/24"
        )[0]
        == 0
    )
    cert = load_certificate(out / "alice.pem")
    code, text, err = run_vpnctl("show", str(out / "alice.pem"))
    assert code == 0, err
    fields = {line[:12].strip(): line[12:].strip() for line in text.splitlines()}
    assert fields["name"] == "alice"
    assert fields["role"] == "peer"
    assert fields["serial"] == f"{cert.serial_number:x}"
    assert fields["issuer"] == "CN=test-ca"
    assert fields["addresses"] == "10.8.0.2"
    assert fields["groups"] == "dev, ops"
    assert fields["routes"] == "192.168.9.0/24"
    assert fields["eku"] == "clientAuth"
    assert fields["dns names"] == "-"
    assert "days left" in fields["not after"]
    assert describe_certificate(cert).fingerprint in fields["fingerprint"]


def test_show_json(pki: Path, out: Path) -> None:
    assert (
        run_vpnctl("issue", "gw", "--out", str(out), "--gateway", "--dns", "vpn.example.com")[0]
        == 0
    )
    code, text, _ = run_vpnctl("show", "--json", str(out / "gw.pem"))
    assert code == 0
    data = json.loads(text)
    assert data["name"] == "gw" and data["role"] == "gateway"
    assert data["addresses"] == ["10.8.0.1"] and data["dns_names"] == ["vpn.example.com"]
    assert data["eku"] == ["serverAuth"]
    assert data["days_left"] in (364, 365)
    assert data["serial"] == f"{load_certificate(out / 'gw.pem').serial_number:x}"
    code, text, _ = run_vpnctl("show", "--json", str(pki / "ca.pem"))
    assert json.loads(text)["role"] == "ca"


def test_show_bundle_and_bad_files(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "alice", "--out", str(out))[0] == 0
    bundle = out / "bundle.pem"
    bundle.write_bytes((out / "alice.pem").read_bytes() + (pki / "ca.pem").read_bytes())
    code, text, err = run_vpnctl("show", str(bundle))
    assert code == 0 and "alice" in text and "2 certificates" in err
    garbled = out / "garbled.pem"
    garbled.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    for path in (garbled, out / "missing.pem", out / "alice.key", out):
        code, _, err = run_vpnctl("show", str(path))
        assert code == 1, path
        assert_one_error_line(err)
