"""What the gateway core keeps of one connected peer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vpnd.pki.identity import PeerIdentity
from vpnd.policy.firewall import PeerView


@dataclass(eq=False)
class PeerState:
    """What the core knows of one connected peer: identity, admission, counters."""

    key: int
    identity: PeerIdentity
    remote: str
    connected_at: float
    chain: tuple[bytes, ...] = field(default=(), repr=False)
    """The DER chain the peer presented, to re-verify when the trusted CAs change."""
    view: PeerView = field(default_factory=lambda: PeerView("", frozenset()))
    """What the firewall sees of this peer: its name and groups."""
    admitted: bool = False
    configured: bool = False
    """CONFIG went out: the session takes DATA. Until then packets for it are held."""
    held: list[bytes | memoryview] = field(default_factory=list, repr=False)
    """Packets for this peer that arrived between admission and CONFIG (a renewal takes
    the addresses over while the nft set update runs), sent right after CONFIG."""
    held_bytes: int = 0
    offload: bool = False
    """DATA to and from this peer carries virtio headers (both ends offload)."""
    drops: Counter[str] = field(default_factory=Counter)
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    turn_packets: int = 0
    """Packets charged to this peer in the current loop turn (``charge_turn``)."""
    turn_yields: int = 0
    """How often this peer's budget ran out and the other peers were served first."""
    quarantined: bool = False
    """Admitted with an expired certificate, only to renew: no addresses, no packets."""
    successor: PeerState | None = field(default=None, repr=False)
    """The renewed session that took this one's addresses over while it drains: packets
    it still delivers with those sources are the same peer's, not spoofed."""

    def __hash__(self) -> int:
        return self.key
