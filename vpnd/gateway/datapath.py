"""The gateway's packet forwarding decisions, one batch at a time.

Batch-shaped and allocation-light: one list for the TUN and one per destination peer,
nothing per packet beyond the drop counters' increments. The address table and the
firewall are the core's own, shared, so a takeover is seen by the next packet.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Generic, TypeVar

from vpnd.gateway.audit import LogBudget
from vpnd.gateway.effects import Log
from vpnd.gateway.peer_state import PeerState
from vpnd.net.gso import GsoError, to_plain
from vpnd.net.vnet import (
    VNET_HDR_LEN,
    ip_src_dst,
    plain_vnet_header,
    validate_vnet_packet,
    vnet_segments,
)
from vpnd.policy.addresses import AddressTable
from vpnd.policy.drops import Drop
from vpnd.policy.firewall import Firewall

PLAIN_VNET = plain_vnet_header()
Packets = Sequence[bytes | memoryview]
Batch = list[bytes | memoryview]
P = TypeVar("P", bound=PeerState)


class DataPath(Generic[P]):
    def __init__(
        self,
        table: AddressTable[P],
        firewall: Firewall,
        drops: Counter[str],
        notes: list[Log],
        *,
        tun_vnet: bool,
    ) -> None:
        """``drops`` counts what came from the TUN; ``notes`` collects log lines."""
        self.table = table
        self.firewall = firewall
        self.drops = drops
        self.notes = notes
        self.tun_vnet = tun_vnet
        self._denied_log = LogBudget(20, notes)

    def from_peer(
        self, peer: P, packets: Packets, vnet: bool, now: float
    ) -> tuple[Batch, dict[P, Batch]]:
        """Judge a batch from ``peer``: the packets for the TUN, and a batch per peer.

        Packets are returned in the TUN's form (header-prefixed on an offload TUN).
        """
        to_tun: Batch = []
        to_peers: dict[P, Batch] = {}
        lookup = self.table.lookup_raw
        off = VNET_HDR_LEN if vnet else 0
        prefix = self.tun_vnet and not vnet
        drops = peer.drops
        check = self.firewall.check_packet
        for pkt in packets:
            if vnet and (bad := validate_vnet_packet(pkt)) is not None:
                drops[bad] += 1
                continue
            addrs = ip_src_dst(pkt, off)
            if addrs is None:
                drops[Drop.NOT_IP] += 1
                continue
            src, dst = addrs
            owner = lookup(src)
            if owner is not peer and (owner is None or owner is not peer.successor):
                drops[Drop.SPOOFED_SOURCE] += 1
                continue
            other = lookup(dst)
            denied = check(
                pkt, offset=off, src=peer.view, dst=other.view if other else None, now=now
            )
            if denied is not None:
                drops[denied] += 1
                self._log_denied(peer, pkt, off, denied, now)
                continue
            peer.packets_in += 1
            peer.bytes_in += len(pkt) - off
            item = PLAIN_VNET + pkt if prefix else pkt
            if other is None:
                to_tun.append(item)
            elif other is peer:
                drops[Drop.HAIRPIN] += 1
            else:
                to_peers.setdefault(other, []).append(item)
        return to_tun, to_peers

    def _log_denied(
        self, peer: P, pkt: bytes | memoryview, off: int, reason: str, now: float
    ) -> None:
        # Rate-limited: a peer scanning the LAN must not flood the log.
        if self._denied_log.allow(peer.identity.name, now):
            what = self.firewall.describe(pkt, off)
            self.notes.append(Log(logging.INFO, f"denied {what} ({reason})", peer.key))

    def from_tun(self, packets: Packets, now: float) -> dict[P, Batch]:
        """Judge a batch read from the TUN: one batch per destination peer."""
        lookup = self.table.lookup_raw
        check = self.firewall.check_packet
        off = VNET_HDR_LEN if self.tun_vnet else 0
        drops = self.drops
        batches: dict[P, Batch] = {}
        for pkt in packets:
            addrs = ip_src_dst(pkt, off)
            if addrs is None:
                drops[Drop.TUN_NOT_IP] += 1
                continue
            owner = lookup(addrs[1])
            if owner is None:
                drops[Drop.NO_ROUTE] += 1
                continue
            # From the gateway/LAN side only replies to tracked flows get through.
            denied = check(pkt, offset=off, src=None, dst=owner.view, now=now)
            if denied is not None:
                drops[f"tun_{denied}"] += 1
                continue
            batches.setdefault(owner, []).append(pkt)
        return batches

    def outbound(self, peer: P, packets: Batch, backlog: int, limit: int) -> Batch | None:
        """Packets (in the TUN's form) for ``peer`` in the form it takes, or None when
        there is nothing to send now; ``backlog`` is what its stream has not sent yet,
        ``limit`` its most. Before CONFIG the packets are held (up to ``limit`` bytes)."""
        if not peer.admitted:
            return None
        if backlog > limit:
            # One slow peer must not stall the others or grow memory: drop, like a router.
            peer.drops[Drop.QUEUE_FULL] += len(packets)
            return None
        if self.tun_vnet and not peer.offload:
            plain: Batch = []
            for pkt in packets:
                try:
                    plain.extend(to_plain(pkt))
                except GsoError as err:
                    peer.drops[err.reason] += 1
            packets = plain
        if not peer.configured:
            self._hold(peer, packets, limit)
            return None
        return packets

    def _hold(self, peer: P, packets: Batch, limit: int) -> None:
        size = sum(len(p) for p in packets)
        if peer.held_bytes + size > limit:
            peer.drops[Drop.QUEUE_FULL] += len(packets)
            return
        peer.held.extend(packets)
        peer.held_bytes += size

    def configured(self, peer: P) -> Batch:
        """CONFIG went out to ``peer``: from now on it takes DATA. Returns the packets
        held for it meanwhile, to send at once."""
        peer.configured = True
        held, peer.held, peer.held_bytes = peer.held, [], 0
        return held

    def sent(self, peer: P, packets: int, nbytes: int, refused: int, *, closed: bool) -> None:
        """The session queued ``packets`` of ``nbytes`` IP bytes and refused ``refused``:
        too big for a frame, or all of them because it is ``closed``. (Packets shorter
        than a virtio header cannot get here: every one passed an IP header check.)"""
        peer.packets_out += packets
        peer.bytes_out += nbytes
        if refused:
            peer.drops[Drop.SESSION_CLOSED if closed else Drop.OVERSIZE] += refused


def charge_turn(peer: PeerState, packets: Packets, vnet: bool, budget: int) -> int | None:
    """Charge a decoded batch to ``peer``'s fair share of this loop turn: ``budget``
    packets, a GSO super-packet costing its segments. None: all of it fits. Else how
    many of ``packets`` to serve now (the budget is spent and starts afresh next turn)."""
    used = peer.turn_packets
    if vnet:
        n = len(packets)
        for i, pkt in enumerate(packets):
            used += vnet_segments(pkt)
            if used >= budget:
                n = i + 1
                break
    else:
        n = min(len(packets), max(0, budget - used))
        used += n
    if used < budget:
        peer.turn_packets = used
        return None
    peer.turn_packets = 0
    peer.turn_yields += 1
    return n
