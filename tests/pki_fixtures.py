"""In-memory CAs, certificates and CRLs for tests (any test may import this).

Typical use::

    from pki_fixtures import NOW, make_ca  # pytest puts tests/ on sys.path
    ca = make_ca()                                   # P-256 CA for 10.77.0.0/16
    alice = ca.issue("alice", addresses=["10.77.0.2"], groups=["admins"])
    gw = ca.issue("gw1", role=Role.GATEWAY, addresses=["10.77.0.1"], dns_names=["gw.test"])
    trust = ca.trust()                               # TrustStore with an empty, fresh CRL
    identity = verify_peer(alice.chain, now=NOW, role=Role.PEER, trust=trust)
    trust = ca.trust(revoked=[alice])                # ... or with alice revoked

``ca.raw_leaf(...)`` builds certificates *outside* the vpnd profile (no EKU, no SAN,
CA:TRUE, other keys, arbitrary extensions); ``resign_sha1`` re-signs one with SHA-1,
which cryptography's builders refuse to do. Everything is ECDSA (fast) except
``rsa_key(1024)``, generated once per process.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vpnd.pki import (
    PrivateKey,
    RevokedEntry,
    Role,
    TrustStore,
    build_crl,
    ca_networks,
    certificate_pem,
    create_ca,
    crl_pem,
    generate_key,
    issue_certificate,
)
from vpnd.pki.identity import IPAddress, IPNetwork

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
"""The reference 'now' of every fixture: pass it as ``now=`` to the verifier."""
NETWORK = ipaddress.ip_network("10.77.0.0/16")
NETWORK6 = ipaddress.ip_network("fd00:77::/64")
DAY = dt.timedelta(days=1)

AnyPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def cn_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@functools.cache
def rsa_key(bits: int = 1024) -> rsa.RSAPrivateKey:
    """An RSA key, generated once per process per size (RSA generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _hash_for(key: AnyPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass
class Leaf:
    """An issued certificate, its key and the chain a peer would send (leaf first)."""

    cert: x509.Certificate
    key: AnyPrivateKey
    chain: list[x509.Certificate]

    def pem(self) -> bytes:
        return b"".join(certificate_pem(c) for c in self.chain)

    def write(self, directory: Path, name: str | None = None) -> tuple[Path, Path]:
        """Write ``<name>.pem`` (chain) and ``<name>.key`` (unencrypted) into ``directory``."""
        stem = name or self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        cert_path, key_path = directory / f"{stem!s}.pem", directory / f"{stem!s}.key"
        cert_path.write_bytes(self.pem())
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


@dataclass
class TestCA:
    """A CA (root or intermediate) with helpers to issue, revoke and build trust stores."""

    __test__ = False  # not a pytest test class

    cert: x509.Certificate
    key: PrivateKey
    parents: list[x509.Certificate] = field(default_factory=list)
    """Intermediates above this CA up to (excluding) the root, nearest first."""
    root: TestCA | None = None

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return ca_networks(self.cert)

    def issue(
        self,
        name: str = "alice",
        *,
        role: Role = Role.PEER,
        addresses: Sequence[str | IPAddress] | None = None,
        groups: Sequence[str] = (),
        routes: Sequence[str | IPNetwork] = (),
        dns_names: Sequence[str] = (),
        key: PrivateKey | None = None,
        key_type: str = "ecdsa-p256",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        serial: int | None = None,
        generation: int = 1,
    ) -> Leaf:
        """A certificate in the vpnd profile, via ``issue_certificate``."""
        if addresses is None:
            addresses = [next(iter(self.networks)).network_address + 2]
        leaf_key = key if key is not None else generate_key(key_type)
        cert = issue_certificate(
            ca_cert=self.cert,
            ca_key=self.key,
            name=name,
            public_key=leaf_key.public_key(),
            role=role,
            addresses=[ipaddress.ip_address(a) for a in addresses],
            groups=groups,
            routes=[ipaddress.ip_network(r) for r in routes],
            dns_names=dns_names,
            not_before=not_before or NOW - DAY,
            not_after=not_after or NOW + 30 * DAY,
            serial=serial,
            generation=generation,
        )
        return Leaf(cert=cert, key=leaf_key, chain=[cert, *self.chain_above()])

    def chain_above(self) -> list[x509.Certificate]:
        """What a leaf of this CA sends after itself: this CA if intermediate, and its parents."""
        if self.root is None:
            return []
        return [self.cert, *self.parents]

    def raw_leaf(
        self,
        name: str = "alice",
        *,
        key: AnyPrivateKey | None = None,
        eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        addresses: Sequence[str] | None = None,
        dns_names: Sequence[str] = (),
        san: bool = True,
        ca: bool = False,
        subject: x509.Name | None = None,
        extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        serial: int | None = None,
        signer: AnyPrivateKey | None = None,
        aki: bool = True,
    ) -> Leaf:
        """A leaf built directly with cryptography: for certificates vpnd would never issue."""
        leaf_key: AnyPrivateKey = (
            key if key is not None else ec.generate_private_key(ec.SECP256R1())
        )
        if addresses is None:
            addresses = [str(next(iter(self.networks)).network_address + 2)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject if subject is not None else cn_name(name))
            .issuer_name(self.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
            )
        )
        if aki:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if san:
            names: list[x509.GeneralName] = [
                x509.IPAddress(ipaddress.ip_address(a)) for a in addresses
            ]
            names += [x509.DNSName(d) for d in dns_names]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        sign_key = signer if signer is not None else self.key
        cert = builder.sign(sign_key, _hash_for(sign_key))
        return Leaf(cert=cert, key=leaf_key, chain=[cert, *self.chain_above()])

    def intermediate(
        self,
        name: str = "sub-ca",
        *,
        networks: Sequence[IPNetwork] | None = None,
        key: PrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        path_length: int | None = 0,
    ) -> TestCA:
        """An intermediate CA signed by this CA (the root needs path_length >= 1)."""
        sub_key = key if key is not None else generate_key("ecdsa-p256")
        nets = list(networks) if networks is not None else list(self.networks)
        ski = x509.SubjectKeyIdentifier.from_public_key(sub_key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(cn_name(name))
            .issuer_name(self.cert.subject)
            .public_key(sub_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - 10 * DAY)
            .not_valid_after(not_after or NOW + 300 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.NameConstraints([x509.IPAddress(n) for n in nets], None), critical=True
            )
            .sign(self.key, _hash_for(self.key))
        )
        return TestCA(
            cert=cert,
            key=sub_key,
            parents=self.chain_above(),
            root=self.root or self,
        )

    def crl(
        self,
        revoked: Iterable[Leaf | x509.Certificate | int] = (),
        *,
        number: int = 1,
        this_update: dt.datetime | None = None,
        next_update: dt.datetime | None = None,
        reason: x509.ReasonFlags | None = x509.ReasonFlags.key_compromise,
    ) -> x509.CertificateRevocationList:
        """This CA's CRL revoking ``revoked`` (leaves, certificates or serials)."""
        entries = []
        for item in revoked:
            serial = (
                item
                if isinstance(item, int)
                else (item.cert if isinstance(item, Leaf) else item).serial_number
            )
            entries.append(RevokedEntry(serial=serial, revoked_at=NOW - DAY, reason=reason))
        return build_crl(
            ca_cert=self.cert,
            ca_key=self.key,
            revoked=entries,
            crl_number=number,
            this_update=this_update or NOW - DAY,
            next_update=next_update or NOW + 7 * DAY,
        )

    def trust(
        self,
        *,
        revoked: Iterable[Leaf | x509.Certificate | int] = (),
        crls: Sequence[x509.CertificateRevocationList] | None = None,
        extra_roots: Sequence[x509.Certificate] = (),
        crl_required: bool = True,
        allow_stale_crl: bool = False,
    ) -> TrustStore:
        """Trust this CA's root; CRLs default to one fresh CRL per CA from root to here."""
        root = self.root or self
        if crls is None:
            crls = [self.crl(revoked)]
            if self.root is not None:
                crls.append(root.crl())
        return TrustStore(
            roots=(root.cert, *extra_roots),
            crls=tuple(crls),
            crl_required=crl_required,
            allow_stale_crl=allow_stale_crl,
        )

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``ca.pem`` and ``crl.pem`` (fresh, empty) into ``directory``."""
        ca_path, crl_path = directory / "ca.pem", directory / "crl.pem"
        ca_path.write_bytes(certificate_pem((self.root or self).cert))
        crl_path.write_bytes(crl_pem(self.crl()))
        return ca_path, crl_path


def make_ca(
    name: str = "test-ca",
    *,
    networks: Sequence[str | IPNetwork] = (NETWORK,),
    key_type: str = "ecdsa-p256",
    key: PrivateKey | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    path_length: int = 0,
) -> TestCA:
    """A root CA in the vpnd profile, valid from NOW - 10 days to NOW + 365 days."""
    ca_key = key if key is not None else generate_key(key_type)
    cert = create_ca(
        name=name,
        networks=[ipaddress.ip_network(n) for n in networks],
        key=ca_key,
        not_before=not_before or NOW - 10 * DAY,
        not_after=not_after or NOW + 365 * DAY,
        path_length=path_length,
    )
    return TestCA(cert=cert, key=ca_key)


# --- DER surgery: cryptography refuses to sign with SHA-1, so re-sign by hand. ---

_ECDSA_SHA1 = bytes.fromhex("300906072a8648ce3d0401")
_RSA_SHA1 = bytes.fromhex("300d06092a864886f70d0101050500")


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the TLV at ``pos``."""
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    n = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
    start = pos + 2 + n
    return tag, start, start + length


def resign_sha1(cert: x509.Certificate, signer: AnyPrivateKey) -> x509.Certificate:
    """``cert`` re-signed by ``signer`` (EC P-256 or RSA) with SHA-1, TBS algorithm patched."""
    der = cert.public_bytes(serialization.Encoding.DER)
    _, outer_start, _ = _read_tlv(der, 0)
    _, tbs_start, tbs_end = _read_tlv(der, outer_start)
    tbs = der[tbs_start:tbs_end]
    items = []
    pos = 0
    while pos < len(tbs):
        _, _, end = _read_tlv(tbs, pos)
        items.append(tbs[pos:end])
        pos = end
    if isinstance(signer, ec.EllipticCurvePrivateKey):
        alg = _ECDSA_SHA1
    elif isinstance(signer, rsa.RSAPrivateKey):
        alg = _RSA_SHA1
    else:
        raise TypeError("SHA-1 re-signing needs an EC or RSA key")
    sig_index = 2 if items[0][0] == 0xA0 else 1  # after [0] version and serial
    items[sig_index] = alg
    new_tbs = _tlv(0x30, b"".join(items))
    if isinstance(signer, ec.EllipticCurvePrivateKey):
        signature = signer.sign(new_tbs, ec.ECDSA(hashes.SHA1()))  # SHA-1 on purpose
    else:
        signature = signer.sign(new_tbs, padding.PKCS1v15(), hashes.SHA1())
    return x509.load_der_x509_certificate(
        _tlv(0x30, new_tbs + alg + _tlv(0x03, b"\x00" + signature))
    )
