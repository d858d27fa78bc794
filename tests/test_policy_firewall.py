"""vpnd.policy.firewall: the allow/deny matrix of the example policy, v4 and v6 rules."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fixtures import (
    ACK,
    GRE,
    ICMP,
    ICMPV6,
    SYN,
    TCP,
    UDP,
    icmp,
    ipv4,
    ipv6,
    peer,
    tcp,
    udp,
)

from vpnd.config import (
    AnyMatch,
    GroupMatch,
    NetworkMatch,
    PeerMatch,
    PolicyConfig,
    Proto,
    RuleConfig,
    load_policy,
)
from vpnd.policy.firewall import Firewall, PeerView

REPO = Path(__file__).resolve().parents[1]

# Peers, with their overlay addresses. The example policy (config/policy.yaml) says:
#   any -> {group: servers} icmp
#   {groups: [eng, oncall]} -> 198.51.100.0/24 tcp 22, 443, 8000-8100
#   {group: eng} -> 198.51.100.53/32 udp 53
#   {peer: monitor} -> {group: servers} tcp 9100
#   {peer: backup-1} -> {peer: nas} any
ALICE = peer("alice", "eng")
BOB = peer("bob", "eng", "oncall")
SRV = peer("srv", "servers", "web")
MONITOR = peer("monitor")
BACKUP = peer("backup-1")
NAS = peer("nas", "storage")
ONCALL_ONLY = peer("carol", "oncall")
IMPOSTOR = peer("monitor-2", "servers")  # not "monitor", though in the target group

ADDR = {
    "alice": "10.8.0.2",
    "bob": "10.8.0.3",
    "srv": "10.8.0.10",
    "monitor": "10.8.0.20",
    "backup-1": "10.8.0.30",
    "nas": "10.8.0.40",
    "carol": "10.8.0.50",
    "monitor-2": "10.8.0.60",
}
LAN = "198.51.100.10"


def example_policy() -> PolicyConfig:
    return load_policy(REPO / "config" / "policy.yaml")


def t4(
    src: PeerView | None, dst: str, dport: int, *, proto: int = TCP, sport: int = 40000
) -> bytes:
    s = ADDR[src.name] if src is not None else LAN
    l4 = tcp(sport, dport, SYN) if proto == TCP else udp(sport, dport)
    return ipv4(s, dst, proto, l4)


def ping4(src: PeerView | None, dst: str, ident: int = 1) -> bytes:
    s = ADDR[src.name] if src is not None else LAN
    return ipv4(s, dst, ICMP, icmp(8, ident=ident))


# (case, source peer, destination peer, packet, expected verdict)
MATRIX: list[tuple[str, PeerView | None, PeerView | None, bytes, str | None]] = [
    # any -> {group: servers} icmp
    ("anyone pings a server", ALICE, SRV, ping4(ALICE, ADDR["srv"]), None),
    ("no-group peer pings a server", MONITOR, SRV, ping4(MONITOR, ADDR["srv"]), None),
    ("ping a non-server peer", ALICE, NAS, ping4(ALICE, ADDR["nas"]), "policy"),
    ("server address but TUN side", ALICE, None, ping4(ALICE, ADDR["srv"]), "policy"),
    ("tcp to a server is not icmp", ALICE, SRV, t4(ALICE, ADDR["srv"], 22), "policy"),
    ("udp to a server is not icmp", ALICE, SRV, t4(ALICE, ADDR["srv"], 53, proto=UDP), "policy"),
    ("server pings back: a new flow", SRV, ALICE, ping4(SRV, ADDR["alice"]), "policy"),
    ("TUN side pings a server", None, SRV, ping4(None, ADDR["srv"]), "not_tracked"),
    # {groups: [eng, oncall]} -> 198.51.100.0/24 tcp 22, 443, 8000-8100 (all of the groups)
    ("eng+oncall ssh to the LAN", BOB, None, t4(BOB, LAN, 22), None),
    ("eng only: not all groups", ALICE, None, t4(ALICE, LAN, 22), "policy"),
    ("oncall only: not all groups", ONCALL_ONLY, None, t4(ONCALL_ONLY, LAN, 22), "policy"),
    ("port 21 (22-1)", BOB, None, t4(BOB, LAN, 21), "policy"),
    ("port 23 (22+1)", BOB, None, t4(BOB, LAN, 23), "policy"),
    ("port 443", BOB, None, t4(BOB, LAN, 443), None),
    ("port 7999 (lo-1)", BOB, None, t4(BOB, LAN, 7999), "policy"),
    ("port 8000 (lo)", BOB, None, t4(BOB, LAN, 8000), None),
    ("port 8100 (hi)", BOB, None, t4(BOB, LAN, 8100), None),
    ("port 8101 (hi+1)", BOB, None, t4(BOB, LAN, 8101), "policy"),
    ("CIDR first address", BOB, None, t4(BOB, "198.51.100.0", 22), None),
    ("CIDR last address", BOB, None, t4(BOB, "198.51.100.255", 22), None),
    ("just below the CIDR", BOB, None, t4(BOB, "198.51.99.255", 22), "policy"),
    ("just above the CIDR", BOB, None, t4(BOB, "198.51.101.0", 22), "policy"),
    ("udp 22 is not tcp", BOB, None, t4(BOB, LAN, 22, proto=UDP), "policy"),
    ("icmp to the LAN", BOB, None, ping4(BOB, LAN), "policy"),
    # {group: eng} -> 198.51.100.53/32 udp 53
    ("eng uses the resolver", ALICE, None, t4(ALICE, "198.51.100.53", 53, proto=UDP), None),
    ("eng+oncall has eng", BOB, None, t4(BOB, "198.51.100.53", 53, proto=UDP), None),
    ("resolver /32 only", ALICE, None, t4(ALICE, "198.51.100.54", 53, proto=UDP), "policy"),
    ("resolver udp 54", ALICE, None, t4(ALICE, "198.51.100.53", 54, proto=UDP), "policy"),
    ("resolver tcp 53", ALICE, None, t4(ALICE, "198.51.100.53", 53), "policy"),
    ("not eng", MONITOR, None, t4(MONITOR, "198.51.100.53", 53, proto=UDP), "policy"),
    # {peer: monitor} -> {group: servers} tcp 9100 (peer -> peer)
    ("monitor scrapes a server", MONITOR, SRV, t4(MONITOR, ADDR["srv"], 9100), None),
    ("monitor port 9099", MONITOR, SRV, t4(MONITOR, ADDR["srv"], 9099), "policy"),
    ("monitor port 9101", MONITOR, SRV, t4(MONITOR, ADDR["srv"], 9101), "policy"),
    ("monitor scrapes the nas", MONITOR, NAS, t4(MONITOR, ADDR["nas"], 9100), "policy"),
    ("another peer name", ALICE, SRV, t4(ALICE, ADDR["srv"], 9100), "policy"),
    ("a name prefix is not a name", IMPOSTOR, SRV, t4(IMPOSTOR, ADDR["srv"], 9100), "policy"),
    # {peer: backup-1} -> {peer: nas} any
    ("backup tcp 1", BACKUP, NAS, t4(BACKUP, ADDR["nas"], 1), None),
    ("backup udp 65535", BACKUP, NAS, t4(BACKUP, ADDR["nas"], 65535, proto=UDP), None),
    ("backup ping", BACKUP, NAS, ping4(BACKUP, ADDR["nas"]), None),
    ("backup gre", BACKUP, NAS, ipv4(ADDR["backup-1"], ADDR["nas"], GRE, b"\0" * 8), None),
    ("backup to a server", BACKUP, SRV, t4(BACKUP, ADDR["srv"], 22), "policy"),
    ("nas to backup: other way", NAS, BACKUP, t4(NAS, ADDR["backup-1"], 22), "policy"),
    ("nas address, TUN side", BACKUP, None, t4(BACKUP, ADDR["nas"], 22), "policy"),
    # default deny
    ("nothing allows this", ALICE, BOB, t4(ALICE, ADDR["bob"], 80), "policy"),
    ("TUN side to a peer", None, BOB, t4(None, ADDR["bob"], 22), "not_tracked"),
]


@pytest.mark.parametrize(
    ("src", "dst", "pkt", "verdict"),
    [case[1:] for case in MATRIX],
    ids=[case[0] for case in MATRIX],
)
def test_example_policy_matrix(
    src: PeerView | None, dst: PeerView | None, pkt: bytes, verdict: str | None
) -> None:
    fw = Firewall(example_policy())
    assert fw.check_packet(pkt, src=src, dst=dst, now=0.0) == verdict
    stats = fw.stats
    if verdict is None:
        assert stats["allowed_new"] == 1
    else:
        assert stats[f"dropped_{verdict}"] == 1
        assert stats["allowed_new"] == 0 and stats["entries"] == 0


def test_empty_policy_denies_everything_from_peers() -> None:
    fw = Firewall(PolicyConfig())
    for src, dst, pkt, _ in [case[1:] for case in MATRIX]:
        verdict = fw.check_packet(pkt, src=src, dst=dst, now=0.0)
        assert verdict == ("not_tracked" if src is None else "policy")
    assert fw.stats["entries"] == 0


# --- IPv6, and rules built directly ----------------------------------------------------

A6 = {"alice": "fd00::2", "bob": "fd00::3", "srv": "fd00::10"}
V6_RULES = PolicyConfig(
    rules=(
        RuleConfig(
            GroupMatch(frozenset({"eng"})),
            NetworkMatch(ipaddress.ip_network("fd00:50::/64")),
            Proto.TCP,
            ((22, 22),),
        ),
        RuleConfig(AnyMatch(), PeerMatch("srv"), Proto.ICMP),
        RuleConfig(PeerMatch("alice"), AnyMatch(), Proto.UDP, ((5000, 5010),)),
        # A CIDR covering overlay peers: it matches whichever side owns the address.
        RuleConfig(PeerMatch("bob"), NetworkMatch(ipaddress.ip_network("10.8.0.0/24")), Proto.ANY),
    )
)


def t6(src: str, dst: str, dport: int, proto: int = TCP) -> bytes:
    l4 = tcp(40000, dport, SYN) if proto == TCP else udp(40000, dport)
    return ipv6(A6.get(src, src), A6.get(dst, dst), proto, l4)


V6_MATRIX: list[tuple[str, PeerView | None, PeerView | None, bytes, str | None]] = [
    ("v6 eng ssh into the /64", ALICE, None, t6("alice", "fd00:50::1", 22), None),
    (
        "v6 last address of the /64",
        ALICE,
        None,
        t6("alice", "fd00:50::ffff:ffff:ffff:ffff", 22),
        None,
    ),
    ("v6 outside the /64", ALICE, None, t6("alice", "fd00:51::1", 22), "policy"),
    ("v6 port 23", ALICE, None, t6("alice", "fd00:50::1", 23), "policy"),
    ("v6 not eng", SRV, None, t6("srv", "fd00:50::1", 22), "policy"),
    (
        "icmpv6 echo to srv",
        BOB,
        SRV,
        ipv6(A6["bob"], A6["srv"], ICMPV6, icmp(128, ident=4)),
        None,
    ),
    ("icmpv4 echo to srv", BOB, SRV, ipv4(ADDR["bob"], ADDR["srv"], ICMP, icmp(8, ident=4)), None),
    (
        "icmpv6 inside ipv4 is not icmp",
        ALICE,
        SRV,
        ipv4(ADDR["alice"], ADDR["srv"], ICMPV6, icmp(128, ident=4)),
        "policy",
    ),
    (
        "icmpv4 inside ipv6 is not icmp",
        ALICE,
        SRV,
        ipv6(A6["alice"], A6["srv"], ICMP, icmp(8, ident=4)),
        "policy",
    ),
    ("udp 4999 (lo-1)", ALICE, None, t6("alice", "2001:db8::1", 4999, UDP), "policy"),
    ("udp 5000 (lo)", ALICE, None, t6("alice", "2001:db8::1", 5000, UDP), None),
    ("udp 5010 (hi)", ALICE, SRV, t6("alice", "srv", 5010, UDP), None),
    ("udp 5011 (hi+1)", ALICE, None, t6("alice", "2001:db8::1", 5011, UDP), "policy"),
    ("v4 CIDR rule to a peer", BOB, SRV, t4(BOB, ADDR["srv"], 9), None),
    ("v4 CIDR rule, TUN side", BOB, None, t4(BOB, "10.8.0.99", 9), None),
    ("v4 CIDR rule never matches v6", BOB, SRV, t6("bob", "srv", 9), "policy"),
]


@pytest.mark.parametrize(
    ("src", "dst", "pkt", "verdict"),
    [case[1:] for case in V6_MATRIX],
    ids=[case[0] for case in V6_MATRIX],
)
def test_v6_and_direct_rules(
    src: PeerView | None, dst: PeerView | None, pkt: bytes, verdict: str | None
) -> None:
    assert Firewall(V6_RULES).check_packet(pkt, src=src, dst=dst, now=0.0) == verdict


def test_first_matching_rule_is_enough() -> None:
    # Two rules, neither alone covers both ports: each packet needs only one of them.
    policy = PolicyConfig(
        rules=(
            RuleConfig(GroupMatch(frozenset({"eng"})), AnyMatch(), Proto.TCP, ((80, 80),)),
            RuleConfig(GroupMatch(frozenset({"oncall"})), AnyMatch(), Proto.TCP, ((443, 443),)),
        )
    )
    fw = Firewall(policy)
    assert fw.check_packet(t4(BOB, LAN, 80), src=BOB, dst=None, now=0) is None
    assert fw.check_packet(t4(BOB, LAN, 443), src=BOB, dst=None, now=0) is None
    assert fw.check_packet(t4(ALICE, LAN, 443), src=ALICE, dst=None, now=0) == "policy"


def test_malformed_packets_are_counted_by_reason() -> None:
    fw = Firewall(example_policy())
    assert fw.check_packet(b"", src=ALICE, dst=None, now=0) == "not_ip"
    assert fw.check_packet(t4(BOB, LAN, 22)[:30], src=BOB, dst=None, now=0) == "truncated"
    assert fw.check_packet(b"\x44" + t4(BOB, LAN, 22)[1:], src=BOB, dst=None, now=0) == "bad_ihl"
    stats = fw.stats
    assert (stats["dropped_not_ip"], stats["dropped_truncated"], stats["dropped_bad_ihl"]) == (
        1,
        1,
        1,
    )


def test_offset_skips_a_virtio_header() -> None:
    fw = Firewall(example_policy())
    assert (
        fw.check_packet(b"\0" * 10 + t4(BOB, LAN, 22), offset=10, src=BOB, dst=None, now=0) is None
    )


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=120),
    st.sampled_from([ALICE, BOB, BACKUP, None]),
    st.sampled_from([SRV, NAS, None]),
)
def test_random_bytes_never_raise(data: bytes, src: PeerView | None, dst: PeerView | None) -> None:
    fw = Firewall(example_policy(), max_conntrack=4)
    for prefix in (b"", b"\x45\x00", b"\x60\x00\x00\x00"):
        verdict = fw.check_packet(prefix + data, src=src, dst=dst, now=1.0)
        assert verdict is None or isinstance(verdict, str)
    assert len(fw.describe(data)) > 0


def test_describe() -> None:
    fw = Firewall(PolicyConfig())
    assert fw.describe(t4(BOB, LAN, 22)) == "tcp 10.8.0.3:40000 -> 198.51.100.10:22"
    assert fw.describe(b"\x45") == "malformed packet (truncated, 1 bytes)"
    assert fw.describe(b"\0" * 4 + ipv6("fd00::2", "fd00::3", UDP, udp(1, 2)), 4) == (
        "udp [fd00::2]:1 -> [fd00::3]:2"
    )


def test_tcp_without_syn_may_start_a_flow() -> None:
    # Like Nebula and Linux's loose tracking: sessions survive a gateway restart.
    fw = Firewall(example_policy())
    pkt = ipv4(ADDR["bob"], LAN, TCP, tcp(40000, 22, ACK))
    assert fw.check_packet(pkt, src=BOB, dst=None, now=0) is None
    assert fw.stats["allowed_new"] == 1


# --- the gateway host's own addresses: exact-host rules only ---------------------------

OPS = peer("dave", "ops")
GW_LAN = "192.168.50.1"  # the gateway host's own LAN address (sshd listens here)
GW_LAN6 = "fd00:50::1"
GW_OVERLAY = "10.8.0.1"  # the gateway's overlay address: not in local_addresses
LOCAL = frozenset(ipaddress.ip_address(a).packed for a in (GW_LAN, GW_LAN6))
HOST_RULES = PolicyConfig(
    rules=(
        # A: only ops may ssh to the gateway host itself, by its exact address.
        RuleConfig(
            GroupMatch(frozenset({"ops"})),
            NetworkMatch(ipaddress.ip_network(f"{GW_LAN}/32")),
            Proto.TCP,
            ((22, 22),),
        ),
        # B: eng may reach the whole LAN, the gateway's LAN address inside it.
        RuleConfig(
            GroupMatch(frozenset({"eng"})),
            NetworkMatch(ipaddress.ip_network("192.168.50.0/24")),
            Proto.ANY,
        ),
        RuleConfig(
            GroupMatch(frozenset({"eng"})),
            NetworkMatch(ipaddress.ip_network("fd00:50::/64")),
            Proto.ANY,
        ),
        RuleConfig(
            GroupMatch(frozenset({"eng"})),
            NetworkMatch(ipaddress.ip_network("10.8.0.0/24")),
            Proto.ANY,
        ),
        RuleConfig(PeerMatch("monitor"), AnyMatch(), Proto.TCP, ((22, 22),)),
        RuleConfig(
            PeerMatch("monitor"),
            NetworkMatch(ipaddress.ip_network(f"{GW_LAN6}/128")),
            Proto.TCP,
            ((22, 22),),
        ),
    )
)
ADDR["dave"] = "10.8.0.70"

HOST_MATRIX: list[tuple[str, PeerView | None, bytes, str | None]] = [
    ("eng via the LAN rule to the gateway's sshd", ALICE, t4(ALICE, GW_LAN, 22),
     "gateway_host_needs_exact_rule"),
    ("eng via the LAN rule, any port of the gateway", ALICE, t4(ALICE, GW_LAN, 8080),
     "gateway_host_needs_exact_rule"),
    ("eng pings the gateway's LAN address", ALICE, ping4(ALICE, GW_LAN),
     "gateway_host_needs_exact_rule"),
    ("ops via the exact rule", OPS, t4(OPS, GW_LAN, 22), None),
    ("ops, a port the exact rule omits", OPS, t4(OPS, GW_LAN, 23), "policy"),
    ("eng to a normal LAN host", ALICE, t4(ALICE, "192.168.50.10", 22), None),
    ("ops to a normal LAN host: no rule", OPS, t4(OPS, "192.168.50.10", 22), "policy"),
    ("eng to the gateway's overlay address", ALICE, t4(ALICE, GW_OVERLAY, 53), None),
    ("to: any does not reach the gateway host", MONITOR, t4(MONITOR, GW_LAN, 22),
     "gateway_host_needs_exact_rule"),
    ("to: any still reaches a LAN host", MONITOR, t4(MONITOR, "192.168.50.10", 22), None),
    ("v6 eng via the /64 to the gateway", ALICE, t6("alice", GW_LAN6, 22),
     "gateway_host_needs_exact_rule"),
    ("v6 eng to a normal LAN host", ALICE, t6("alice", "fd00:50::10", 22), None),
    ("v6 monitor via the exact /128", MONITOR, ipv6("fd00::20", GW_LAN6, TCP, tcp(1, 22, SYN)),
     None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("src", "pkt", "verdict"),
    [case[1:] for case in HOST_MATRIX],
    ids=[case[0] for case in HOST_MATRIX],
)
def test_gateway_host_needs_an_exact_rule(
    src: PeerView | None, pkt: bytes, verdict: str | None
) -> None:
    fw = Firewall(HOST_RULES, local_addresses=LOCAL)
    assert fw.check_packet(pkt, src=src, dst=None, now=0.0) == verdict
    if verdict is not None:
        assert fw.stats[f"dropped_{verdict}"] == 1 and fw.stats["entries"] == 0


def test_without_local_addresses_the_subnet_rule_matches_as_before() -> None:
    # What the gap was: the userspace firewall alone let eng through to the gateway host.
    fw = Firewall(HOST_RULES)
    assert fw.check_packet(t4(ALICE, GW_LAN, 22), src=ALICE, dst=None, now=0.0) is None


def test_reload_cuts_a_flow_to_the_gateway_host_without_an_exact_rule() -> None:
    fw = Firewall(HOST_RULES, local_addresses=LOCAL)
    assert fw.check_packet(t4(OPS, GW_LAN, 22), src=OPS, dst=None, now=0.0) is None
    # The exact rule is gone; the ops peer is now also in eng, whose /24 rule remains.
    both = peer("dave", "ops", "eng")
    cut = fw.replace_policy(
        PolicyConfig(rules=HOST_RULES.rules[1:]),
        now=1.0,
        peers=lambda a: both if a == ipaddress.ip_address(ADDR["dave"]).packed else None,
    )
    assert cut == 1 and fw.stats["entries"] == 0


def test_an_address_that_becomes_the_gateways_own_cuts_subnet_flows() -> None:
    fw = Firewall(HOST_RULES)
    assert fw.check_packet(t4(ALICE, GW_LAN, 22), src=ALICE, dst=None, now=0.0) is None
    assert fw.check_packet(t4(OPS, GW_LAN, 22), src=OPS, dst=None, now=0.0) is None
    owners = {ipaddress.ip_address(ADDR[p.name]).packed: p for p in (ALICE, OPS)}
    assert fw.set_local_addresses(LOCAL, peers=owners.get) == 1  # alice's flow only
    assert fw.local_addresses == LOCAL and fw.stats["entries"] == 1
    assert fw.set_local_addresses(LOCAL, peers=owners.get) == 0
    assert fw.check_packet(t4(ALICE, GW_LAN, 22), src=ALICE, dst=None, now=1.0) == (
        "gateway_host_needs_exact_rule"
    )
