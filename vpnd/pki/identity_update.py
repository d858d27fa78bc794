"""Changing a name's standing terms in the inventory (``vpnctl update``).

The identity record is what the next certificate of the name carries: the gateway
signs renewals from it, and applies its groups at once as a ceiling over the groups
of the certificate still in use. Nothing is signed here, so no CA key is needed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from vpnd.pki.authority import ca_networks
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import IdentityRecord, Inventory
from vpnd.pki.issue_terms import certificate_terms, next_renewal
from vpnd.pki.leases import check_in_networks, choose_addresses
from vpnd.pki.names import canonical_group, canonical_name
from vpnd.pki.pkidir import PkiDir


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """The name's identity before and after ``update_identity``."""

    before: IdentityRecord
    after: IdentityRecord
    renews_at: dt.datetime | None = None
    """When the current certificate renews (and picks the change up); None if it has none
    that is valid."""

    @property
    def changed(self) -> tuple[str, ...]:
        """Which terms differ: ``groups``, ``addresses``, ``routes``."""
        fields = ("groups", "addresses", "routes")
        return tuple(f for f in fields if getattr(self.before, f) != getattr(self.after, f))

    @property
    def removed_groups(self) -> tuple[str, ...]:
        return tuple(g for g in self.before.groups if g not in self.after.groups)


def update_identity(
    pki: PkiDir,
    name: str,
    *,
    groups: Sequence[str] | None = None,
    addresses: Sequence[IPAddress] | None = None,
    routes: Sequence[IPNetwork] | None = None,
) -> IdentityChange:
    """Replace the given terms of ``name``'s identity (None: keep); one transaction.

    Groups are canonicalised; addresses must lie in the CA's networks and be held by
    no other name (certificates and other identities alike); routes follow the issue
    rules (no default route). Gateways are refused: their terms change by re-issue.
    """
    cn = canonical_name(name)
    if groups is None and addresses is None and routes is None:
        raise PkiError("nothing to change: give --groups, --ip and/or --routes")
    new_groups = (
        None if groups is None else tuple(dict.fromkeys(canonical_group(g) for g in groups))
    )
    terms = certificate_terms(
        role=Role.PEER,
        addresses=addresses or (),
        groups=new_groups or (),
        routes=routes or (),
        dns_names=(),
        days=None,
    )
    if addresses is not None and not terms.wanted:
        raise PkiError("--ip needs at least one address")
    networks = ca_networks(pki.ca_certificate())
    for addr in terms.wanted:
        check_in_networks(addr, networks)
    now = pki.now()
    with Inventory.open(pki.inventory_path) as inv, inv.transaction():
        before = _identity(inv, cn)
        after = before
        if new_groups is not None:
            after = dataclasses.replace(after, groups=terms.groups)
        if routes is not None:
            after = dataclasses.replace(after, routes=terms.routes)
        if addresses is not None and terms.wanted != before.addresses:
            _refuse_taken_by_identity(inv, cn, terms.wanted)
            chosen = choose_addresses(
                inv, cn=cn, role=Role.PEER, wanted=terms.wanted, networks=networks, now=now
            )
            after = dataclasses.replace(after, addresses=tuple(chosen))
        if after != before:
            after = dataclasses.replace(after, updated_at=now)
            inv.put_identity(after)
        current = inv.get(after.current_serial) if after.current_serial else None
    renews_at = None
    if current is not None and current.is_valid(now):
        renews_at = next_renewal(current.not_before, current.not_after)
    return IdentityChange(before=before, after=after, renews_at=renews_at)


def _identity(inv: Inventory, cn: str) -> IdentityRecord:
    found = inv.identity(cn)
    if found is None:
        raise PkiError(
            f"{cn!r} has no identity in the inventory: issue a certificate "
            "('vpnctl issue') or invite it ('vpnctl invite') first"
        )
    if found.role is not Role.PEER:
        raise PkiError(f"{cn!r} is a gateway: change its terms by re-issuing its certificate")
    return found


def _refuse_taken_by_identity(inv: Inventory, cn: str, wanted: Sequence[IPAddress]) -> None:
    for other in inv.identities():
        if other.name == cn:
            continue
        clash = [a for a in wanted if a in other.addresses]
        if clash:
            raise PkiError(
                f"{clash[0]} is already the address of {other.name!r}; pick another --ip"
            )
