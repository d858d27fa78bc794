"""Handshake slots: limits per source, per /24 (/64) and in total, with the oldest
silent handshake evicted when the table is full. A pure table on a stepped clock."""

from __future__ import annotations

import pytest

from vpnd.transport.slots import HandshakeSlots, subnet_of


@pytest.mark.parametrize(
    ("source", "subnet"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:1:2:3::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.5", "192.0.2.0/24"),  # IPv4-mapped counts as IPv4
        ("fe80::1%eth0", "fe80::/64"),
        ("?", "?"),
    ],
)
def test_subnets(source: str, subnet: str) -> None:
    assert subnet_of(source) == subnet


def test_per_source_limit() -> None:
    slots: HandshakeSlots[int] = HandshakeSlots(max_total=100, max_per_source=2)
    assert slots.admit(1, "192.0.2.1", 0.0).admitted
    assert slots.admit(2, "192.0.2.1", 0.0).admitted
    verdict = slots.admit(3, "192.0.2.1", 0.0)
    assert (verdict.admitted, verdict.reason) == (False, "per_source")
    assert slots.admit(4, "192.0.2.2", 0.0).admitted
    slots.release(1)
    assert slots.admit(5, "192.0.2.1", 0.0).admitted


def test_per_subnet_limit_counts_every_address_in_a_slash_24_or_64() -> None:
    slots: HandshakeSlots[int] = HandshakeSlots(max_total=100, max_per_source=16, max_per_subnet=3)
    for i in range(3):
        assert slots.admit(i, f"198.51.100.{i + 1}", 0.0).admitted
    assert slots.admit(10, "198.51.100.200", 0.0).reason == "per_subnet"
    assert slots.admit(11, "198.51.101.1", 0.0).admitted  # the next /24
    for i in range(3):
        assert slots.admit(20 + i, f"2001:db8::{i + 1}", 0.0).admitted
    assert slots.admit(30, "2001:db8::ffff:1", 0.0).reason == "per_subnet"
    assert slots.admit(31, "2001:db8:0:1::1", 0.0).admitted


def test_the_issue_scenario_20_sources_by_16_silent_leave_room_for_valid_peers() -> None:
    # 20 sources x 16 silent connections, all in one /24, against the default limits.
    slots: HandshakeSlots[int] = HandshakeSlots(max_total=256, max_per_source=16, max_per_subnet=64)
    key = 0
    for src in range(20):
        for _ in range(16):
            key += 1
            slots.admit(key, f"203.0.113.{src + 1}", 0.0)
    assert len(slots) == 64
    for i in range(2):  # two valid peers, from elsewhere, a moment later
        assert slots.admit(1000 + i, f"192.0.2.{i + 1}", 0.1).admitted


def test_a_full_table_evicts_the_oldest_silent_handshake() -> None:
    slots: HandshakeSlots[str] = HandshakeSlots(max_total=3, min_age=1.0)
    assert slots.admit("a", "192.0.2.1", 0.0).admitted
    assert slots.admit("b", "198.51.100.1", 1.0).admitted
    assert slots.admit("c", "203.0.113.1", 2.0).admitted
    slots.heard("a")  # "a" sent bytes: the oldest *silent* one is "b"
    verdict = slots.admit("d", "192.0.2.99", 5.0)
    assert verdict.admitted and verdict.evict == ("b",)
    verdict = slots.admit("e", "192.0.2.98", 5.0)
    assert verdict.evict == ("c",)
    verdict = slots.admit("f", "192.0.2.97", 5.5)
    assert verdict.evict == ("a",)  # no silent one old enough: the oldest of all
    assert len(slots) == 3 and slots.evicted == 3


def test_young_handshakes_are_never_evicted() -> None:
    slots: HandshakeSlots[str] = HandshakeSlots(max_total=2, min_age=1.0)
    assert slots.admit("a", "192.0.2.1", 10.0).admitted
    assert slots.admit("b", "192.0.2.2", 10.5).admitted
    verdict = slots.admit("c", "192.0.2.3", 10.9)  # "a" is 0.9 s old: a slow valid client
    assert (verdict.admitted, verdict.reason, verdict.evict) == (False, "full", ())
    verdict = slots.admit("c", "192.0.2.3", 11.0)
    assert verdict.admitted and verdict.evict == ("a",)


def test_the_heard_predicate_spares_connections_that_sent_bytes() -> None:
    slots: HandshakeSlots[str] = HandshakeSlots(max_total=2, min_age=0.0)
    slots.admit("a", "192.0.2.1", 0.0)
    slots.admit("b", "192.0.2.2", 1.0)
    verdict = slots.admit("c", "192.0.2.3", 2.0, heard=lambda k: k == "a")
    assert verdict.evict == ("b",)


def test_release_frees_every_counter_and_ignores_unknown_keys() -> None:
    slots: HandshakeSlots[int] = HandshakeSlots(max_total=1, max_per_source=1, max_per_subnet=1)
    assert slots.admit(1, "192.0.2.1", 0.0).admitted
    slots.release(1)
    slots.release(1)
    slots.release(42)
    assert len(slots) == 0
    assert slots.admit(2, "192.0.2.1", 0.0).admitted
