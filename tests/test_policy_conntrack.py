"""vpnd.policy firewall state: replies, timeouts (stepped clock), ICMP errors, fragments,
TCP endings, the size bound, reload re-evaluation and address purges."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from policy_fixtures import (
    ACK,
    FIN,
    ICMP,
    ICMPV6,
    RST,
    SYN,
    TCP,
    UDP,
    frag6,
    icmp,
    icmp_error,
    ipv4,
    ipv6,
    peer,
    raw,
    tcp,
    udp,
)

from vpnd.config import (
    AnyMatch,
    ConntrackConfig,
    GroupMatch,
    NetworkMatch,
    PeerMatch,
    PolicyConfig,
    Proto,
    RuleConfig,
)
from vpnd.policy.firewall import Firewall, PeerView

BOB = peer("bob", "eng", "oncall")
ALICE = peer("alice", "eng")
NAS = peer("nas", "storage")
BOB4, ALICE4, NAS4, LAN4, ROUTER4 = "10.8.0.3", "10.8.0.2", "10.8.0.40", "198.51.100.10", "10.8.0.1"
BOB6, LAN6, ROUTER6 = "fd00::3", "fd00:50::10", "fd00:50::1"

CT = ConntrackConfig(tcp_timeout=60.0, udp_timeout=20.0, icmp_timeout=5.0)


def net(text: str) -> NetworkMatch:
    return NetworkMatch(ipaddress.ip_network(text))


LAN_SSH = RuleConfig(
    GroupMatch(frozenset({"oncall"})), net("198.51.100.0/24"), Proto.TCP, ((22, 22),)
)
LAN_DNS = RuleConfig(GroupMatch(frozenset({"eng"})), net("198.51.100.0/24"), Proto.UDP, ((53, 53),))
LAN_PING = RuleConfig(AnyMatch(), net("198.51.100.0/24"), Proto.ICMP)
V6_ALL = RuleConfig(GroupMatch(frozenset({"eng"})), net("fd00:50::/64"), Proto.ANY)
TO_NAS = RuleConfig(PeerMatch("bob"), PeerMatch("nas"), Proto.TCP, ((445, 445),))
POLICY = PolicyConfig(rules=(LAN_SSH, LAN_DNS, LAN_PING, V6_ALL, TO_NAS), conntrack=CT)


def ssh(sport: int = 40000, flags: int = SYN) -> bytes:
    return ipv4(BOB4, LAN4, TCP, tcp(sport, 22, flags))


def ssh_reply(sport: int = 40000, flags: int = ACK) -> bytes:
    return ipv4(LAN4, BOB4, TCP, tcp(22, sport, flags))


def dns(sport: int = 5353) -> bytes:
    return ipv4(ALICE4, LAN4, UDP, udp(sport, 53))


def dns_reply(sport: int = 5353) -> bytes:
    return ipv4(LAN4, ALICE4, UDP, udp(53, sport))


class Gateway:
    """The firewall plus the sides the gateway would pass for each address."""

    def __init__(self, policy: PolicyConfig = POLICY, *, max_conntrack: int = 65536) -> None:
        self.fw = Firewall(policy, max_conntrack=max_conntrack)
        self.owner: dict[bytes, PeerView] = {
            raw(BOB4): BOB,
            raw(ALICE4): ALICE,
            raw(NAS4): NAS,
            raw(BOB6): BOB,
        }
        self.now = 0.0

    def send(self, pkt: bytes, *, at: float | None = None) -> str | None:
        if at is not None:
            self.now = at
        src = self.owner.get(pkt_src(pkt))
        dst = self.owner.get(pkt_dst(pkt))
        return self.fw.check_packet(pkt, src=src, dst=dst, now=self.now)

    def peers(self) -> Callable[[bytes], PeerView | None]:
        return self.owner.get


def pkt_src(pkt: bytes) -> bytes:
    return pkt[12:16] if pkt[0] >> 4 == 4 else pkt[8:24]


def pkt_dst(pkt: bytes) -> bytes:
    return pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40]


# --- replies and timeouts ----------------------------------------------------------------


def test_reply_allowed_then_new_tun_flow_denied() -> None:
    gw = Gateway()
    assert gw.send(ssh()) is None
    assert gw.send(ssh_reply(flags=SYN | ACK)) is None
    assert gw.send(ssh(flags=ACK)) is None
    assert gw.send(ssh_reply(sport=40001)) == "not_tracked"  # not the tracked port pair
    assert gw.send(ipv4(LAN4, BOB4, TCP, tcp(2222, 40000))) == "not_tracked"
    assert gw.fw.stats == {
        "allowed_new": 1,
        "allowed_tracked": 2,
        "allowed_related": 0,
        "allowed_fragment": 0,
        "dropped_not_tracked": 2,
        "evicted": 0,
        "evicted_peer_limit": 0,
        "expired": 0,
        "entries": 1,
    }


@pytest.mark.parametrize(
    ("first", "reply", "timeout"),
    [
        (ssh(), ssh_reply(), 60.0),
        (dns(), dns_reply(), 20.0),
        (
            ipv4(BOB4, LAN4, ICMP, icmp(8, ident=7)),
            ipv4(LAN4, BOB4, ICMP, icmp(0, ident=7)),
            5.0,
        ),
        (
            ipv6(BOB6, LAN6, ICMPV6, icmp(128, ident=7)),
            ipv6(LAN6, BOB6, ICMPV6, icmp(129, ident=7)),
            5.0,
        ),
        (ipv6(BOB6, LAN6, 132, b"\0" * 12), ipv6(LAN6, BOB6, 132, b"\0" * 12), 20.0),  # SCTP
    ],
    ids=["tcp", "udp", "icmp", "icmpv6", "other-proto"],
)
def test_idle_timeout_per_protocol(first: bytes, reply: bytes, timeout: float) -> None:
    gw = Gateway()
    assert gw.send(first, at=100.0) is None
    # Every packet restarts the idle timer: replies just inside the timeout keep it alive.
    assert gw.send(reply, at=100.0 + timeout - 1) is None
    assert gw.send(reply, at=100.0 + 2 * timeout - 2) is None
    assert gw.send(reply, at=100.0 + 3 * timeout - 2) == "not_tracked"
    assert gw.fw.stats["expired"] == 1
    assert gw.fw.stats["entries"] == 0


def test_icmp_echo_identifier_and_direction() -> None:
    gw = Gateway()
    assert gw.send(ipv4(BOB4, LAN4, ICMP, icmp(8, ident=7))) is None
    assert gw.send(ipv4(LAN4, BOB4, ICMP, icmp(0, ident=8))) == "not_tracked"  # other id
    # The LAN may not turn the flow into its own pings to bob.
    assert gw.send(ipv4(LAN4, BOB4, ICMP, icmp(8, ident=7))) == "not_tracked"
    assert gw.send(ipv4(LAN4, BOB4, ICMP, icmp(0, ident=7))) is None


def test_unsolicited_echo_reply_from_a_peer_is_not_a_flow() -> None:
    gw = Gateway()
    assert gw.send(ipv4(BOB4, LAN4, ICMP, icmp(0, ident=7))) == "not_tracked"
    assert gw.fw.stats["entries"] == 0


def test_peer_to_peer_reply_and_direction() -> None:
    gw = Gateway()
    assert gw.send(ipv4(BOB4, NAS4, TCP, tcp(50000, 445, SYN))) is None
    assert gw.send(ipv4(NAS4, BOB4, TCP, tcp(445, 50000, SYN | ACK))) is None
    # The nas may not open its own connection to bob.
    assert gw.send(ipv4(NAS4, BOB4, TCP, tcp(445, 50001, SYN))) == "policy"


def test_a_reassigned_address_does_not_inherit_flows() -> None:
    gw = Gateway()
    assert gw.send(ssh()) is None
    gw.owner[raw(BOB4)] = ALICE  # bob left, alice got the address (nobody forgot it)
    assert gw.send(ssh_reply()) == "not_tracked"
    assert gw.send(ssh(flags=ACK)) == "policy"  # alice lacks oncall
    gw.owner[raw(BOB4)] = BOB
    assert gw.send(ssh_reply()) is None  # the mismatches did not cut bob's flow


def test_tun_side_spoofing_a_peer_source_cannot_cut_its_flow() -> None:
    gw = Gateway()
    assert gw.send(ssh()) is None
    # bob's own packet, but arriving from the TUN side (spoofed on the LAN).
    assert gw.fw.check_packet(ssh(flags=RST), src=None, dst=None, now=0.0) == "not_tracked"
    assert gw.send(ssh_reply(), at=30.0) is None  # the RST did not shorten the flow


# --- TCP endings -------------------------------------------------------------------------


def test_rst_shortens_the_flow() -> None:
    gw = Gateway()
    assert gw.send(ssh(), at=0.0) is None
    assert gw.send(ssh_reply(flags=RST | ACK), at=1.0) is None
    assert gw.send(ssh(flags=ACK), at=10.0) is None  # a late segment still passes
    assert gw.send(ssh_reply(), at=20.1) == "not_tracked"  # 10 s after the last packet


def test_both_fins_shorten_the_flow_one_fin_does_not() -> None:
    gw = Gateway()
    assert gw.send(ssh(), at=0.0) is None
    assert gw.send(ssh(flags=FIN | ACK), at=1.0) is None
    assert gw.send(ssh_reply(), at=50.0) is None  # a half-close keeps the full timeout
    policy = PolicyConfig(rules=POLICY.rules, conntrack=ConntrackConfig(tcp_timeout=3600.0))
    gw2 = Gateway(policy)
    assert gw2.send(ssh(), at=0.0) is None
    assert gw2.send(ssh(flags=FIN | ACK), at=1.0) is None
    assert gw2.send(ssh_reply(flags=FIN | ACK), at=2.0) is None
    assert gw2.send(ssh(flags=ACK), at=100.0) is None
    assert gw2.send(ssh_reply(), at=220.0) == "not_tracked"  # 120 s after both FINs


def test_syn_on_a_closing_flow_is_a_new_flow() -> None:
    gw = Gateway()
    assert gw.send(ssh(), at=0.0) is None
    assert gw.send(ssh_reply(flags=RST), at=1.0) is None
    assert gw.send(ssh(flags=SYN), at=2.0) is None  # port reuse: judged by the rules again
    assert gw.fw.stats["allowed_new"] == 2
    assert gw.send(ssh_reply(), at=40.0) is None  # full timeout again, not 10 s


# --- ICMP errors -------------------------------------------------------------------------


def test_pmtu_error_for_a_tracked_flow_is_allowed() -> None:
    gw = Gateway()
    original = ssh(flags=ACK)
    assert gw.send(ssh()) is None
    frag_needed = ipv4(ROUTER4, BOB4, ICMP, icmp_error(3, original, code=4, keep=28))
    assert gw.send(frag_needed) is None
    assert gw.fw.stats["allowed_related"] == 1


def test_icmpv6_packet_too_big_for_a_tracked_flow() -> None:
    gw = Gateway()
    original = ipv6(BOB6, LAN6, UDP, udp(4000, 4433, b"x" * 1400))
    assert gw.send(original) is None
    ptb = ipv6(ROUTER6, BOB6, ICMPV6, icmp_error(2, original, keep=1232))
    assert gw.send(ptb) is None


def test_error_about_the_reply_direction() -> None:
    gw = Gateway()
    assert gw.send(dns()) is None
    # alice's host answers the resolver's reply with port unreachable.
    unreachable = ipv4(ALICE4, LAN4, ICMP, icmp_error(3, dns_reply(), code=3))
    assert gw.send(unreachable) is None


@pytest.mark.parametrize(
    ("error", "src", "dst"),
    [
        # quoting a flow nobody opened
        (ipv4(ROUTER4, BOB4, ICMP, icmp_error(3, ssh(sport=1234))), None, BOB),
        # quoting the tracked flow, but sent to someone other than its sender
        (ipv4(ROUTER4, ALICE4, ICMP, icmp_error(3, ssh())), None, ALICE),
        # from a peer that is not the flow's other side
        (ipv4(ALICE4, BOB4, ICMP, icmp_error(3, ssh())), ALICE, BOB),
    ],
    ids=["untracked", "wrong-recipient", "wrong-sender"],
)
def test_icmp_errors_that_do_not_belong_are_dropped(
    error: bytes, src: PeerView | None, dst: PeerView | None
) -> None:
    gw = Gateway()
    assert gw.send(ssh()) is None
    assert gw.fw.check_packet(error, src=src, dst=dst, now=0.0) == "icmp_untracked"


def test_icmp_error_after_the_flow_expired() -> None:
    gw = Gateway()
    assert gw.send(ssh(), at=0.0) is None
    error = ipv4(ROUTER4, BOB4, ICMP, icmp_error(11, ssh()))
    assert gw.send(error, at=59.0) is None
    assert gw.send(error, at=60.0) == "icmp_untracked"  # errors do not refresh the flow


# --- fragments ---------------------------------------------------------------------------


def big_dns(
    ident: int, *, more: bool, offset: int = 0, src: str = ALICE4, dst: str = LAN4
) -> bytes:
    if offset == 0:
        return ipv4(src, dst, UDP, udp(5353, 53, b"q" * 40), ident=ident, more=more)
    return ipv4(src, dst, UDP, b"q" * 48, ident=ident, more=more, frag_offset=offset)


def test_later_fragments_follow_their_first_fragment() -> None:
    gw = Gateway()
    assert gw.send(big_dns(77, more=True)) is None
    assert gw.send(big_dns(77, more=True, offset=48)) is None
    assert gw.send(big_dns(77, more=False, offset=96)) is None
    assert gw.send(big_dns(78, more=False, offset=48)) == "fragment"  # no first fragment
    assert gw.fw.stats["allowed_fragment"] == 2


def test_fragments_of_a_denied_datagram_stay_denied() -> None:
    gw = Gateway()
    first = ipv4(ALICE4, LAN4, UDP, udp(5353, 54, b"q" * 40), ident=5, more=True)
    assert gw.send(first) == "policy"
    assert gw.send(big_dns(5, more=False, offset=48)) == "fragment"


def test_fragment_state_times_out_and_is_per_side() -> None:
    gw = Gateway()
    assert gw.send(big_dns(9, more=True), at=0.0) is None
    later = big_dns(9, more=False, offset=48)
    assert gw.fw.check_packet(later, src=BOB, dst=None, now=1.0) == "fragment"  # other peer
    assert gw.send(later, at=29.0) is None
    assert gw.send(later, at=30.0) == "fragment"


def test_reply_fragments_from_the_tun_side() -> None:
    gw = Gateway()
    assert gw.send(dns()) is None
    first = ipv4(LAN4, ALICE4, UDP, udp(53, 5353, b"a" * 40), ident=11, more=True)
    assert gw.send(first) is None
    assert gw.send(ipv4(LAN4, ALICE4, UDP, b"a" * 16, ident=11, frag_offset=48)) is None
    # A first fragment of a new flow from the TUN side opens nothing.
    other = ipv4(LAN4, ALICE4, UDP, udp(53, 9999, b"a" * 40), ident=12, more=True)
    assert gw.send(other) == "not_tracked"
    assert gw.send(ipv4(LAN4, ALICE4, UDP, b"a" * 16, ident=12, frag_offset=48)) == "fragment"


def test_ipv6_fragments() -> None:
    gw = Gateway()
    first = ipv6(BOB6, LAN6, UDP, udp(1, 2, b"b" * 64), headers=[(44, frag6(0, True, 0xABCDEF))])
    later = ipv6(BOB6, LAN6, UDP, b"b" * 64, headers=[(44, frag6(72, False, 0xABCDEF))])
    stray = ipv6(BOB6, LAN6, UDP, b"b" * 64, headers=[(44, frag6(72, False, 0xABCDE0))])
    assert gw.send(later) == "fragment"  # before its first fragment: lost
    assert gw.send(first) is None
    assert gw.send(later) is None
    assert gw.send(stray) == "fragment"


# --- bounded memory ----------------------------------------------------------------------


def test_the_least_recently_used_flow_is_evicted_at_the_bound() -> None:
    gw = Gateway(max_conntrack=3)
    for port in (1001, 1002, 1003):
        assert gw.send(ssh(sport=port), at=float(port - 1000)) is None
    assert gw.send(ssh_reply(sport=1001), at=10.0) is None  # 1002 is now the LRU
    assert gw.send(ssh(sport=1004), at=11.0) is None
    stats = gw.fw.stats
    assert (stats["entries"], stats["evicted"]) == (3, 1)
    assert gw.send(ssh_reply(sport=1002)) == "not_tracked"
    for port in (1001, 1003, 1004):
        assert gw.send(ssh_reply(sport=port)) is None


def test_many_flows_never_exceed_the_bound() -> None:
    gw = Gateway(max_conntrack=64)
    for port in range(1000, 1500):
        assert gw.send(ssh(sport=port), at=1.0) is None
    stats = gw.fw.stats
    assert (stats["entries"], stats["evicted"]) == (64, 500 - 64)
    assert gw.send(ssh_reply(sport=1499)) is None
    assert gw.send(ssh_reply(sport=1435)) == "not_tracked"


def test_insertions_expire_idle_flows_first() -> None:
    gw = Gateway(max_conntrack=2)
    assert gw.send(dns(1), at=0.0) is None
    assert gw.send(dns(2), at=0.0) is None
    assert gw.send(dns(3), at=25.0) is None  # both earlier flows idle past 20 s
    stats = gw.fw.stats
    assert (stats["entries"], stats["evicted"], stats["expired"]) == (1, 0, 2)


def test_expire_sweeps_idle_flows() -> None:
    gw = Gateway()
    assert gw.send(ssh(), at=0.0) is None  # tcp: 60 s
    assert gw.send(dns(), at=0.0) is None  # udp: 20 s
    assert gw.fw.expire(19.0) == 0
    assert gw.fw.expire(20.0) == 1
    assert gw.fw.stats["entries"] == 1
    assert gw.fw.expire(60.0) == 1
    stats = gw.fw.stats
    assert (stats["entries"], stats["expired"]) == (0, 2)


def per_peer(cap: int) -> PolicyConfig:
    return PolicyConfig(
        rules=POLICY.rules,
        conntrack=ConntrackConfig(
            tcp_timeout=60.0, udp_timeout=20.0, icmp_timeout=5.0, max_flows_per_peer=cap
        ),
    )


def test_one_peers_70000_flows_evict_only_its_own() -> None:
    gw = Gateway(per_peer(100), max_conntrack=65536)
    assert gw.send(dns(5353), at=0.0) is None  # alice: one flow, idle from now on
    sent = 0
    for sport in range(1024, 65536):  # bob: ssh from every port ...
        assert gw.send(ssh(sport=sport), at=1.0) is None
        sent += 1
    for sport in range(1024, 1024 + 70000 - sent):  # ... and DNS, 70,000 flows in all
        assert gw.send(ipv4(BOB4, LAN4, UDP, udp(sport, 53)), at=1.0) is None
    stats = gw.fw.stats
    assert (stats["entries"], stats["evicted_peer_limit"], stats["evicted"]) == (101, 69900, 0)
    assert gw.send(dns_reply(5353), at=2.0) is None  # alice's flow survived
    assert gw.send(ipv4(LAN4, BOB4, UDP, udp(53, 1024 + 70000 - sent - 1))) is None  # newest
    assert gw.send(ssh_reply(sport=1024)) == "not_tracked"  # bob's oldest went


def test_a_full_table_evicts_from_the_biggest_holder() -> None:
    gw = Gateway(per_peer(4096), max_conntrack=10)
    for sport in (5001, 5002, 5003):
        assert gw.send(dns(sport), at=0.0) is None  # alice: the oldest flows in the table
    for sport in range(40000, 40020):
        assert gw.send(ssh(sport=sport), at=1.0) is None  # bob fills the rest, and more
    stats = gw.fw.stats
    assert (stats["entries"], stats["evicted"], stats["evicted_peer_limit"]) == (10, 13, 0)
    for sport in (5001, 5002, 5003):
        assert gw.send(dns_reply(sport), at=2.0) is None
    assert [gw.send(ssh_reply(sport=p)) is None for p in range(40013, 40020)] == [True] * 7
    assert gw.send(ssh_reply(sport=40012)) == "not_tracked"


def test_a_peer_at_its_cap_keeps_its_recently_used_flows() -> None:
    gw = Gateway(per_peer(2))
    assert gw.send(ssh(sport=1), at=0.0) is None
    assert gw.send(ssh(sport=2), at=1.0) is None
    assert gw.send(ssh_reply(sport=1), at=2.0) is None  # 1 is used again: 2 is bob's LRU
    assert gw.send(ssh(sport=3), at=3.0) is None
    assert gw.send(ssh_reply(sport=2)) == "not_tracked"
    assert gw.send(ssh_reply(sport=1)) is None
    assert gw.fw.stats["evicted_peer_limit"] == 1


def test_reload_applies_a_new_per_peer_cap_to_later_flows() -> None:
    gw = Gateway(per_peer(100))
    for sport in range(1, 11):
        assert gw.send(ssh(sport=sport), at=0.0) is None
    gw.fw.replace_policy(per_peer(3), peers=gw.peers(), now=0.0)
    assert gw.fw.stats["entries"] == 10  # existing flows are kept ...
    assert gw.send(ssh(sport=11), at=1.0) is None  # ... until bob's next flow
    assert gw.fw.stats["entries"] == 3


def test_bad_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Firewall(POLICY, max_conntrack=0)


# --- reload ------------------------------------------------------------------------------


def test_replace_policy_cuts_forbidden_flows_and_keeps_allowed_ones() -> None:
    gw = Gateway()
    assert gw.send(ssh()) is None
    assert gw.send(dns()) is None
    assert gw.send(ipv4(BOB4, NAS4, TCP, tcp(50000, 445, SYN))) is None
    tightened = PolicyConfig(rules=(LAN_DNS, TO_NAS), conntrack=CT)
    assert gw.fw.replace_policy(tightened, now=1.0, peers=gw.peers()) == 1
    assert gw.send(ssh_reply()) == "not_tracked"
    assert gw.send(ssh(flags=ACK)) == "policy"
    assert gw.send(dns_reply()) is None
    assert gw.send(ipv4(NAS4, BOB4, TCP, tcp(445, 50000, ACK))) is None


def test_replace_policy_uses_current_groups_and_owners() -> None:
    gw = Gateway()
    assert gw.send(ssh()) is None
    assert gw.send(ipv4(BOB4, NAS4, TCP, tcp(50000, 445, SYN))) is None
    # bob reconnected with a certificate that lost "oncall"; the nas went away.
    gw.owner[raw(BOB4)] = peer("bob", "eng")
    del gw.owner[raw(NAS4)]
    assert gw.fw.replace_policy(POLICY, now=1.0, peers=gw.peers()) == 2
    assert gw.fw.stats["entries"] == 0


def test_replace_policy_applies_new_timeouts() -> None:
    gw = Gateway()
    assert gw.send(ssh(), at=0.0) is None
    shorter = PolicyConfig(rules=POLICY.rules, conntrack=ConntrackConfig(tcp_timeout=5.0))
    assert gw.fw.replace_policy(shorter, now=1.0, peers=gw.peers()) == 0
    assert gw.send(ssh_reply(), at=6.0) == "not_tracked"
    assert gw.send(ssh(), at=10.0) is None
    assert gw.fw.replace_policy(POLICY, now=12.0, peers=gw.peers()) == 0  # longer again
    assert gw.send(ssh_reply(), at=50.0) is None
    assert gw.fw.replace_policy(shorter, now=56.0, peers=gw.peers()) == 0
    stats = gw.fw.stats
    assert (stats["entries"], stats["expired"]) == (0, 2)


def test_replace_policy_forgets_fragment_state() -> None:
    gw = Gateway()
    assert gw.send(big_dns(3, more=True)) is None
    gw.fw.replace_policy(PolicyConfig(conntrack=CT), now=0.0, peers=gw.peers())
    assert gw.send(big_dns(3, more=False, offset=48)) == "fragment"


# --- disconnects -------------------------------------------------------------------------


def test_forget_address_purges_that_address_only() -> None:
    gw = Gateway()
    assert gw.send(ssh(sport=1)) is None
    assert gw.send(ssh(sport=2)) is None
    assert gw.send(ipv4(BOB4, NAS4, TCP, tcp(50000, 445, SYN))) is None
    assert gw.send(dns()) is None
    assert gw.send(dns(6000)) is None
    assert gw.send(big_dns(4, more=True)) is None  # the first dns flow again
    assert gw.fw.forget_address(raw(NAS4)) == 1
    assert gw.fw.forget_address(raw(BOB4)) == 2
    assert gw.fw.forget_address(raw(BOB4)) == 0
    assert gw.fw.stats["entries"] == 2  # alice's two dns flows
    assert gw.send(ssh_reply(sport=1)) == "not_tracked"
    assert gw.send(dns_reply()) is None
    assert gw.fw.forget_address(raw(ALICE4)) == 2
    assert gw.send(big_dns(4, more=False, offset=48)) == "fragment"


def test_forget_peer_purges_routed_subnet_flows_too() -> None:
    gw = Gateway()
    site = peer("site-b", "eng")
    gw.owner[raw("172.16.5.9")] = site  # a host in site-b's routed subnet
    assert gw.send(ipv4("172.16.5.9", LAN4, UDP, udp(7, 53))) is None
    assert gw.send(dns()) is None
    assert gw.fw.forget_peer("site-b") == 1
    assert gw.fw.stats["entries"] == 1


def test_replace_policy_drops_flows_whose_responder_changed() -> None:
    overlay = RuleConfig(PeerMatch("bob"), net("10.8.0.0/24"), Proto.ANY)
    policy = PolicyConfig(rules=(overlay,), conntrack=CT)
    gw = Gateway(policy)
    assert gw.send(ipv4(BOB4, NAS4, UDP, udp(1, 2))) is None
    assert gw.send(ipv4(BOB4, ALICE4, UDP, udp(1, 2))) is None
    gw.owner[raw(NAS4)] = peer("nas-2")  # the rule still allows bob -> that address
    assert gw.fw.replace_policy(policy, now=1.0, peers=gw.peers()) == 1
    assert gw.send(ipv4(ALICE4, BOB4, UDP, udp(2, 1))) is None
    assert gw.send(ipv4(NAS4, BOB4, UDP, udp(2, 1))) == "policy"
