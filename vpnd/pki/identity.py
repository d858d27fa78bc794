"""What a verified certificate tells us about a peer, and why verification can fail.

``PeerIdentity`` is built once, by ``vpnd.pki.verify_peer``; policy and the data path
only ever read it. ``Reason`` values are stable strings: they appear in logs, in the
control API, in CLOSE frames and in the audit log, so never rename one.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Project OID arc: 2.25.<uuid 7be74b6d-f50e-49ee-97a3-c72021af0b4d as an integer>.
# Minted once; never change it (it is baked into every issued certificate).
OID_ARC = "2.25.164695993948297286981162688541409348429"
# Non-critical extension carrying a peer's groups and routed subnets.
OID_PEER_ATTRIBUTES = f"{OID_ARC}.1"
# Non-critical extension carrying the certificate's generation: a DER INTEGER >= 1 that
# each renewal increments (absent means 1), so a copy of an older certificate shows.
OID_GENERATION = f"{OID_ARC}.2"


class Role(enum.StrEnum):
    """Which side of a tunnel a certificate is for."""

    PEER = "peer"  # EKU clientAuth
    GATEWAY = "gateway"  # EKU serverAuth


class Reason(enum.StrEnum):
    """Stable reason codes for a refused certificate (and, later, a closed session)."""

    NO_CERTIFICATE = "no_certificate"
    UNKNOWN_CA = "unknown_ca"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    CRL_MISSING = "crl_missing"
    CRL_STALE = "crl_stale"
    CRL_INVALID = "crl_invalid"
    WRONG_EKU = "wrong_eku"
    NO_EKU = "no_eku"
    WEAK_KEY = "weak_key"
    WEAK_SIGNATURE = "weak_signature"
    CA_AS_LEAF = "ca_as_leaf"
    NO_SAN = "no_san"
    BAD_NAME = "bad_name"
    ADDRESS_OUTSIDE_NETWORK = "address_outside_network"
    NAME_CONSTRAINTS = "name_constraints"
    BAD_EXTENSION = "bad_extension"
    CHAIN_INVALID = "chain_invalid"
    MALFORMED = "malformed"
    NAME_MISMATCH = "name_mismatch"
    """A gateway certificate does not carry the name the client pinned (server_name)."""
    SUPERSEDED = "superseded"
    """A renewal replaced this certificate (inventory / CRL reason superseded)."""
    POSSIBLE_COPY = "possible_copy"
    """An older generation than the peer's current, valid certificate: a clone."""


class PkiError(Exception):
    """A PKI operation was refused; ``str(err)`` is one actionable line for a human."""


class VerifyError(PkiError):
    """A certificate (chain) failed verification."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """A verified certificate, reduced to what the rest of vpnd needs."""

    name: str
    """Canonical peer name (the certificate's CN)."""
    role: Role
    """peer (clientAuth) or gateway (serverAuth)."""
    serial: int
    """Certificate serial number; revocation is keyed by (issuer, serial)."""
    issuer: str
    """RFC 4514 string of the issuing CA's subject."""
    fingerprint: str
    """SHA-256 of the certificate DER, lowercase hex: safe to log."""
    addresses: tuple[IPAddress, ...]
    """Overlay addresses from the SAN iPAddress entries."""
    routes: tuple[IPNetwork, ...] = ()
    """Subnets a site-to-site peer may route (custom extension)."""
    groups: frozenset[str] = field(default_factory=frozenset)
    """Firewall groups (custom extension)."""
    dns_names: tuple[str, ...] = ()
    """SAN dNSName entries (gateways, for pinning)."""
    not_before: dt.datetime = dt.datetime.min.replace(tzinfo=dt.UTC)  # noqa: RUF009 - immutable
    not_after: dt.datetime = dt.datetime.max.replace(tzinfo=dt.UTC)  # noqa: RUF009 - immutable
    chain_serials: tuple[tuple[str, int], ...] = ()
    """(issuer, serial) of every non-root cert in the verified chain, leaf first:
    what a live CRL re-check needs to find revoked intermediates."""
    generation: int = 1
    """Renewal generation from the generation extension (1 when absent)."""
    lineage: str = ""
    """The verified root's DN without generationQualifier: a rotated root is the same CA
    (``vpnd.pki.names.lineage``); empty when not known."""
    root_fingerprint: str = ""
    """SHA-256 of the root the chain was verified to (which CA of a rotation)."""

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"
