"""Address lease rules, run against any LeaseStore: the SQLite inventory and an in-memory one.

Both stores must give the same answers, which is what lets another store (PostgreSQL)
replace the inventory without touching the rules or their callers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from vpnd.pki.identity import IPAddress, PkiError, Role
from vpnd.pki.inventory import CertRecord, Inventory
from vpnd.pki.leases import LeaseStore, check_in_networks, choose_addresses

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
NET = (ipaddress.ip_network("10.8.0.0/29"),)  # hosts .1 (gateway) to .6


class MemoryLeases:
    """A LeaseStore over a list of records, kept as simple as the rules allow."""

    def __init__(self, records: Sequence[CertRecord]) -> None:
        self.records = list(records)

    def all_certificates(self) -> list[CertRecord]:
        return list(self.records)

    def by_name(self, name: str) -> list[CertRecord]:
        return [r for r in self.records if r.name == name]

    def holders(self, address: IPAddress, now: dt.datetime) -> list[CertRecord]:
        held = [r for r in self.records if address in r.addresses and r.is_valid(now)]
        return sorted(held, key=lambda r: r.not_after, reverse=True)

    def leased_addresses(self, now: dt.datetime) -> dict[IPAddress, list[CertRecord]]:
        held: dict[IPAddress, list[CertRecord]] = {}
        for r in self.records:
            if r.is_valid(now):
                for a in r.addresses:
                    held.setdefault(a, []).append(r)
        return held


def rec(serial: int, name: str, *addrs: str, role: Role = Role.PEER, days: int = 90) -> CertRecord:
    return CertRecord(
        serial=serial,
        name=name,
        role=role,
        addresses=tuple(ipaddress.ip_address(a) for a in addrs),
        groups=(),
        routes=(),
        dns_names=("gw.test",) if role is Role.GATEWAY else (),
        not_before=T0,
        not_after=T0 + days * DAY,
        fingerprint=f"{serial:064x}",
        issued_at=T0 + serial * dt.timedelta(seconds=1),
    )


def sqlite_store(records: Sequence[CertRecord], path: Path) -> Inventory:
    inv = Inventory.create(path)
    with inv.transaction():
        for r in records:
            inv.add(dataclasses.replace(r, revoked_at=None))
            if r.revoked_at is not None:
                inv.mark_revoked(r.serial, r.revoked_at, None)
    return inv


MakeStore = Callable[..., LeaseStore]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    opened: list[Inventory] = []

    def make(*records: CertRecord) -> LeaseStore:
        if request.param == "memory":
            return MemoryLeases(records)
        opened.append(sqlite_store(records, tmp_path / f"inventory-{len(opened)}.sqlite"))
        return opened[-1]

    yield make
    for inv in opened:
        inv.close()


def choose(
    s: LeaseStore, cn: str, *, role: Role = Role.PEER, wanted: Sequence[str] = (), at: int = 1
) -> list[str]:
    chosen = choose_addresses(
        s,
        cn=cn,
        role=role,
        wanted=tuple(ipaddress.ip_address(a) for a in wanted),
        networks=NET,
        now=T0 + at * DAY,
    )
    return [str(a) for a in chosen]


def revoked(r: CertRecord) -> CertRecord:
    return dataclasses.replace(r, revoked_at=T0)


def test_a_peer_gets_the_first_free_address_after_the_gateways(
    store: MakeStore,
) -> None:
    s = store(rec(1, "alice", "10.8.0.2"), rec(2, "bob", "10.8.0.3"))
    assert choose(s, "carol") == ["10.8.0.4"]


def test_expired_and_revoked_leases_are_free_again(store: MakeStore) -> None:
    s = store(rec(1, "alice", "10.8.0.2", days=10), revoked(rec(2, "bob", "10.8.0.3")))
    assert choose(s, "carol", at=11) == ["10.8.0.2"]
    assert choose(s, "carol", at=1) == ["10.8.0.3"]


def test_a_renewal_keeps_the_address(store: MakeStore) -> None:
    s = store(rec(1, "alice", "10.8.0.2"), rec(2, "bob", "10.8.0.5"))
    assert choose(s, "bob") == ["10.8.0.5"]


def test_a_gateway_gets_the_first_address_and_keeps_it_reserved_even_revoked(
    store: MakeStore,
) -> None:
    assert choose(store(), "gw", role=Role.GATEWAY) == ["10.8.0.1"]
    s = store(revoked(rec(1, "gw", "10.8.0.2", role=Role.GATEWAY)))
    assert choose(s, "carol") == ["10.8.0.3"]
    with pytest.raises(PkiError, match="address of gateway gw"):
        choose(s, "carol", wanted=["10.8.0.2"])


def test_an_address_held_by_another_name_is_refused(store: MakeStore) -> None:
    s = store(rec(1, "alice", "10.8.0.2"))
    with pytest.raises(PkiError, match=r"10\.8\.0\.2 is already held by alice \(serial 1"):
        choose(s, "bob", wanted=["10.8.0.2"])
    with pytest.raises(PkiError, match="reserved for the gateway"):
        choose(s, "bob", wanted=["10.8.0.1"])
    assert choose(s, "alice", wanted=["10.8.0.2"]) == ["10.8.0.2"]  # its own lease


def test_a_full_network_is_refused(store: MakeStore) -> None:
    s = store(*(rec(i, f"p{i}", f"10.8.0.{i}") for i in range(2, 7)))
    with pytest.raises(PkiError, match="no free address left"):
        choose(s, "late")


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("10.8.0.0", "network address"),
        ("10.8.0.7", "broadcast address"),
        ("10.9.0.1", "outside the CA's overlay network"),
    ],
)
def test_addresses_outside_the_usable_range_are_refused(addr: str, message: str) -> None:
    with pytest.raises(PkiError, match=message):
        check_in_networks(ipaddress.ip_address(addr), NET)
    check_in_networks(ipaddress.ip_address("10.8.0.6"), NET)
