"""A tiny certificate factory for the TLS tests (no tests of its own).

Kept independent of ``vpnd.pki`` on purpose: the TLS edge must be testable against
plain, well-formed X.509 made with ``cryptography`` directly.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vpnd.transport.tlsctx import client_context, server_context

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class Files:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, *, permitted: list[str] | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if permitted is not None:
        subtrees: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_network(net)) for net in permitted
        ]
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None),
            critical=True,
        )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def issue(
    ca: Issued,
    cn: str,
    *,
    server: bool = False,
    eku: list[x509.ObjectIdentifier] | None = None,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key: PrivateKey | None = None,
) -> Issued:
    key = key or ec.generate_private_key(ec.SECP256R1())
    if eku is None:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    san += [x509.DNSName(name) for name in dns]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def crl_pem(ca: Issued, revoked: list[x509.Certificate]) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + 7 * DAY)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(NOW - DAY)
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_ca(directory: Path, ca: Issued, name: str = "ca") -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(cert_pem(ca.cert))
    return path


def write_crl(directory: Path, ca: Issued, revoked: list[x509.Certificate]) -> Path:
    path = directory / "crl.pem"
    path.write_bytes(crl_pem(ca, revoked))
    return path


def write_pair(
    directory: Path, name: str, issued: Issued, passphrase: bytes | None = None
) -> Files:
    cert = directory / f"{name}.crt"
    key = directory / f"{name}.key"
    cert.write_bytes(cert_pem(issued.cert))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )
    return Files(cert, key)


GATEWAY_NAME = "gw.vpn.test"


@dataclass(frozen=True)
class World:
    """A CA, a gateway and a set of client certificates, all on disk."""

    directory: Path
    ca: Issued
    ca_file: Path
    crl_file: Path
    gateway: Files
    clients: dict[str, Files]
    other_ca_file: Path

    def server_ctx(self, *, ca: Path | None = None, crl: Path | None = None) -> ssl.SSLContext:
        return server_context(
            ca=ca or self.ca_file,
            cert=self.gateway.cert,
            key=self.gateway.key,
            crl=crl or self.crl_file,
        )

    def client_ctx(self, name: str = "alice", *, ca: Path | None = None) -> ssl.SSLContext:
        files = self.clients[name]
        return client_context(ca=ca or self.ca_file, cert=files.cert, key=files.key)


def build_world(directory: Path) -> World:
    """alice (good), bob (revoked), carol (expired), dave (not yet valid), eve (other CA),
    srv (serverAuth-only), far (IP outside the name constraints), weak (RSA-1024 key)."""
    ca = make_ca("vpn-ca", permitted=["10.8.0.0/16"])
    other = make_ca("other-ca")
    gateway = issue(ca, "gw", server=True, ips=("10.8.0.1",), dns=(GATEWAY_NAME,))
    leaves = {
        "alice": issue(ca, "alice", ips=("10.8.0.2",)),
        "bob": issue(ca, "bob", ips=("10.8.0.3",)),
        "carol": issue(
            ca, "carol", ips=("10.8.0.4",), not_before=NOW - 10 * DAY, not_after=NOW - DAY
        ),
        "dave": issue(ca, "dave", ips=("10.8.0.5",), not_before=NOW + DAY, not_after=NOW + 9 * DAY),
        "eve": issue(other, "eve", ips=("10.8.0.6",)),
        "srv": issue(ca, "srv", server=True, ips=("10.8.0.7",)),
        "far": issue(ca, "far", ips=("10.9.0.8",)),
        "weak": issue(ca, "weak", ips=("10.8.0.9",), key=rsa.generate_private_key(65537, 1024)),
    }
    return World(
        directory=directory,
        ca=ca,
        ca_file=write_ca(directory, ca),
        crl_file=write_crl(directory, ca, [leaves["bob"].cert]),
        gateway=write_pair(directory, "gw", gateway),
        clients={name: write_pair(directory, name, leaf) for name, leaf in leaves.items()},
        other_ca_file=write_ca(directory, other, "other-ca"),
    )
