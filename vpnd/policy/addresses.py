"""Which peer owns which overlay address, and which sources a peer may send from.

Pure data structure: the gateway's data path asks ``lookup(dst)`` for every packet
(longest-prefix match over peer addresses and routed subnets), and ``lookup(src)`` for
anti-spoofing (WireGuard's cryptokey routing rule: a packet from a peer must carry a
source that routes back to that same peer).

Addresses are kept as raw bytes so the per-packet lookup does no ipaddress parsing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vpnd.pki.identity import IPAddress, IPNetwork

K = TypeVar("K", bound=Hashable)


class AddressConflict(Exception):
    """Another peer already owns one of the requested addresses or subnets."""

    def __init__(self, network: IPNetwork, owner: object) -> None:
        super().__init__(f"{network} is already owned by {owner}")
        self.network = network
        self.owner = owner


@dataclass(frozen=True, slots=True)
class _Entry(Generic[K]):
    network: IPNetwork
    owner: K


def _mask(raw: bytes, prefix: int) -> bytes:
    value = int.from_bytes(raw, "big")
    bits = len(raw) * 8
    if prefix < bits:
        value &= ~((1 << (bits - prefix)) - 1)
    return value.to_bytes(len(raw), "big")


class AddressTable(Generic[K]):
    """Longest-prefix map from overlay addresses/subnets to an owner key."""

    def __init__(self) -> None:
        # One dict per (address length, prefix length): exact-match lookups from the
        # longest prefix down. Overlays hold few distinct prefix lengths (/32, a few
        # routed subnets), so a lookup is a handful of dict probes.
        self._by_len: dict[int, dict[int, dict[bytes, _Entry[K]]]] = {4: {}, 16: {}}
        self._prefixes: dict[int, list[int]] = {4: [], 16: []}
        self._owned: dict[K, list[IPNetwork]] = {}

    def __len__(self) -> int:
        return len(self._owned)

    def owners(self) -> list[K]:
        return list(self._owned)

    def networks_of(self, owner: K) -> list[IPNetwork]:
        return list(self._owned.get(owner, ()))

    def conflicts(self, networks: Iterable[IPNetwork], *, ignore: K | None = None) -> None:
        """Raise ``AddressConflict`` if any network overlaps one owned by another key.

        Cost does not grow with the number of owners for host addresses: an existing
        entry that contains ``net`` is found by one longest-prefix lookup; only a wider
        ``net`` (a routed subnet) scans the longer prefixes for entries inside it.
        """
        for net in networks:
            raw = net.network_address.packed
            owner = self.lookup_raw(raw)
            if owner is not None and owner != ignore:
                raise AddressConflict(net, owner)
            bits = len(raw) * 8
            if net.prefixlen == bits:
                continue
            for prefix in self._prefixes[len(raw)]:
                if prefix <= net.prefixlen:
                    continue
                for entry in self._by_len[len(raw)].get(prefix, {}).values():
                    if entry.owner != ignore and entry.network.subnet_of(net):  # type: ignore[arg-type]
                        raise AddressConflict(net, entry.owner)

    def add(self, owner: K, networks: Iterable[IPNetwork]) -> None:
        """Give ``owner`` the networks, atomically: all of them or, on conflict, none."""
        nets = list(networks)
        self.conflicts(nets, ignore=owner)
        for net in nets:
            raw = net.network_address.packed
            table = self._by_len[len(raw)].setdefault(net.prefixlen, {})
            table[raw] = _Entry(net, owner)
            plist = self._prefixes[len(raw)]
            if net.prefixlen not in plist:
                plist.append(net.prefixlen)
                plist.sort(reverse=True)
        self._owned.setdefault(owner, []).extend(nets)

    def remove(self, owner: K) -> list[IPNetwork]:
        nets = self._owned.pop(owner, [])
        for net in nets:
            raw = net.network_address.packed
            table = self._by_len[len(raw)].get(net.prefixlen, {})
            entry = table.get(raw)
            if entry is not None and entry.owner == owner:
                del table[raw]
        return nets

    def lookup_raw(self, addr: bytes) -> K | None:
        """Owner of the longest prefix containing the raw (4 or 16 byte) address."""
        tables = self._by_len.get(len(addr))
        if tables is None:
            return None
        for prefix in self._prefixes[len(addr)]:
            table = tables.get(prefix)
            if not table:
                continue
            entry = table.get(_mask(addr, prefix) if prefix < len(addr) * 8 else addr)
            if entry is not None:
                return entry.owner
        return None

    def lookup(self, addr: IPAddress) -> K | None:
        return self.lookup_raw(addr.packed)
