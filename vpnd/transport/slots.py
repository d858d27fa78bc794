"""Admission of unauthenticated TLS connections: a pure table, time passed in.

Every accepted TCP connection takes a slot until its handshake completes or fails. The
table bounds slots in total (``max_total``), per source address (``max_per_source``)
and per source network (``max_per_subnet``: the /24 of an IPv4 address, the /64 of an
IPv6 one, so one host with many addresses counts once). When the table is full, the
oldest handshake that has been pending at least ``min_age`` seconds is evicted to make
room, preferring one that has sent nothing at all: a valid client finishes within a
few round trips, so a connection that has sat silent longest is the staller. A
newcomer is refused only if its source or network is at its limit, or if every slot
is younger than ``min_age``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


def subnet_of(source: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) holding ``source``; the text itself if not an address."""
    try:
        addr = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return source
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@dataclass(frozen=True, slots=True)
class Admission(Generic[K]):
    """The verdict on one new connection."""

    admitted: bool
    reason: str = ""
    """Why not: "per_source", "per_subnet" or "full"."""
    evict: tuple[K, ...] = ()
    """Pending connections to close now (the caller aborts them and calls ``release``)."""


@dataclass(slots=True)
class _Slot:
    source: str
    subnet: str
    since: float
    heard: bool = False


@dataclass(slots=True)
class HandshakeSlots(Generic[K]):
    max_total: int | None = None
    max_per_source: int | None = None
    max_per_subnet: int | None = None
    min_age: float = 1.0
    """A handshake younger than this is never evicted (a slow but valid client)."""
    _slots: dict[K, _Slot] = field(default_factory=dict)
    _per_source: dict[str, int] = field(default_factory=dict)
    _per_subnet: dict[str, int] = field(default_factory=dict)
    evicted: int = 0

    def __len__(self) -> int:
        return len(self._slots)

    def admit(
        self, key: K, source: str, now: float, heard: Callable[[K], bool] | None = None
    ) -> Admission[K]:
        """Admit ``key`` from ``source`` at ``now`` (monotonic), maybe evicting one.

        ``heard(k)`` says whether pending connection ``k`` has sent anything yet (else
        ``heard()`` calls count); silent ones are evicted first."""
        subnet = subnet_of(source)
        if (
            self.max_per_source is not None
            and self._per_source.get(source, 0) >= self.max_per_source
        ):
            return Admission(False, "per_source")
        if (
            self.max_per_subnet is not None
            and self._per_subnet.get(subnet, 0) >= self.max_per_subnet
        ):
            return Admission(False, "per_subnet")
        evict: tuple[K, ...] = ()
        if self.max_total is not None and len(self._slots) >= self.max_total:
            victim = self._victim(now, heard)
            if victim is None:
                return Admission(False, "full")
            self.release(victim)
            self.evicted += 1
            evict = (victim,)
        self._slots[key] = _Slot(source, subnet, now)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._per_subnet[subnet] = self._per_subnet.get(subnet, 0) + 1
        return Admission(True, evict=evict)

    def heard(self, key: K) -> None:
        """The connection sent handshake bytes: it is not silent (evicted later)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.heard = True

    def release(self, key: K) -> None:
        """The handshake ended (either way); free its slot. Unknown keys are ignored."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        for table, name in ((self._per_source, slot.source), (self._per_subnet, slot.subnet)):
            left = table[name] - 1
            if left:
                table[name] = left
            else:
                del table[name]

    def _victim(self, now: float, heard: Callable[[K], bool] | None) -> K | None:
        # Dicts keep insertion order, which is age order: the first old-enough silent
        # slot is the oldest silent one; else the oldest of all, if old enough.
        oldest: K | None = None
        for key, slot in self._slots.items():
            if now - slot.since < self.min_age:
                break
            if not (slot.heard or (heard is not None and heard(key))):
                return key
            if oldest is None:
                oldest = key
        return oldest
