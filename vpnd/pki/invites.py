"""Creating and listing invites (``vpnctl invite`` / ``vpnctl invites``).

An invite records a *pending* identity (the terms its certificate will carry: name,
overlay address, groups, routes) and a one-time secret, stored only as a hash. The
address is chosen by the usual lease rules inside the same transaction, and an
address held by another pending identity with an open invite counts as taken, so
30 invites in a row get 30 different addresses. No CA key is needed: nothing is
signed until the gateway's issuer redeems the invite.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from vpnd.pki.authority import ca_networks
from vpnd.pki.enrollment_token import (
    EnrollmentToken,
    ca_pin,
    hash_secret,
    new_invite,
    parse_server,
)
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import (
    STATE_PENDING,
    CertRecord,
    IdentityRecord,
    Inventory,
    InviteRecord,
)
from vpnd.pki.issue_terms import certificate_terms
from vpnd.pki.leases import check_in_networks, choose_addresses
from vpnd.pki.names import canonical_name

MAX_TTL_S = 30 * 86400.0
MIN_TTL_S = 60.0

INVITE_PENDING = "pending"
INVITE_USED = "used"
INVITE_EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Invited:
    token: EnrollmentToken
    invite: InviteRecord
    identity: IdentityRecord


def create_invite(
    inventory: Inventory,
    ca_cert: x509.Certificate,
    *,
    name: str,
    server: str,
    groups: Sequence[str] = (),
    addresses: Sequence[IPAddress] = (),
    routes: Sequence[IPNetwork] = (),
    ttl_s: float,
    now: dt.datetime,
) -> Invited:
    """Record a pending identity and an invite for ``name``; PkiError when refused."""
    cn = canonical_name(name)
    parse_server(server)
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise PkiError("an invite lives between 1 minute and 30 days (--ttl)")
    terms = certificate_terms(
        role=Role.PEER, addresses=addresses, groups=groups, routes=routes, dns_names=(), days=None
    )
    networks = ca_networks(ca_cert)
    for addr in terms.wanted:
        check_in_networks(addr, networks)
    invite_id, secret = new_invite()
    expires = now + dt.timedelta(seconds=ttl_s)
    with inventory.transaction():
        generation = _refuse_taken_name(inventory, cn, now)
        store = _PendingLeases(inventory, now)
        chosen = choose_addresses(
            store, cn=cn, role=Role.PEER, wanted=terms.wanted, networks=networks, now=now
        )
        identity = IdentityRecord(
            name=cn,
            role=Role.PEER,
            addresses=chosen,
            groups=terms.groups,
            routes=terms.routes,
            dns_names=(),
            generation=generation,
            current_serial=None,
            state=STATE_PENDING,
            updated_at=now,
        )
        invite = InviteRecord(
            invite_id=invite_id,
            name=cn,
            secret_hash=hash_secret(invite_id, secret),
            server=server,
            created_at=now,
            expires_at=expires,
        )
        inventory.put_identity(identity)
        inventory.add_invite(invite)
    token = EnrollmentToken(server, ca_pin(ca_cert), invite_id, secret)
    return Invited(token=token, invite=invite, identity=identity)


def invite_status(invite: InviteRecord, now: dt.datetime) -> str:
    if invite.used_at is not None:
        return INVITE_USED
    if now >= invite.expires_at:
        return INVITE_EXPIRED
    return INVITE_PENDING


def _refuse_taken_name(inventory: Inventory, cn: str, now: dt.datetime) -> int:
    """The generation the invited name's first certificate will carry; PkiError while the
    name holds a valid certificate (a revoked or expired name may be invited again)."""
    valid = [r for r in inventory.by_name(cn) if r.is_valid(now)]
    if valid:
        raise PkiError(
            f"{cn!r} already has a valid certificate (serial {valid[-1].serial_hex}); "
            "an invite is for a new name, or one whose certificates are revoked"
        )
    current = inventory.identity(cn)
    if current is None:
        return 1
    # Re-enrolling a name goes on counting: an old certificate never looks current.
    return current.generation + 1 if current.current_serial is not None else current.generation


class _PendingLeases:
    """The inventory's leases plus the addresses of pending identities whose invite is
    still open, as if each held a certificate until its invite expires."""

    def __init__(self, inventory: Inventory, now: dt.datetime) -> None:
        self._inv = inventory
        self._held: dict[IPAddress, list[CertRecord]] = {}
        open_until: dict[str, dt.datetime] = {}
        for invite in inventory.invites():
            if invite_status(invite, now) == INVITE_PENDING:
                prev = open_until.get(invite.name)
                open_until[invite.name] = max(prev or invite.expires_at, invite.expires_at)
        for ident in inventory.identities():
            until = open_until.get(ident.name)
            if ident.state == STATE_PENDING and until is not None:
                for addr in ident.addresses:
                    self._held.setdefault(addr, []).append(_placeholder(ident, until))

    def all_certificates(self) -> list[CertRecord]:
        return self._inv.all_certificates()

    def by_name(self, name: str) -> list[CertRecord]:
        return self._inv.by_name(name)

    def holders(self, address: IPAddress, now: dt.datetime) -> list[CertRecord]:
        return self._inv.holders(address, now) + self._held.get(address, [])

    def leased_addresses(self, now: dt.datetime) -> dict[IPAddress, list[CertRecord]]:
        held = self._inv.leased_addresses(now)
        for addr, recs in self._held.items():
            held[addr] = held.get(addr, []) + recs
        return held


def _placeholder(ident: IdentityRecord, until: dt.datetime) -> CertRecord:
    """A stand-in record for a pending identity's address (serial 0: never a real one)."""
    return CertRecord(
        serial=0,
        name=ident.name,
        role=ident.role,
        addresses=ident.addresses,
        groups=ident.groups,
        routes=ident.routes,
        dns_names=(),
        not_before=ident.updated_at,
        not_after=until,
        fingerprint="",
        issued_at=ident.updated_at,
    )
