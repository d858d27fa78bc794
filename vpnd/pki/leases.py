"""Overlay address leases: which address a new certificate gets, behind a store interface.

Address convention: in each overlay network the network and broadcast addresses are
never handed out, and the *first usable* address (10.8.0.1 in 10.8.0.0/24) is
reserved for the gateway. A peer issued without explicit addresses gets the next free
address of the CA's first network; a gateway gets the first usable one. Renewing a
name without explicit addresses keeps the addresses of its current valid certificate.

The rules read the leases through ``LeaseStore``; the SQLite inventory
(``vpnd.pki.inventory.Inventory``) is the store used today. Callers read inside the
write transaction that records the new certificate, so two concurrent issues can
never pick the same address.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import CertRecord


class LeaseStore(Protocol):
    """What the address rules need to know about issued certificates."""

    def all_certificates(self) -> list[CertRecord]:
        """Every record, oldest issue first."""
        ...

    def by_name(self, name: str) -> list[CertRecord]:
        """Every record of ``name``, oldest issue first."""
        ...

    def holders(self, address: IPAddress, now: dt.datetime) -> list[CertRecord]:
        """Valid (unexpired, unrevoked) certificates carrying ``address``."""
        ...

    def leased_addresses(self, now: dt.datetime) -> dict[IPAddress, list[CertRecord]]:
        """Every address held by a valid certificate, with its holders."""
        ...


def choose_addresses(
    store: LeaseStore,
    *,
    cn: str,
    role: Role,
    wanted: tuple[IPAddress, ...],
    networks: tuple[IPNetwork, ...],
    now: dt.datetime,
) -> tuple[IPAddress, ...]:
    """The overlay addresses for a new certificate of ``cn``; PkiError when none fit.

    ``wanted`` (explicit addresses) must already be inside ``networks``
    (see :func:`check_in_networks`).
    """
    reserved = gateway_addresses(store, networks) if role is Role.PEER else {}
    # Renewal: keep the overlay address(es) the name already has.
    kept = wanted or _current_addresses(store, cn, role, networks, now)
    if kept:
        for addr in kept:
            _refuse_reserved(addr, reserved)
            _refuse_if_held(store, addr, cn, now)
        return kept
    network = networks[0]
    hosts: Iterator[IPAddress] = iter(network.hosts())
    first = next(hosts, None)
    if first is None:
        raise PkiError(f"network {network} has no usable address")
    if role is Role.GATEWAY:
        _refuse_if_held(store, first, cn, now, hint=" (reserved for the gateway; pass --ip)")
        return (first,)
    held = store.leased_addresses(now)
    # `hosts` already yielded the gateway's address; the loop is bounded by the
    # network size and stops at the first address not held.
    for addr in hosts:
        holders = [r for r in held.get(addr, []) if r.name != cn]
        if not holders and addr not in reserved:
            return (addr,)
    raise PkiError(
        f"network {network} has no free address left; revoke unused certificates or pass --ip"
    )


def _current_addresses(
    store: LeaseStore, cn: str, role: Role, networks: Sequence[IPNetwork], now: dt.datetime
) -> tuple[IPAddress, ...]:
    current = [r for r in store.by_name(cn) if r.is_valid(now) and r.role is role]
    if not current:
        return ()
    return tuple(a for a in current[-1].addresses if any(a in net for net in networks))


def check_in_networks(addr: IPAddress, networks: Iterable[IPNetwork]) -> None:
    """Refuse an address outside the CA's networks, or a network/broadcast address."""
    nets = tuple(networks)
    for net in nets:
        if addr in net:
            if addr == net.network_address and net.num_addresses > 2:
                raise PkiError(f"{addr} is the network address of {net}")
            if (
                isinstance(net, ipaddress.IPv4Network)
                and net.prefixlen < 31
                and addr == net.broadcast_address
            ):
                raise PkiError(f"{addr} is the broadcast address of {net}")
            return
    shown = ", ".join(str(n) for n in nets)
    raise PkiError(f"{addr} is outside the CA's overlay network(s) {shown}")


def gateway_addresses(store: LeaseStore, networks: Sequence[IPNetwork]) -> dict[IPAddress, str]:
    """Addresses no peer may hold, with why: each network's first usable one (the
    gateway's by default) and any address a gateway certificate ever carried, revoked
    or not."""
    reserved: dict[IPAddress, str] = {}
    for net in networks:
        hosts: Iterator[IPAddress] = iter(net.hosts())
        first = next(hosts, None)
        if first is not None:
            reserved[first] = f"the first address of {net}, reserved for the gateway"
    for rec in store.all_certificates():
        if rec.role is Role.GATEWAY:
            for addr in rec.addresses:
                reserved[addr] = f"the address of gateway {rec.name} (serial {rec.serial_hex})"
    return reserved


def _refuse_reserved(addr: IPAddress, reserved: dict[IPAddress, str]) -> None:
    if addr in reserved:
        raise PkiError(f"{addr} is {reserved[addr]}: a peer cannot hold it; pick another --ip")


def _refuse_if_held(
    store: LeaseStore, addr: IPAddress, cn: str, now: dt.datetime, hint: str = ""
) -> None:
    others = [r for r in store.holders(addr, now) if r.name != cn]
    if others:
        h = others[0]
        raise PkiError(
            f"{addr} is already held by {h.name} (serial {h.serial_hex}, "
            f"valid until {h.not_after:%Y-%m-%d}){hint}"
        )
