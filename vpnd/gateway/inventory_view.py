"""What the gateway knows from the CA's inventory, frozen, and how it judges a peer by it.

The certificate says who a peer was when it was signed; the inventory says who the
peer is now. The gateway reads the inventory into an ``InventoryView`` (see
``vpnd.gateway.inventory_watch``) and applies it at every admission and at every
change: a superseded or revoked serial is refused at once, without waiting for a
CRL; an older generation than the current valid certificate is a copy; and the
inventory's groups are a ceiling on the certificate's, so a group removal takes effect
on the gateway within a poll interval, long before the certificate expires.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from vpnd.pki.identity import PeerIdentity, Reason


@dataclass(frozen=True, slots=True)
class Standing:
    """One name's current record."""

    groups: frozenset[str]
    generation: int
    current_serial: int | None
    current_not_after: dt.datetime | None
    """Expiry of the current certificate while it is valid (not revoked/superseded)."""
    older_valid: frozenset[int] = frozenset()
    """Other still-valid serials of this name: superseded once the current one is used."""


@dataclass(frozen=True, slots=True)
class InventoryView:
    names: Mapping[str, Standing] = field(default_factory=dict)
    superseded: frozenset[int] = frozenset()
    revoked: frozenset[int] = frozenset()
    stamp: int = 0
    """The inventory's change stamp this view was read at."""
    superseded_fingerprints: frozenset[str] = frozenset()
    """SHA-256 of every superseded certificate: a handshake presenting one is a copy."""
    online_issuer: str | None = None
    """The online issuer's subject (RFC 4514): its certificates get groups only through
    an inventory record, so a leaf minted with a stolen issuer key gets none."""


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason
    detail: str
    """What the refused peer is told: its own certificate only, never another peer."""


def refusal(identity: PeerIdentity, view: InventoryView, wall: dt.datetime) -> Refusal | None:
    """Why the inventory refuses this certificate now, or None."""
    serial = identity.serial
    if serial in view.revoked:
        return Refusal(Reason.REVOKED, f"serial {serial:x} is revoked")
    copy = possible_copy(identity.name, serial, identity.generation, view, wall)
    if copy is not None:
        return copy
    if serial in view.superseded:
        return Refusal(
            Reason.SUPERSEDED,
            f"serial {serial:x} was superseded by a renewal; use the renewed certificate",
        )
    return None


def possible_copy(
    name: str, serial: int, generation: int, view: InventoryView, wall: dt.datetime
) -> Refusal | None:
    """Teleport's generation check: an older generation than the name's current, valid
    certificate. The predecessor of a renewal whose result was never used is exempt: the
    peer may simply not have received it, and a copy of it is indistinguishable."""
    standing = view.names.get(name)
    if standing is None or standing.current_serial in (None, serial):
        return None
    if generation >= standing.generation or serial in standing.older_valid:
        return None
    if standing.current_not_after is None or standing.current_not_after <= wall:
        return None
    return Refusal(
        Reason.POSSIBLE_COPY,
        f"serial {serial:x} (generation {generation}) was superseded by generation "
        f"{standing.generation}: refused as a possible copy",
    )


def effective_groups(identity: PeerIdentity, view: InventoryView | None) -> frozenset[str]:
    """The certificate's groups, capped by the inventory's current ones."""
    if view is None:
        return identity.groups
    standing = view.names.get(identity.name)
    if standing is None:
        if view.online_issuer is not None and identity.issuer == view.online_issuer:
            return frozenset()
        return identity.groups
    return identity.groups & standing.groups


def to_supersede(identity: PeerIdentity, view: InventoryView | None) -> frozenset[int]:
    """Serials a first use of ``identity`` supersedes (it being the current one)."""
    if view is None:
        return frozenset()
    standing = view.names.get(identity.name)
    if standing is None or standing.current_serial != identity.serial:
        return frozenset()
    return standing.older_valid
