"""Bounded connection-tracking tables for the firewall (pure data structures, no clock).

An ``Entry`` is one flow a rule allowed. It is reachable under two keys, its forward
(initiator -> responder) and reverse 5-tuple, so either direction costs one dict lookup.
Entries are kept in least-recently-used order, overall and per initiating peer. A peer
holds at most ``max_per_peer`` flows: its next one evicts *its own* LRU flow
(``evicted_peer_limit``). When the whole table is full, the LRU flow of the peer holding
the most flows is evicted (``evicted``), so memory never grows past ``max_entries`` and
one peer's flood of flows cannot push out another peer's flows. Expiry is lazy (on
lookup, by the firewall), amortised (each insertion first looks at the two LRU entries)
and explicit (``expire(now)``, which the gateway calls periodically).
"""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[bytes, bytes, int, int, int]
"""(src, dst, proto, sport, dport) — for ICMP queries (src, dst, proto, identifier, type)."""
Names = tuple[str | None, str | None]
"""(source side, destination side) peer names; None is the TUN side."""

EXPIRE_PER_INSERT = 2


class Entry:
    """One tracked flow; ``src``/``dst``/``a_name``/``b_name`` are the initiator's view."""

    __slots__ = (
        "a_name",
        "b_name",
        "closing",
        "dport",
        "dst",
        "fins",
        "fwd",
        "kind",
        "last",
        "proto",
        "rev",
        "src",
        "timeout",
        "version",
    )

    def __init__(
        self,
        *,
        fwd: Key,
        rev: Key,
        version: int,
        dport: int,
        a_name: str,
        b_name: str | None,
        kind: str,
        timeout: float,
        now: float,
    ) -> None:
        self.fwd = fwd
        self.rev = rev
        self.version = version
        self.src = fwd[0]
        self.dst = fwd[1]
        self.proto = fwd[2]
        self.dport = dport
        """The destination port the rules saw (0 when the protocol has none)."""
        self.a_name: str = a_name
        """The initiating peer (a flow is only ever created by a peer)."""
        self.b_name = b_name
        """The responding peer, or None when the destination is on the TUN side."""
        self.kind = kind
        """tcp | udp | icmp | other: which conntrack timeout applies."""
        self.timeout = timeout
        self.last = now
        self.fins = 0
        """Bit 1: FIN seen from the initiator; bit 2: from the responder."""
        self.closing = False
        """A RST or both FINs were seen: the timeout was shortened."""


class ConntrackTable:
    """Entries indexed by both directions, LRU-ordered, at most ``max_entries``."""

    def __init__(self, max_entries: int, max_per_peer: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"conntrack needs room for at least 1 entry, got {max_entries}")
        if max_per_peer is not None and max_per_peer < 1:
            raise ValueError(
                f"conntrack needs room for at least 1 flow per peer, got {max_per_peer}"
            )
        self.max_entries = max_entries
        self.max_per_peer = max_per_peer or max_entries
        self._by_peer: dict[str, OrderedDict[Key, Entry]] = {}
        """Initiating peer -> its flows, LRU first."""
        self.evicted_peer_limit = 0
        self.index: dict[Key, tuple[Entry, Names]] = {}
        """Both keys of every entry -> (entry, the (src, dst) names expected that way)."""
        self._lru: OrderedDict[Key, Entry] = OrderedDict()
        self._by_addr: dict[bytes, set[Key]] = {}
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._lru)

    def entries(self) -> list[Entry]:
        return list(self._lru.values())

    def touch(self, entry: Entry, now: float) -> None:
        entry.last = now
        self._lru.move_to_end(entry.fwd)
        own = self._by_peer.get(entry.a_name)
        if own is not None and entry.fwd in own:
            own.move_to_end(entry.fwd)

    def add(self, entry: Entry, now: float) -> None:
        """Insert ``entry`` (replacing any entry on its keys), evicting the LRU if full."""
        lru = self._lru
        for _ in range(EXPIRE_PER_INSERT):
            if not lru:
                break
            head = next(iter(lru.values()))
            if now - head.last < head.timeout:
                break
            self.remove(head)
            self.expired += 1
        for key in (entry.fwd, entry.rev):
            old = self.index.get(key)
            if old is not None:
                self.remove(old[0])
        own = self._by_peer.get(entry.a_name)
        while own and len(own) >= self.max_per_peer:
            self.remove(next(iter(own.values())))
            self.evicted_peer_limit += 1
        while len(lru) >= self.max_entries:
            # The biggest holder pays (O(peers), only when the whole table is full).
            biggest = max(self._by_peer.values(), key=len)
            self.remove(next(iter(biggest.values())))
            self.evicted += 1
        names = (entry.a_name, entry.b_name)
        self.index[entry.fwd] = (entry, names)
        self.index[entry.rev] = (entry, (entry.b_name, entry.a_name))
        lru[entry.fwd] = entry
        self._by_peer.setdefault(entry.a_name, OrderedDict())[entry.fwd] = entry
        self._by_addr.setdefault(entry.src, set()).add(entry.fwd)
        self._by_addr.setdefault(entry.dst, set()).add(entry.fwd)

    def remove(self, entry: Entry) -> None:
        if self._lru.pop(entry.fwd, None) is not entry:
            return
        self.index.pop(entry.fwd, None)
        self.index.pop(entry.rev, None)
        own = self._by_peer.get(entry.a_name)
        if own is not None:
            own.pop(entry.fwd, None)
            if not own:
                del self._by_peer[entry.a_name]
        for addr in (entry.src, entry.dst):
            keys = self._by_addr.get(addr)
            if keys is not None:
                keys.discard(entry.fwd)
                if not keys:
                    del self._by_addr[addr]

    def expire(self, now: float) -> int:
        """Drop every entry idle for its timeout; O(entries), for a periodic timer."""
        stale = [e for e in self._lru.values() if now - e.last >= e.timeout]
        for entry in stale:
            self.remove(entry)
        self.expired += len(stale)
        return len(stale)

    def forget_address(self, addr: bytes) -> int:
        """Drop every entry with ``addr`` at either end; O(entries of that address)."""
        keys = list(self._by_addr.get(addr, ()))
        for key in keys:
            entry = self._lru.get(key)
            if entry is not None:
                self.remove(entry)
        return len(keys)

    def forget_peer(self, name: str) -> int:
        """Drop every entry whose initiator or responder is the peer ``name``; O(entries)."""
        gone = [e for e in self._lru.values() if name in (e.a_name, e.b_name)]
        for entry in gone:
            self.remove(entry)
        return len(gone)

    def clear(self) -> None:
        self.index.clear()
        self._lru.clear()
        self._by_addr.clear()
        self._by_peer.clear()


FragKey = tuple[bytes, bytes, int]
"""(src, dst, fragment identification)."""


class FragmentTable:
    """Datagrams whose first fragment was allowed: their later fragments may pass.

    Bounded like conntrack (LRU eviction) and short-lived: ``timeout`` matches the
    kernel's reassembly timeout, after which the datagram cannot complete anyway.
    """

    def __init__(self, max_entries: int, timeout: float) -> None:
        self.max_entries = max(1, max_entries)
        self.timeout = timeout
        self._seen: OrderedDict[FragKey, tuple[float, Names]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: FragKey, names: Names, now: float) -> None:
        seen = self._seen
        if key in seen:
            seen.move_to_end(key)
        else:
            while len(seen) >= self.max_entries:
                seen.popitem(last=False)
                self.evicted += 1
        seen[key] = (now, names)

    def allowed(self, key: FragKey, names: Names, now: float) -> bool:
        """Did a first fragment pass for ``key`` between the same two sides, recently?"""
        found = self._seen.get(key)
        if found is None:
            return False
        since, first_names = found
        if now - since >= self.timeout:
            del self._seen[key]
            return False
        return first_names == names

    def forget_address(self, addr: bytes) -> int:
        gone = [k for k in self._seen if addr in (k[0], k[1])]
        for key in gone:
            del self._seen[key]
        return len(gone)

    def clear(self) -> None:
        self._seen.clear()
