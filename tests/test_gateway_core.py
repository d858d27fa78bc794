"""The gateway core's rules as tables: events in, effects out, time stepped by hand."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import struct

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from gateway_fixtures import T0, World, closes, ident, of_type
from pki_fixtures import DAY, NOW, make_ca
from policy_fixtures import ACK, SYN, TCP, UDP, ipv4, ipv6, tcp, udp
from proto_fixtures import established_gateway

from vpnd.config import AnyMatch, NetworkMatch, PeerMatch, PolicyConfig, Proto, RuleConfig
from vpnd.gateway.datapath import charge_turn
from vpnd.gateway.effects import (
    AddRoute,
    AddSources,
    Audit,
    Close,
    Drain,
    Log,
    Refuse,
    RemoveRoute,
    RemoveSources,
    SendConfig,
)
from vpnd.gateway.peer_state import PeerState
from vpnd.net.vnet import VNET_HDR_LEN
from vpnd.policy.drops import Drop
from vpnd.proto import CloseCode
from vpnd.proto.frames import DATA_OVERHEAD

LAN = "192.168.50.10"
OVERLAY = ("10.8.0.0/24", "fd00:8::/64")
LIMIT = 4096  # queued bytes a peer may have before its batches are dropped
ALLOW = PolicyConfig(
    rules=(
        RuleConfig(AnyMatch(), NetworkMatch(ipaddress.ip_network("192.168.50.0/24")), Proto.ANY),
        RuleConfig(PeerMatch("alice"), PeerMatch("bob"), Proto.ANY),
        RuleConfig(PeerMatch("alice"), PeerMatch("alice"), Proto.ANY),  # only to see hairpins
        RuleConfig(PeerMatch("site"), AnyMatch(), Proto.ANY),
    )
)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# ---- duplicates, renewal, hold-down ----------------------------------------------------


@pytest.mark.parametrize(
    ("duplicate", "closed", "code", "message"),
    [
        ("replace", "old", CloseCode.REPLACED, "replaced by a newer connection"),
        ("reject", "new", CloseCode.REPLACED, "this certificate is already connected"),
    ],
)
def test_a_second_session_of_one_certificate(
    duplicate: str, closed: str, code: CloseCode, message: str
) -> None:
    w = World(duplicate=duplicate)
    old, _ = w.join(ident("alice", "10.8.0.2"))
    w.step(1)
    new, effects = w.join(ident("alice", "10.8.0.2"))
    victim, keeper = (old, new) if closed == "old" else (new, old)
    assert closes(effects) == [(victim.key, code, message)]
    assert w.core.table.lookup(ipaddress.ip_address("10.8.0.2")) is keeper
    assert keeper.admitted
    # The loser's session ends later: that frees nothing the winner holds.
    assert not [e for e in w.core.lost(victim, "closed") if not isinstance(e, Log)]
    assert w.core.table.networks_of(keeper) == [net("10.8.0.2/32")]


@pytest.mark.parametrize(
    ("old_nb", "old_serial", "new_nb", "new_serial", "winner"),
    [
        (T0, 1, T0 + dt.timedelta(days=1), 2, "new"),  # a later notBefore wins
        (T0 + dt.timedelta(days=1), 2, T0, 3, "old"),  # an older copy never evicts
        (T0, 1, T0, 2, "new"),  # the same notBefore: the higher serial
        (T0, 5, T0, 2, "old"),
    ],
)
def test_renewal_by_name_and_notbefore(
    old_nb: dt.datetime, old_serial: int, new_nb: dt.datetime, new_serial: int, winner: str
) -> None:
    w = World()
    old, _ = w.join(ident("alice", "10.8.0.2", serial=old_serial, not_before=old_nb))
    new, effects = w.join(ident("alice", "10.8.0.2", serial=new_serial, not_before=new_nb))
    if winner == "new":
        # The old session drains (what it already carries is still delivered), then closes.
        assert of_type(effects, Drain) == [
            Drain(old.key, 1.0, CloseCode.REPLACED, "replaced by a renewed certificate")
        ]
        assert old.successor is new
        assert [a.fields["event"] for a in of_type(effects, Audit)] == ["replaced", "auth_accepted"]
    else:
        msg = "a newer certificate of this peer is already connected"
        assert effects == [Close(new.key, CloseCode.ADDRESS_CONFLICT, msg)]
    owner = w.core.table.lookup(ipaddress.ip_address("10.8.0.2"))
    assert owner is (new if winner == "new" else old)


def test_a_renewal_under_another_ca_is_a_different_peer() -> None:
    w = World()
    w.join(ident("alice", "10.8.0.2", issuer="CN=one"))
    new, effects = w.join(ident("alice", "10.8.0.3", issuer="CN=two", serial=9))
    assert not closes(effects) and new.admitted


def test_a_renewal_under_the_rotated_root_takes_over() -> None:
    # The next generation of the same CA (vpnctl ca rotate): the same peer, so the new
    # certificate takes over the live session instead of an address conflict.
    w = World()
    old_id = dataclasses.replace(
        ident("alice", "10.8.0.2", issuer="CN=corp-ca"), lineage="CN=corp-ca"
    )
    new_id = dataclasses.replace(
        ident("alice", "10.8.0.2", issuer="2.5.4.44=2,CN=corp-ca", serial=9),
        lineage="CN=corp-ca",
        generation=2,
    )
    old, _ = w.join(old_id)
    new, effects = w.join(new_id)
    assert of_type(effects, Drain) == [
        Drain(old.key, 1.0, CloseCode.REPLACED, "replaced by a renewed certificate")
    ]
    assert w.core.table.lookup(ipaddress.ip_address("10.8.0.2")) is new


# (seconds since the first session, admitted?) with 2 takeovers per 10 s, a 30 s hold.
HOLDDOWN = [
    (0.0, True),  # the first session
    (1.0, True),  # takeover 1
    (2.0, True),  # takeover 2
    (3.0, False),  # the third within 10 s starts the hold-down
    (20.0, False),  # held: the attempt extends the hold to 50 s
    (49.0, False),  # still held (extended to 79 s)
    (80.0, True),  # 30 s with no attempt: allowed again
    (81.0, True),
]


def test_clone_holddown_over_stepped_time() -> None:
    w = World()
    start = w.now
    holder: PeerState | None = None
    audits: list[str] = []
    for at, admitted in HOLDDOWN:
        w.now = start + at
        peer, effects = w.join(ident("alice", "10.8.0.2"))
        audits += [str(a.fields["event"]) for a in of_type(effects, Audit)]
        assert peer.admitted is admitted, at
        if admitted:
            if holder is not None:
                assert closes(effects) == [
                    (holder.key, CloseCode.REPLACED, "replaced by a newer connection")
                ]
                w.core.lost(holder, "replaced")
            holder = peer
        else:
            reason = "this certificate is in use from another host; possible copy"
            assert closes(effects) == [(peer.key, CloseCode.POLICY, reason)]
            w.core.lost(peer, "held down")
        assert w.core.table.lookup(ipaddress.ip_address("10.8.0.2")) is holder
    assert audits.count("clone_holddown") == 1  # audited once per hold-down, not per attempt
    assert w.core.totals["clone_holddowns"] == 1
    assert w.core.handshakes["refused_clone_holddown"] == 3


def test_holddown_off_means_takeovers_forever() -> None:
    w = World(holddown_takeovers=0)
    for _ in range(10):
        w.step(0.1)
        peer, _ = w.join(ident("alice", "10.8.0.2"))
        assert peer.admitted


# ---- addresses, routes, limits ---------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "routes", "held"),
    [
        (("10.8.0.2",), (), "10.8.0.2/32"),
        (("10.8.0.7", "10.8.0.2"), (), "10.8.0.2/32"),
        (("10.8.0.7",), ("192.168.60.0/25",), "192.168.60.0/25"),  # inside alice's subnet
    ],
)
def test_an_address_conflict_names_nobody_to_the_refused_peer(
    claims: tuple[str, ...], routes: tuple[str, ...], held: str
) -> None:
    w = World()
    alice, _ = w.join(ident("alice", "10.8.0.2", serial=1, routes=("192.168.60.0/24",)))
    bob, effects = w.join(ident("bob", *claims, serial=2, routes=routes))
    assert closes(effects) == [
        (bob.key, CloseCode.ADDRESS_CONFLICT, f"{held} is held by another peer")
    ]
    assert "alice" not in closes(effects)[0][2]
    (record,) = of_type(effects, Audit)
    assert record.fields["holder"] == "alice"  # our own audit log may name the holder
    assert not bob.admitted and w.core.table.owners() == [alice]
    assert not of_type(effects, AddRoute) and not of_type(effects, SendConfig)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.8.0.1", "address 10.8.0.1 is the gateway's own"),
        ("fd00:8::1", "address fd00:8::1 is the gateway's own"),
        ("10.8.0.0", "address 10.8.0.0 is the network address of 10.8.0.0/24"),
        ("10.8.0.255", "address 10.8.0.255 is the broadcast address of 10.8.0.0/24"),
        ("fd00:8::", "address fd00:8:: is the network address of fd00:8::/64"),
        ("10.9.0.2", "address 10.9.0.2/32 is outside the overlay"),
    ],
)
def test_reserved_and_outside_addresses_are_refused(address: str, why: str) -> None:
    w = World()
    peer, effects = w.join(ident("mallory", address))
    assert closes(effects) == [(peer.key, CloseCode.POLICY, why)]
    assert len(w.core.table) == 0


@pytest.mark.parametrize(
    ("route", "why"),
    [
        ("192.168.60.0/24", None),
        ("192.168.50.0/24", None),  # equal to a pushed route: the site-to-site case
        ("0.0.0.0/0", "is a default route"),
        ("10.8.0.0/16", "overlaps the overlay 10.8.0.0/24"),
        ("10.8.0.128/25", "overlaps the overlay 10.8.0.0/24"),
        ("192.168.0.0/16", "would capture the pushed route 192.168.50.0/24"),
        ("fd00:8::/48", "overlaps the overlay fd00:8::/64"),
    ],
)
def test_routed_subnets(route: str, why: str | None) -> None:
    w = World()
    peer, effects = w.join(ident("site", "10.8.0.9", routes=(route,)))
    if why is None:
        assert peer.admitted
        assert of_type(effects, AddRoute) == [AddRoute(peer.key, net(route))]
    else:
        ((key, code, message),) = closes(effects)
        assert (key, code) == (peer.key, CloseCode.POLICY) and why in message
        assert not peer.admitted and not of_type(effects, AddRoute)


def test_the_session_limit_refuses_new_peers_but_not_replacements() -> None:
    w = World(max_sessions=1)
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    bob, effects = w.join(ident("bob", "10.8.0.3", serial=2))
    assert closes(effects) == [
        (bob.key, CloseCode.RESOURCE_LIMIT, "gateway is at its session limit")
    ]
    again, effects = w.join(ident("alice", "10.8.0.2"))
    assert again.admitted and closes(effects)[0][0] == alice.key


def test_max_unadmitted_refuses_before_verifying() -> None:
    w = World(max_unadmitted=2)
    w.connect(ident("a", "10.8.0.2"))
    w.connect(ident("b", "10.8.0.3", serial=2))
    found = w.core.verify((b"junk",), "192.0.2.1:1", "192.0.2.1", wall=NOW.timestamp(), now=w.now)
    assert found == [Refuse(CloseCode.RESOURCE_LIMIT, "too many sessions setting up")]
    assert w.core.handshakes["refused_resource_limit"] == 1


# ---- verification and trust ------------------------------------------------------------


def _verified(w: World, chain: tuple[bytes, ...]) -> PeerState:
    found = w.core.verify(chain, "192.0.2.1:1", "192.0.2.1", wall=NOW.timestamp(), now=w.now)
    assert not isinstance(found, list), found
    return w.connect(found, chain=chain)


def test_trust_changes_close_revoked_peers_and_peers_of_a_removed_ca() -> None:
    ca, other = make_ca(networks=OVERLAY), make_ca("other-ca", networks=OVERLAY)
    alice_leaf, bob_leaf = (
        ca.issue("alice", addresses=["10.8.0.2"]),
        ca.issue("bob", addresses=["10.8.0.3"]),
    )
    w = World(trust=ca.trust())
    der = [(leaf.cert.public_bytes(Encoding.DER),) for leaf in (alice_leaf, bob_leaf)]
    alice, bob = (_verified(w, chain) for chain in der)
    for peer in (alice, bob):
        assert w.hello(peer)
    wall = NOW.timestamp()
    # A stale CRL does not cut verified sessions.
    stale = ca.trust(crls=[ca.crl(this_update=NOW - 9 * DAY, next_update=NOW - DAY)])
    assert w.core.apply_trust(stale, wall=wall) == ([], [])
    names, effects = w.core.apply_trust(ca.trust(revoked=[alice_leaf]), wall=wall)
    assert names == ["alice"]
    assert [(k, c) for k, c, _ in closes(effects)] == [(alice.key, CloseCode.REVOKED)]
    w.core.lost(alice, "revoked")
    names, effects = w.core.apply_trust(other.trust(), wall=wall)
    assert names == ["bob"]
    assert [(k, c) for k, c, _ in closes(effects)] == [(bob.key, CloseCode.AUTH_FAILED)]


def test_unusable_revocation_data_refuses_every_new_peer() -> None:
    ca = make_ca(networks=OVERLAY)
    w = World(trust=ca.trust())
    assert w.core.refuse_new_peers("crl.pem unreadable") == [
        Log(40, "REFUSING ALL NEW PEERS: crl.pem unreadable")
    ]
    assert w.core.refuse_new_peers("crl.pem unreadable") == []  # said once
    chain = (ca.issue("alice", addresses=["10.8.0.2"]).cert.public_bytes(Encoding.DER),)
    found = w.core.verify(chain, "192.0.2.1:1", "192.0.2.1", wall=NOW.timestamp(), now=w.now)
    assert isinstance(found, list)
    (record,) = of_type(found, Audit)
    assert record.fields["peer"] == "alice" and record.fields["reason"] == "crl_missing"
    assert of_type(found, Refuse) == [Refuse(CloseCode.AUTH_FAILED, "crl_missing")]
    w.core.apply_trust(ca.trust(), wall=NOW.timestamp())
    assert w.core.trust_error is None
    assert not isinstance(
        w.core.verify(chain, "192.0.2.1:1", "192.0.2.1", wall=NOW.timestamp(), now=w.now), list
    )


# ---- CONFIG after the anti-spoofing set, and clean-up ----------------------------------


@pytest.mark.parametrize("sources", [True, False])
def test_config_waits_for_the_nft_sources(sources: bool) -> None:
    w = World(sources=sources)
    peer, effects = w.join(ident("site", "10.8.0.9", "fd00:8::9", routes=("192.168.60.0/24",)))
    config = of_type(effects, SendConfig) + [
        e.then for e in of_type(effects, AddSources) if e.then is not None
    ]
    (send,) = config
    assert send.key == peer.key
    assert str(send.config.address) == "10.8.0.9/24"
    assert [str(a) for a in send.config.extra_addresses] == ["fd00:8::9/64"]
    # The overlays it has an address in are on-link; the rest are pushed.
    assert [str(r) for r in send.config.routes] == ["192.168.50.0/24"]
    if sources:
        # The only CONFIG rides on the set update: the shell sends it once that is done.
        assert not of_type(effects, SendConfig)
        (add,) = of_type(effects, AddSources)
        assert add.networks == (net("10.8.0.9/32"), net("fd00:8::9/128"), net("192.168.60.0/24"))
        assert effects[-1] is add
    else:
        assert effects[-1] == send


def test_losing_a_peer_frees_its_addresses_routes_and_sources() -> None:
    w = World(sources=True, policy=ALLOW)
    site, _ = w.join(ident("site", "10.8.0.9", routes=("192.168.60.0/24",)))
    to_tun, _ = w.core.from_peer(site, [ipv4("10.8.0.9", LAN, UDP, udp(1, 2))], False, w.now)
    assert to_tun and site.packets_in == 1
    effects = w.core.lost(site, "peer went away")
    assert of_type(effects, RemoveRoute) == [RemoveRoute(net("192.168.60.0/24"))]
    assert of_type(effects, RemoveSources) == [
        RemoveSources((net("10.8.0.9/32"), net("192.168.60.0/24")))
    ]
    (line,) = of_type(effects, Log)
    assert "peer went away" in line.message and line.key == site.key
    assert len(w.core.table) == 0 and not w.core.peers
    assert w.core.totals["packets_in"] == 1 and w.core.firewall.stats["entries"] == 0


def test_losing_a_peer_while_stopping_leaves_the_sources_to_the_teardown() -> None:
    w = World(sources=True)
    peer, _ = w.join(ident("alice", "10.8.0.2"))
    w.core.stopping = True
    assert not of_type(w.core.lost(peer, "shutdown"), RemoveSources)


def test_a_takeover_removes_only_what_the_new_certificate_drops() -> None:
    w = World(sources=True)
    old, _ = w.join(
        ident("site", "10.8.0.9", serial=1, routes=("192.168.60.0/24", "192.168.61.0/24"))
    )
    new, effects = w.join(
        ident("site", "10.8.0.9", serial=2, not_before=T0 + DAY, routes=("192.168.60.0/24",))
    )
    assert of_type(effects, RemoveRoute) == [RemoveRoute(net("192.168.61.0/24"))]
    assert of_type(effects, RemoveSources) == [RemoveSources((net("192.168.61.0/24"),))]
    # The old session's own end afterwards frees nothing the new one holds.
    assert [e for e in w.core.lost(old, "replaced") if not isinstance(e, Log)] == []
    assert w.core.table.owners() == [new]


def test_kick_closes_every_session_of_the_name() -> None:
    w = World()
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    w.join(ident("bob", "10.8.0.3", serial=2))
    effects = w.core.kick("alice", "bye")
    assert closes(effects) == [(alice.key, CloseCode.KICKED, "bye")]
    assert of_type(effects, Audit)[0].fields["reason_text"] == "bye"


# ---- policy ----------------------------------------------------------------------------


def test_a_policy_change_cuts_the_flows_it_no_longer_allows() -> None:
    w = World(policy=ALLOW)
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    syn = ipv4("10.8.0.2", LAN, TCP, tcp(40000, 22, SYN))
    reply = ipv4(LAN, "10.8.0.2", TCP, tcp(22, 40000, SYN | ACK))
    assert w.core.from_peer(alice, [syn], False, w.now)[0] == [syn]
    assert w.core.from_tun([reply], w.now) == {alice: [reply]}
    assert w.core.apply_policy(PolicyConfig(), now=w.now) == 1
    assert w.core.from_tun([reply], w.now) == {}
    assert w.core.drops["tun_not_tracked"] == 1
    assert w.core.from_peer(alice, [syn], False, w.now)[0] == []
    assert alice.drops["policy"] == 1


def test_flows_expire_on_the_tick() -> None:
    w = World(policy=ALLOW)
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    w.core.from_peer(alice, [ipv4("10.8.0.2", LAN, UDP, udp(1, 53))], False, w.now)
    assert w.core.tick(w.now + 1) == 0
    assert w.core.tick(w.now + 10_000) == 1


def test_the_host_own_addresses_need_an_exact_rule() -> None:
    w = World(policy=ALLOW)
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    # 10.8.0.1 is the gateway's overlay address: not the host's "own" LAN address.
    cut = w.core.host_addresses([ipaddress.ip_address("10.8.0.1"), ipaddress.ip_address(LAN)])
    assert cut == 0 and w.core.firewall.local_addresses == {ipaddress.ip_address(LAN).packed}
    w.core.from_peer(alice, [ipv4("10.8.0.2", LAN, UDP, udp(1, 53))], False, w.now)
    assert alice.drops["gateway_host_needs_exact_rule"] == 1


# ---- the data path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "drop"),
    [
        (ipv4("10.8.0.99", LAN, UDP, udp(1, 2)), Drop.SPOOFED_SOURCE),
        (ipv4("10.8.0.3", LAN, UDP, udp(1, 2)), Drop.SPOOFED_SOURCE),  # bob's address
        (ipv4("10.8.0.2", "10.8.0.7", UDP, udp(1, 2)), Drop.HAIRPIN),  # alice's own 2nd address
        (b"\x00" * 20, Drop.NOT_IP),
        (b"", Drop.NOT_IP),
        (ipv4("10.8.0.2", "10.8.0.3", UDP, udp(1, 2)), None),  # alice -> bob is allowed
        (ipv4("10.8.0.2", "203.0.113.9", UDP, udp(1, 2)), Drop.POLICY),
        (ipv6("fd00:8::2", "fd00:8::3", UDP, udp(1, 2)), None),
        (ipv4("10.8.0.2", LAN, TCP, b"\0" * 4), Drop.TRUNCATED),  # half a TCP header
    ],
)
def test_drops_from_a_peer(packet: bytes, drop: Drop | None) -> None:
    w = World(policy=ALLOW)
    alice, _ = w.join(ident("alice", "10.8.0.2", "10.8.0.7", "fd00:8::2"))
    bob, _ = w.join(ident("bob", "10.8.0.3", "fd00:8::3", serial=2))
    to_tun, to_peers = w.core.from_peer(alice, [packet], False, w.now)
    if drop is None:
        assert to_peers == {bob: [packet]} and alice.packets_in == 1
        assert alice.bytes_in == len(packet)
    else:
        assert dict(alice.drops) == {drop: 1}
        # A hairpin passed every check (it counts as received) but goes nowhere.
        assert alice.packets_in == (1 if drop is Drop.HAIRPIN else 0)
        assert not to_tun and not to_peers
    if drop is Drop.POLICY:
        (note,) = w.core.notes  # the denied packet is logged, rate-limited
        assert note.key == alice.key and "udp 10.8.0.2:1 -> 203.0.113.9:2" in note.message


def test_denied_lines_are_rate_limited_then_summed_up() -> None:
    w = World()
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    denied = [ipv4("10.8.0.2", LAN, UDP, udp(1, 2))] * 25
    w.core.from_peer(alice, denied, False, w.now)
    assert len(w.core.notes) == 20 and alice.drops["policy"] == 25
    w.core.notes.clear()
    w.step(61)
    w.core.from_peer(alice, denied[:1], False, w.now)
    assert [n.message for n in w.core.notes] == [
        "alice: 5 more similar lines suppressed",
        "denied udp 10.8.0.2:1 -> 192.168.50.10:2 (policy)",
    ]


@pytest.mark.parametrize(
    ("packet", "drop"),
    [
        (ipv4(LAN, "10.8.0.99", UDP, udp(1, 2)), "no_route"),
        (b"\x10" * 30, "tun_not_ip"),
        (ipv4(LAN, "10.8.0.2", UDP, udp(53, 1)), "tun_not_tracked"),  # never asked for
        (ipv4(LAN, "10.8.0.2", TCP, b"\0" * 4), "tun_truncated"),
    ],
)
def test_drops_from_the_tun(packet: bytes, drop: str) -> None:
    w = World(policy=ALLOW)
    w.join(ident("alice", "10.8.0.2"))
    assert w.core.from_tun([packet], w.now) == {}
    assert dict(w.core.drops) == {drop: 1}


def test_a_plain_peer_gets_the_tun_form_and_an_offload_tun_prefixes_it() -> None:
    w = World(policy=ALLOW, tun_vnet=True)
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    pkt = ipv4("10.8.0.2", LAN, UDP, udp(1, 2))
    (out,), _ = w.core.from_peer(alice, [pkt], False, w.now)
    assert bytes(out) == bytes(VNET_HDR_LEN) + pkt and not alice.offload
    # Back to a plain peer: the header comes off again.
    assert [bytes(p) for p in w.core.outbound(alice, [out], 0, LIMIT) or []] == [pkt]


def test_a_full_queue_drops_the_batch() -> None:
    w = World()
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    batch: list[bytes | memoryview] = [b"x" * 100] * 3
    assert w.core.outbound(alice, batch, LIMIT + 1, LIMIT) is None
    assert alice.drops["queue_full"] == 3
    assert w.core.outbound(alice, batch, 0, LIMIT) is batch


def test_bytes_out_counts_only_what_the_session_sent() -> None:
    w = World()
    alice, _ = w.join(ident("alice", "10.8.0.2"))
    session = established_gateway()
    c = session.counters
    big = b"x" * (session.config.max_frame - DATA_OVERHEAD + 1)
    refused = session.send_packets([b"y" * 100, big, b"z" * 50], w.now)
    w.core.sent(alice, c.packets_out, c.packet_bytes_out, refused, closed=session.closed)
    assert (alice.packets_out, alice.bytes_out, dict(alice.drops)) == (2, 150, {"oversize": 1})
    # A closed session refuses everything: nothing counts as sent, and it is not oversize.
    session.close(CloseCode.NORMAL, "bye", w.now)
    before = (c.packets_out, c.packet_bytes_out)
    refused = session.send_packets([b"y" * 10, b"z" * 10], w.now)
    w.core.sent(
        alice,
        c.packets_out - before[0],
        c.packet_bytes_out - before[1],
        refused,
        closed=session.closed,
    )
    assert (alice.packets_out, alice.bytes_out) == (2, 150)
    assert dict(alice.drops) == {"oversize": 1, "closed": 2}


def test_packets_for_a_peer_awaiting_config_are_held_then_released() -> None:
    # A renewal takes the addresses over at once, but CONFIG waits for the nft set: a
    # reply from the LAN in between must neither reach a session that cannot take DATA
    # yet nor be lost.
    w = World(sources=True)
    alice = w.connect(ident("alice", "10.8.0.2"))
    effects = w.hello(alice)
    assert alice.admitted and not alice.configured
    assert not of_type(effects, SendConfig)  # it rides on AddSources.then
    batch: list[bytes | memoryview] = [b"a" * 100, b"b" * 100]
    assert w.core.outbound(alice, batch, 0, LIMIT) is None
    assert w.core.outbound(alice, [b"c" * (LIMIT - 200 + 1)], 0, LIMIT) is None  # over: dropped
    assert alice.drops["queue_full"] == 1
    assert [bytes(p) for p in w.core.configured(alice)] == [b"a" * 100, b"b" * 100]
    assert w.core.outbound(alice, batch, 0, LIMIT) is batch  # configured: straight through
    assert w.core.configured(alice) == []


def test_an_unadmitted_peer_gets_nothing() -> None:
    w = World()
    alice = w.connect(ident("alice", "10.8.0.2"))
    assert w.core.outbound(alice, [b"x"], 0, LIMIT) is None


def test_the_offload_flag_needs_both_ends() -> None:
    for tun_vnet, hello, expect in [(True, True, True), (True, False, False), (False, True, False)]:
        w = World(tun_vnet=tun_vnet)
        peer = w.connect(ident("alice", "10.8.0.2"))
        (send,) = of_type(w.hello(peer, offload=hello), SendConfig)
        assert peer.offload is expect and send.config.offload is expect


@pytest.mark.parametrize(
    ("used", "sizes", "vnet", "serve", "left"),
    [
        # (packets already charged this turn, the batch, vnet?, served now or None, after)
        (0, [1] * 10, False, None, 10),  # fits: charged, nothing held back
        (30, [1] * 10, False, 2, 0),  # two fit, the rest waits for the next turn
        (32, [1] * 3, False, 0, 0),  # already spent: nothing now
        (0, [1] * 32, False, 32, 0),  # exactly the budget: spent, the next batch waits
        (0, [20, 20], True, 2, 0),  # GSO: 20 + 20 segments pass 32 on the second packet
        (0, [20, 1], True, None, 21),
    ],
)
def test_the_fair_share_budget_of_a_loop_turn(
    used: int, sizes: list[int], vnet: bool, serve: int | None, left: int
) -> None:
    peer = w_peer()
    peer.turn_packets = used
    packets = [tso(segments) if vnet else b"p" for segments in sizes]
    assert charge_turn(peer, packets, vnet, budget=32) == serve
    assert peer.turn_packets == left
    assert peer.turn_yields == (0 if serve is None else 1)


def w_peer() -> PeerState:
    return World().connect(ident("alice", "10.8.0.2"))


def tso(segments: int, mss: int = 100) -> bytes:
    """A TCPv4 GSO super-packet (virtio header first) that segments into ``segments``."""
    ip = ipv4("10.8.0.2", LAN, TCP, tcp(1, 2, ACK) + b"x" * (mss * segments))
    return bytes([1, 1]) + struct.pack("<HHHH", 40, mss, 20, 16) + ip
