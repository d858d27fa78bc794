"""The address table: longest-prefix ownership, conflicts, atomic takeover, anti-spoofing."""

from __future__ import annotations

import ipaddress

import pytest

from vpnd.policy.addresses import AddressConflict, AddressTable


def n(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def raw(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


@pytest.fixture
def table() -> AddressTable[str]:
    t: AddressTable[str] = AddressTable()
    t.add("alice", [n("10.8.0.2/32"), n("fd00:8::2/128")])
    t.add("site", [n("10.8.0.9/32"), n("192.168.60.0/24")])
    return t


def test_longest_prefix_lookup(table: AddressTable[str]) -> None:
    assert table.lookup_raw(raw("10.8.0.2")) == "alice"
    assert table.lookup_raw(raw("fd00:8::2")) == "alice"
    assert table.lookup_raw(raw("192.168.60.77")) == "site"
    assert table.lookup_raw(raw("192.168.61.1")) is None
    assert table.lookup_raw(raw("10.8.0.3")) is None
    assert table.lookup_raw(b"\x01\x02") is None  # not an address length


@pytest.mark.parametrize(
    "claim",
    ["10.8.0.2/32", "192.168.60.5/32", "192.168.0.0/16", "192.168.60.128/25", "fd00:8::/64"],
)
def test_any_overlap_is_refused_and_changes_nothing(table: AddressTable[str], claim: str) -> None:
    with pytest.raises(AddressConflict):
        table.add("eve", [n("10.8.0.77/32"), n(claim)])
    assert "eve" not in table.owners()
    assert table.lookup_raw(raw("10.8.0.77")) is None  # all or nothing


def test_a_takeover_moves_everything_and_the_late_clean_up_frees_nothing(
    table: AddressTable[str],
) -> None:
    nets = table.networks_of("alice")
    table.remove("alice")  # what the gateway core does on a takeover
    table.add("alice-2", nets)
    assert table.lookup_raw(raw("10.8.0.2")) == "alice-2"
    assert table.lookup_raw(raw("fd00:8::2")) == "alice-2"
    assert "alice" not in table.owners()
    assert table.remove("alice") == []  # the old session's late clean-up frees nothing
    assert table.lookup_raw(raw("10.8.0.2")) == "alice-2"


def test_remove_and_source_check(table: AddressTable[str]) -> None:
    # Anti-spoofing: a source must route back to the peer that sent it.
    assert table.lookup_raw(raw("10.8.0.2")) == "alice"
    assert table.lookup_raw(raw("10.8.0.9")) != "alice"
    assert table.lookup_raw(raw("192.168.60.3")) == "site"
    assert table.lookup_raw(raw("203.0.113.5")) is None
    assert set(map(str, table.remove("site"))) == {"10.8.0.9/32", "192.168.60.0/24"}
    assert table.lookup_raw(raw("192.168.60.3")) is None
    table.add("other", [n("192.168.60.0/24")])  # freed addresses can be leased again
    assert table.lookup_raw(raw("192.168.60.3")) == "other"
