"""The vpnd certificate profile: the peer-attributes extension, and a describer for humans.

Peer attributes extension (OID ``OID_PEER_ATTRIBUTES``, always non-critical)::

    PeerAttributes ::= SEQUENCE {
        groups  SEQUENCE SIZE (0..64)  OF UTF8String,   -- canonical group names
        routes  SEQUENCE SIZE (0..256) OF OCTET STRING  -- network address (4 or 16
                                                        -- bytes) || prefix length (1 byte)
    }

The value is DER. Decoding is strict: it re-encodes the result and refuses anything
that is not the exact DER of a valid value (garbage, BER forms, trailing bytes, bad
group names, host bits set in a route, too many entries).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, namedtype, univ

from vpnd.pki.extensions import all_extensions, get_extension_or_none
from vpnd.pki.identity import (
    OID_GENERATION,
    OID_PEER_ATTRIBUTES,
    IPAddress,
    IPNetwork,
    PkiError,
)
from vpnd.pki.keys import fingerprint, key_type
from vpnd.pki.names import canonical_group

MAX_GROUPS = 64
MAX_ROUTES = 256
# Generous upper bound on the encoded size (64 * 65 + 256 * 19 + headers).
MAX_EXTENSION_BYTES = 16 * 1024

PEER_ATTRIBUTES_OID = x509.ObjectIdentifier(OID_PEER_ATTRIBUTES)
GENERATION_OID = x509.ObjectIdentifier(OID_GENERATION)
# A generation is a renewal counter: 2**62 renewals will not happen, a larger value is abuse.
MAX_GENERATION = (1 << 62) - 1


class _Groups(univ.SequenceOf):  # type: ignore[misc]
    componentType = char.UTF8String()


class _Routes(univ.SequenceOf):  # type: ignore[misc]
    componentType = univ.OctetString()


class _PeerAttributesAsn1(univ.Sequence):  # type: ignore[misc]
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("groups", _Groups()),
        namedtype.NamedType("routes", _Routes()),
    )


@dataclass(frozen=True)
class PeerAttributes:
    """What the peer-attributes extension says: firewall groups and routed subnets."""

    groups: tuple[str, ...] = ()
    routes: tuple[IPNetwork, ...] = ()


def _route_bytes(net: IPNetwork) -> bytes:
    return net.network_address.packed + bytes([net.prefixlen])


def _route_from_bytes(raw: bytes) -> IPNetwork:
    if len(raw) not in (5, 17):
        raise PkiError(f"peer attributes: a route is {len(raw)} bytes, expected 5 or 17")
    addr, prefix = raw[:-1], raw[-1]
    try:
        if len(addr) == 4:
            return ipaddress.IPv4Network((addr, prefix))
        return ipaddress.IPv6Network((addr, prefix))
    except ValueError as exc:
        raise PkiError(f"peer attributes: invalid route: {exc}") from None


def encode_peer_attributes(attrs: PeerAttributes) -> bytes:
    """DER of the extension value; groups must already be canonical, without duplicates."""
    if len(attrs.groups) > MAX_GROUPS:
        raise PkiError(f"too many groups: {len(attrs.groups)} (at most {MAX_GROUPS})")
    if len(attrs.routes) > MAX_ROUTES:
        raise PkiError(f"too many routes: {len(attrs.routes)} (at most {MAX_ROUTES})")
    for group in attrs.groups:
        if canonical_group(group) != group:
            raise PkiError(f"group {group!r} is not in canonical form")
    if len(set(attrs.groups)) != len(attrs.groups):
        raise PkiError("duplicate group names")
    for route in attrs.routes:
        if not isinstance(route, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PkiError(f"route {route!r} is not an IP network")
    if len(set(attrs.routes)) != len(attrs.routes):
        raise PkiError("duplicate routes")
    value = _PeerAttributesAsn1()
    groups = _Groups()
    groups.extend([char.UTF8String(g) for g in attrs.groups])
    routes = _Routes()
    routes.extend([univ.OctetString(_route_bytes(r)) for r in attrs.routes])
    value["groups"] = groups
    value["routes"] = routes
    return bytes(der_encoder.encode(value))


def decode_peer_attributes(der: bytes) -> PeerAttributes:
    """Parse the extension value; PkiError on anything but the exact DER of a valid value."""
    if len(der) > MAX_EXTENSION_BYTES:
        raise PkiError(f"peer attributes: {len(der)} bytes is too large")
    raw_groups, raw_routes = _decode_der(der)
    if len(raw_groups) > MAX_GROUPS:
        raise PkiError(f"peer attributes: {len(raw_groups)} groups (at most {MAX_GROUPS})")
    if len(raw_routes) > MAX_ROUTES:
        raise PkiError(f"peer attributes: {len(raw_routes)} routes (at most {MAX_ROUTES})")
    _check_groups(raw_groups)
    routes = tuple(_route_from_bytes(r) for r in raw_routes)
    if len(set(routes)) != len(routes):
        raise PkiError("peer attributes: duplicate routes")
    return PeerAttributes(groups=tuple(raw_groups), routes=routes)


def _decode_der(der: bytes) -> tuple[list[str], list[bytes]]:
    """The raw group names and route bytes of exactly-DER ``der``."""
    try:
        value, rest = der_decoder.decode(der, asn1Spec=_PeerAttributesAsn1())
        if rest:
            raise PkiError(f"peer attributes: {len(rest)} trailing bytes")
        if bytes(der_encoder.encode(value)) != bytes(der):
            raise PkiError("peer attributes: not DER encoded")
        return [str(g) for g in value["groups"]], [bytes(r) for r in value["routes"]]
    except PkiError:
        raise
    except (PyAsn1Error, UnicodeError, ValueError, TypeError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise PkiError(f"peer attributes: not a valid DER value ({detail})") from None


def _check_groups(raw_groups: list[str]) -> None:
    for group in raw_groups:
        try:
            ok = canonical_group(group) == group
        except PkiError:
            ok = False
        if not ok:
            raise PkiError(f"peer attributes: invalid group name {group[:40]!r}")
    if len(set(raw_groups)) != len(raw_groups):
        raise PkiError("peer attributes: duplicate group names")


def peer_attributes_of(cert: x509.Certificate) -> PeerAttributes:
    """The certificate's peer attributes (empty when the extension is absent); PkiError if bad."""
    try:
        ext = all_extensions(cert).get_extension_for_oid(PEER_ATTRIBUTES_OID)
    except x509.ExtensionNotFound:
        return PeerAttributes()
    if ext.critical:
        raise PkiError("peer attributes extension must not be critical")
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise PkiError("peer attributes extension has an unexpected type")
    return decode_peer_attributes(value.value)


def encode_generation(generation: int) -> bytes:
    """DER INTEGER of a generation (1 .. MAX_GENERATION)."""
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise PkiError(f"generation must be an integer, not {type(generation).__name__}")
    if not 1 <= generation <= MAX_GENERATION:
        raise PkiError(f"generation must be between 1 and {MAX_GENERATION}, not {generation}")
    return bytes(der_encoder.encode(univ.Integer(generation)))


def decode_generation(der: bytes) -> int:
    """Parse the generation extension value; PkiError unless exact DER of 1..MAX_GENERATION."""
    if len(der) > 16:
        raise PkiError(f"generation: {len(der)} bytes is too large")
    try:
        value, rest = der_decoder.decode(der, asn1Spec=univ.Integer())
        number = int(value)
        exact = bytes(der_encoder.encode(univ.Integer(number))) == bytes(der)
    except (PyAsn1Error, ValueError, TypeError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise PkiError(f"generation: not a valid DER INTEGER ({detail})") from None
    if rest:
        raise PkiError(f"generation: {len(rest)} trailing bytes")
    if not exact:
        raise PkiError("generation: not DER encoded")
    if not 1 <= number <= MAX_GENERATION:
        raise PkiError(f"generation: {number} is out of range (1 to {MAX_GENERATION})")
    return number


def generation_of(cert: x509.Certificate) -> int:
    """The certificate's generation (1 when the extension is absent); PkiError if bad."""
    try:
        ext = all_extensions(cert).get_extension_for_oid(GENERATION_OID)
    except x509.ExtensionNotFound:
        return 1
    if ext.critical:
        raise PkiError("generation extension must not be critical")
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise PkiError("generation extension has an unexpected type")
    return decode_generation(value.value)


_EKU_NAMES = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


@dataclass(frozen=True)
class CertificateInfo:
    """A human/JSON view of any certificate; fields missing from a foreign profile are empty."""

    name: str
    role: str
    """"peer", "gateway", "ca" or "unknown"."""
    serial: int
    issuer: str
    subject: str
    addresses: tuple[IPAddress, ...]
    dns_names: tuple[str, ...]
    groups: tuple[str, ...]
    routes: tuple[IPNetwork, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    eku: tuple[str, ...]
    is_ca: bool
    key_type: str
    generation: int = 1
    """The generation extension (1 when absent or unreadable)."""

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict; the serial is lowercase hex (too big for JSON numbers)."""
        return {
            "name": self.name,
            "role": self.role,
            "serial": f"{self.serial:x}",
            "issuer": self.issuer,
            "subject": self.subject,
            "addresses": [str(a) for a in self.addresses],
            "dns_names": list(self.dns_names),
            "groups": list(self.groups),
            "routes": [str(r) for r in self.routes],
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "fingerprint": self.fingerprint,
            "eku": list(self.eku),
            "is_ca": self.is_ca,
            "key_type": self.key_type,
            "generation": self.generation,
        }


def _safe_name(name_fn: object) -> str:
    try:
        return str(name_fn() if callable(name_fn) else name_fn)
    except Exception:
        return ""


def describe_certificate(cert: x509.Certificate) -> CertificateInfo:
    """Summarise any parseable certificate; never raises on a foreign or broken profile."""
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(cns[0].value) if cns else ""
    except Exception:
        name = ""
    bc = get_extension_or_none(cert, x509.BasicConstraints)
    is_ca = isinstance(bc, x509.BasicConstraints) and bc.ca
    eku_value = get_extension_or_none(cert, x509.ExtendedKeyUsage)
    eku_oids = list(eku_value) if isinstance(eku_value, x509.ExtendedKeyUsage) else []
    eku = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku_oids)
    san = get_extension_or_none(cert, x509.SubjectAlternativeName)
    addresses: tuple[IPAddress, ...] = ()
    dns_names: tuple[str, ...] = ()
    if isinstance(san, x509.SubjectAlternativeName):
        addresses = tuple(
            v
            for v in san.get_values_for_type(x509.IPAddress)
            if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address)
        )
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
    try:
        attrs = peer_attributes_of(cert)
    except PkiError:
        attrs = PeerAttributes()
    if is_ca:
        role = "ca"
    elif eku == ("clientAuth",):
        role = "peer"
    elif eku == ("serverAuth",):
        role = "gateway"
    else:
        role = "unknown"
    try:
        ktype = key_type(cert.public_key())
    except Exception:
        ktype = "unknown"
    try:
        generation = generation_of(cert)
    except PkiError:
        generation = 1
    return CertificateInfo(
        name=name,
        role=role,
        serial=cert.serial_number,
        issuer=_safe_name(cert.issuer.rfc4514_string),
        subject=_safe_name(cert.subject.rfc4514_string),
        addresses=addresses,
        dns_names=dns_names,
        groups=attrs.groups,
        routes=attrs.routes,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
        eku=eku,
        is_ca=is_ca,
        key_type=ktype,
        generation=generation,
    )
