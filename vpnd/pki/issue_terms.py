"""What a new certificate may carry: names by role, DNS names, routes and lifetime.

Pure checks, run before the inventory is locked (except the name rule, which reads
the store inside the issuing transaction). Every refusal is a ``PkiError``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import STATE_ACTIVE, CertRecord, IdentityRecord
from vpnd.pki.keys import fingerprint
from vpnd.pki.names import canonical_dns_name, canonical_group
from vpnd.pki.profile import describe_certificate, generation_of

DEFAULT_CA_DAYS = 3650
DEFAULT_PEER_DAYS = 90
DEFAULT_GATEWAY_DAYS = 365
DEFAULT_CRL_DAYS = 7
# Certificates start a little in the past so a gateway whose clock lags the admin's
# does not see them as not-yet-valid.
BACKDATE = dt.timedelta(minutes=5)


def backdate_for(lifetime_s: float) -> dt.timedelta:
    """The backdate of a short-lived certificate: at most a tenth of its lifetime, so the
    renewal schedule (a fraction of notAfter - notBefore) still lies in its future."""
    return min(BACKDATE, dt.timedelta(seconds=lifetime_s / 10))


class NameRecords(Protocol):
    def by_name(self, name: str) -> list[CertRecord]: ...


class IdentityRecords(Protocol):
    def identity(self, name: str) -> IdentityRecord | None: ...


@dataclass(frozen=True, slots=True)
class Terms:
    """A certificate's contents, canonicalised and checked; addresses not yet leased."""

    role: Role
    wanted: tuple[IPAddress, ...]
    """Explicit addresses (deduplicated), empty to let the lease rules choose."""
    groups: tuple[str, ...]
    routes: tuple[IPNetwork, ...]
    dns_names: tuple[str, ...]
    days: int


def certificate_terms(
    *,
    role: Role,
    addresses: Sequence[IPAddress],
    groups: Sequence[str],
    routes: Sequence[IPNetwork],
    dns_names: Sequence[str],
    days: int | None,
) -> Terms:
    role = Role(role)
    dns = tuple(dict.fromkeys(canonical_dns_name(d) for d in dns_names))
    if role is Role.GATEWAY and not dns:
        raise PkiError("a gateway certificate needs at least one DNS name (--dns NAME)")
    if role is Role.PEER and dns:
        raise PkiError("DNS names are for gateway certificates only (add --gateway)")
    nets = tuple(dict.fromkeys(routes))
    for net in nets:
        if net.prefixlen == 0:
            raise PkiError(
                f"route {net} is a default route: full tunnel is a client mode, not a "
                "certificate route; give the site's own subnets"
            )
    if days is None:
        days = DEFAULT_GATEWAY_DAYS if role is Role.GATEWAY else DEFAULT_PEER_DAYS
    positive_days(days, "certificate lifetime")
    return Terms(
        role=role,
        wanted=tuple(dict.fromkeys(addresses)),
        groups=tuple(dict.fromkeys(canonical_group(g) for g in groups)),
        routes=nets,
        dns_names=dns,
        days=days,
    )


@dataclass(frozen=True, slots=True)
class Validity:
    not_before: dt.datetime
    not_after: dt.datetime
    warnings: tuple[str, ...]
    """E.g. the lifetime was capped to the CA's expiry."""


def validity(ca_cert: x509.Certificate, now: dt.datetime, days: int) -> Validity:
    """The validity window of a certificate issued ``now``; refused outside the CA's."""
    ca_not_after = ca_cert.not_valid_after_utc
    if now >= ca_not_after:
        raise PkiError(f"the CA expired on {_day(ca_not_after)}; it cannot issue (create a new CA)")
    if now < ca_cert.not_valid_before_utc:
        raise PkiError(f"the CA is not valid before {ca_cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z")
    warnings: list[str] = []
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_not_after:
        not_after = ca_not_after
        warnings.append(f"capped to the CA's expiry {_day(ca_not_after)} (asked for {days} days)")
    not_before = max(now - BACKDATE, ca_cert.not_valid_before_utc)
    return Validity(not_before, not_after, tuple(warnings))


RENEW_AT = 0.67
"""Where in its lifetime a client renews (``renewal.at``, the client's default)."""


def next_renewal(
    not_before: dt.datetime, not_after: dt.datetime, at: float = RENEW_AT
) -> dt.datetime:
    """When a client renews a certificate: at ``at`` of its lifetime (before its jitter)."""
    return (not_before + (not_after - not_before) * at).replace(microsecond=0)


def positive_days(days: int, what: str) -> None:
    if days <= 0:
        raise PkiError(f"{what} must be at least 1 day, not {days}")


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d")


def refuse_name_collision(
    store: NameRecords, cn: str, role: Role, now: dt.datetime, *, command: str | None
) -> None:
    """A peer and a gateway never share a name (``revoke NAME`` would revoke both);
    with ``command``, a valid certificate of the name refuses it (no silent takeover)."""
    records = store.by_name(cn)
    if role is Role.PEER:
        gateways = [r for r in records if r.role is Role.GATEWAY]
        if gateways:
            raise PkiError(
                f"{cn!r} is the name of a gateway (serial {gateways[-1].serial_hex}): a peer "
                "can never take a gateway's name; pick another one (--name)"
            )
    else:
        peers = [r for r in records if r.role is Role.PEER and r.is_valid(now)]
        if peers:
            raise PkiError(
                f"{cn!r} is the name of a peer (serial {peers[-1].serial_hex}): a gateway "
                "can never take a peer's name; pick another one"
            )
    if command is None:
        return
    valid = [r for r in records if r.role is role and r.is_valid(now)]
    if valid:
        h = valid[-1]
        raise PkiError(
            f"{cn!r} already has a valid certificate (serial {h.serial_hex}, valid until "
            f"{_day(h.not_after)}); a new one takes over its address and ends its session: "
            f"pass --replace if that is intended, or --name to pick another name"
        )


def record_of(cert: x509.Certificate, *, issued_at: dt.datetime, issuer_fp: str = "") -> CertRecord:
    """The inventory record of a certificate just issued (``issuer_fp``: the signer's
    SHA-256 fingerprint)."""
    info = describe_certificate(cert)
    return CertRecord(
        serial=cert.serial_number,
        name=info.name,
        role=Role(info.role),
        addresses=tuple(info.addresses),
        groups=tuple(info.groups),
        routes=tuple(info.routes),
        dns_names=tuple(info.dns_names),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
        issued_at=issued_at,
        generation=generation_of(cert),
        issuer_fp=issuer_fp,
    )


def next_generation(store: IdentityRecords, cn: str) -> int:
    """The generation a fresh certificate of ``cn`` gets: 1 for a new name, else one more
    than the identity's (a re-issue must never look older than what it replaces)."""
    current = store.identity(cn)
    if current is None:
        return 1
    # A pending (invited) identity has no certificate yet: its first one is its generation.
    return current.generation if current.current_serial is None else current.generation + 1


def identity_of(record: CertRecord, *, now: dt.datetime) -> IdentityRecord:
    """The (active) identity a freshly issued certificate stands for."""
    return IdentityRecord(
        name=record.name,
        role=record.role,
        addresses=record.addresses,
        groups=record.groups,
        routes=record.routes,
        dns_names=record.dns_names,
        generation=record.generation,
        current_serial=record.serial,
        state=STATE_ACTIVE,
        updated_at=now,
    )
