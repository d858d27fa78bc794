"""The certificate authority: create a CA, issue peer/gateway certificates, handle CSRs.

Everything here validates its inputs and raises ``PkiError`` with one actionable line;
it never produces a certificate outside the vpnd profile (see ``vpnd.pki.profile``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vpnd.pki.extensions import get_extension, get_extension_or_none
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.keys import (
    KEY_TYPES_CA,
    KEY_TYPES_LEAF,
    PrivateKey,
    PublicKey,
    key_type,
    public_key_of,
)
from vpnd.pki.names import canonical_dns_name, canonical_group, canonical_name
from vpnd.pki.profile import (
    GENERATION_OID,
    PEER_ATTRIBUTES_OID,
    PeerAttributes,
    encode_generation,
    encode_peer_attributes,
)

MAX_SERIAL = (1 << 159) - 1
MAX_ADDRESSES = 64
MAX_DNS_NAMES = 16


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _utc(when: dt.datetime, what: str) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise PkiError(f"{what} must be a timezone-aware datetime")
    # Certificates carry whole seconds; truncate so checks match what gets encoded.
    return when.astimezone(dt.UTC).replace(microsecond=0)


def signature_hash(signer: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash vpnd signs with for this key: SHA-384 for P-384, SHA-256 for P-256."""
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(signer.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


def _check_ca_key(key: object) -> PrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key_type(key) not in KEY_TYPES_CA:
        raise PkiError(
            f"a CA key must be one of {', '.join(KEY_TYPES_CA)}, not {key_type(key)} "
            "(cryptography's verifier refuses other CA keys)"
        )
    return key


def _same_key(a: object, b: object) -> bool:
    enc, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return bool(a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt))  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False


def check_ca_pair(ca_cert: x509.Certificate, ca_key: PrivateKey) -> None:
    """Refuse a CA certificate that is not a CA, or a key that does not belong to it."""
    _check_ca_key(ca_key)
    bc = get_extension_or_none(ca_cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise PkiError("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
    if not _same_key(ca_cert.public_key(), ca_key.public_key()):
        raise PkiError("the CA key does not match the CA certificate")


def _networks(networks: Sequence[IPNetwork]) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for net in networks:
        if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PkiError(f"{net!r} is not an IP network")
        if net not in out:
            out.append(net)
    if not out:
        raise PkiError("a CA needs at least one overlay network")
    return out


def create_ca(
    *,
    name: str,
    networks: Sequence[IPNetwork],
    key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int = 1,
) -> x509.Certificate:
    """A self-signed CA whose name constraints permit exactly the overlay ``networks``.

    Path length 1: room for exactly one issuing CA below it (``vpnctl ca issuer``).
    """
    cn = canonical_name(name)
    nets = _networks(networks)
    signer = _check_ca_key(key)
    nb, na = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    if na <= nb:
        raise PkiError("the CA's not_after must be later than its not_before")
    if not isinstance(path_length, int) or not 0 <= path_length <= 8:
        raise PkiError(f"path length must be between 0 and 8, not {path_length!r}")
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # _check_ca_key: EC only
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_cn(cn))
        .issuer_name(_cn(cn))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
    )
    builder = ca_extensions(builder, public, path_length)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
    ).add_extension(ip_constraints(nets), critical=True)
    return builder.sign(signer, signature_hash(signer))


def ca_extensions(
    builder: x509.CertificateBuilder, public: ec.EllipticCurvePublicKey, path_length: int
) -> x509.CertificateBuilder:
    """What every vpnd CA carries: CA with ``path_length``, keyCertSign + cRLSign, SKI."""
    return (
        builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def ip_constraints(networks: Sequence[IPNetwork]) -> x509.NameConstraints:
    """Name constraints permitting exactly the overlay ``networks``."""
    return x509.NameConstraints(
        permitted_subtrees=[x509.IPAddress(n) for n in networks], excluded_subtrees=None
    )


def ca_networks(ca_cert: x509.Certificate) -> tuple[IPNetwork, ...]:
    """The overlay networks a CA may issue for: its permitted IP name-constraint subtrees."""
    try:
        nc = get_extension(ca_cert, x509.NameConstraints)
    except PkiError as exc:
        raise PkiError(f"the CA certificate has {exc}") from None
    if nc is None:
        raise PkiError("the CA certificate has no name constraints (no overlay networks)")
    nets = tuple(
        gn.value
        for gn in (nc.permitted_subtrees or ())
        if isinstance(gn, x509.IPAddress)
        and isinstance(gn.value, ipaddress.IPv4Network | ipaddress.IPv6Network)
    )
    if not nets:
        raise PkiError("the CA certificate permits no IP networks in its name constraints")
    return nets


def _addresses(addresses: Sequence[IPAddress], nets: tuple[IPNetwork, ...]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for addr in addresses:
        if not isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise PkiError(f"{addr!r} is not an IP address")
        if not any(addr in net for net in nets):
            shown = ", ".join(str(n) for n in nets)
            raise PkiError(f"address {addr} is outside the CA's overlay networks ({shown})")
        if addr not in out:
            out.append(addr)
    if not out:
        raise PkiError("a certificate needs at least one overlay address")
    if len(out) > MAX_ADDRESSES:
        raise PkiError(f"too many addresses: {len(out)} (at most {MAX_ADDRESSES})")
    return out


def _leaf_key(public_key: object) -> PublicKey:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey) and key_type(public_key) in KEY_TYPES_LEAF:
        return public_key
    raise PkiError(
        f"a peer/gateway key must be one of {', '.join(KEY_TYPES_LEAF)}, not {key_type(public_key)}"
    )


def issue_certificate(
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    name: str,
    public_key: PublicKey,
    role: Role,
    addresses: Sequence[IPAddress],
    groups: Sequence[str] = (),
    routes: Sequence[IPNetwork] = (),
    dns_names: Sequence[str] = (),
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int | None = None,
    generation: int = 1,
) -> x509.Certificate:
    """Issue a peer (clientAuth) or gateway (serverAuth) certificate in the vpnd profile.

    Groups are canonicalised, de-duplicated and sorted; routes de-duplicated and sorted.
    ``generation`` (1 for a first issue, +1 per renewal) goes in the generation extension.
    """
    cn = canonical_name(name)
    check_ca_pair(ca_cert, ca_key)
    role = Role(role)
    leaf_key = _leaf_key(public_key)
    addrs = _addresses(addresses, ca_networks(ca_cert))
    dns = sorted({canonical_dns_name(d) for d in dns_names})
    if dns and role is not Role.GATEWAY:
        raise PkiError("DNS names are for gateway certificates only")
    if len(dns) > MAX_DNS_NAMES:
        raise PkiError(f"too many DNS names: {len(dns)} (at most {MAX_DNS_NAMES})")
    group_names = tuple(sorted({canonical_group(g) for g in groups}))
    for route in routes:
        if not isinstance(route, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PkiError(f"route {route!r} is not an IP network")
    route_nets = tuple(sorted(set(routes), key=lambda n: (n.version, n)))
    extension = encode_peer_attributes(PeerAttributes(groups=group_names, routes=route_nets))
    generation_der = encode_generation(generation)
    nb, na = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    if na <= nb:
        raise PkiError("not_after must be later than not_before")
    if nb >= ca_cert.not_valid_after_utc:
        raise PkiError("the CA has expired: renew the CA first")
    if na > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"not_after {na.isoformat()} is after the CA expires "
            f"({ca_cert.not_valid_after_utc.isoformat()}): shorten the lifetime"
        )
    if serial is None:
        serial = x509.random_serial_number()
    if not isinstance(serial, int) or not 0 < serial <= MAX_SERIAL:
        raise PkiError("serial must be a positive integer of at most 159 bits")
    aki = authority_key_identifier(ca_cert, ca_key)
    is_ec = isinstance(leaf_key, ec.EllipticCurvePublicKey)
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if role is Role.PEER else ExtendedKeyUsageOID.SERVER_AUTH
    san: list[x509.GeneralName] = [x509.IPAddress(a) for a in addrs]
    san += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_cn(cn))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key)
        .serial_number(serial)
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=is_ec,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.UnrecognizedExtension(PEER_ATTRIBUTES_OID, extension), critical=False)
        .add_extension(x509.UnrecognizedExtension(GENERATION_OID, generation_der), critical=False)
    )
    return builder.sign(ca_key, signature_hash(ca_key))


def authority_key_identifier(
    ca_cert: x509.Certificate, ca_key: PrivateKey
) -> x509.AuthorityKeyIdentifier:
    """AKI for what this CA signs: from its SKI when it has one, else from its key."""
    ski = get_extension_or_none(ca_cert, x509.SubjectKeyIdentifier)
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())


def csr_for(*, name: str, key: PrivateKey) -> x509.CertificateSigningRequest:
    """A CSR carrying only the canonical name and the public key (`vpnd keygen`)."""
    cn = canonical_name(name)
    _leaf_key(key.public_key())
    return (
        x509.CertificateSigningRequestBuilder().subject_name(_cn(cn)).sign(key, signature_hash(key))
    )


def verify_csr(csr: x509.CertificateSigningRequest) -> tuple[str, PublicKey]:
    """Check the CSR's self-signature; return its canonical CN and key.

    Requested extensions are ignored by design: the CA decides addresses, groups and EKU.
    """
    try:
        valid = csr.is_signature_valid
    except Exception as exc:
        raise PkiError(f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise PkiError("CSR signature is invalid")
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise PkiError(f"CSR subject is malformed: {exc}") from None
    if len(cns) != 1:
        raise PkiError(f"CSR subject must hold exactly one CN, it holds {len(cns)}")
    cn_value = cns[0].value
    if not isinstance(cn_value, str):
        raise PkiError("CSR common name is not a string")
    name = canonical_name(cn_value)
    key = _leaf_key(public_key_of(csr))
    return name, key
