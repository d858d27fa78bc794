"""The gateway's group firewall: connection tracking first, then allow rules, else deny.

Modelled on Nebula's ``firewall.go``. The gateway calls ``check_packet`` for every packet
(one call per GSO super-packet: its segments share the headers) *after* anti-spoofing,
telling it the source side and the destination side:

- a ``PeerView`` (a verified peer: its certificate name and groups), or
- ``None``: the TUN side — the gateway host itself, its LAN, the internet behind it.

Semantics:

1. **Malformed packets** are dropped with the parser's reason (``truncated``,
   ``bad_ihl``, ``ipv6_ext_loop``, ``source_route``...; see ``vpnd.policy.packet``).
2. **Tracked flows.** A packet whose 5-tuple (either direction) belongs to a tracked
   flow passes, as long as the flow is not idle past its protocol's timeout
   (``conntrack.tcp_timeout`` / ``udp_timeout`` / ``icmp_timeout``; other protocols use
   the UDP one) and the two sides are still the peers that created it (an address
   re-leased to another peer does not inherit flows). Every passing packet restarts
   the idle timer. For ICMP echo (and ICMPv4 timestamp) the identifier plays the
   port's role, and only the matching reply type passes back.
3. **TCP endings.** A RST shortens the flow's timeout to 10 s, FINs from both sides to
   120 s (never longer than ``tcp_timeout``); late segments still pass. A SYN without
   ACK on such a closing flow starts a new flow, checked against the rules again. A
   flow need not start with a SYN (like Nebula and Linux's loose tracking), so TCP
   sessions survive a gateway restart if the rules still allow them.
4. **ICMP errors** (destination unreachable, time exceeded, packet too big, parameter
   problem) pass only when the packet they quote is a tracked flow and they travel
   back along it: addressed to the quoted packet's sender, from the other side of the
   flow. That keeps PMTU discovery working through the tunnel. Rules never allow an
   ICMP error by themselves; an unsolicited echo reply is ``not_tracked`` too.
5. **Rules** (only for a packet from a peer; the TUN side never matches a rule, so it
   gets ``not_tracked`` unless it is a reply). A rule matches when all hold:
   ``from`` — ``any`` verified peer, a peer holding *all* the listed groups, or the
   named peer; ``to`` — ``any``, a CIDR containing the destination address (whichever
   side owns it), a destination peer holding all the listed groups, or the named peer;
   ``proto`` — ``icmp`` is ICMPv4 for IPv4 packets and ICMPv6 for IPv6; ``ports`` —
   the destination port is in one of the ranges (tcp/udp only). The first matching
   rule allows the packet and creates a tracked flow (ICMP types other than queries
   and errors are allowed per packet and not tracked).
   **The gateway host's own addresses** (``local_addresses``: its LAN and other
   non-overlay addresses, supplied by the daemon) are stricter: only a rule whose ``to``
   is exactly that host (a /32 or /128) may allow a new flow to one. A rule naming a
   subnet that contains it, or ``any``, does not, so a LAN rule never opens the
   gateway's own services (sshd on its LAN address...); such a packet is dropped as
   ``gateway_host_needs_exact_rule`` (``policy`` if no rule would have matched at all).
   The overlay addresses of the gateway are not in the set and follow the plain rules.
6. **Default deny**: anything else from a peer is dropped as ``policy``.
7. **Fragments.** A first fragment is checked like a whole packet (its L4 header must be
   complete). A later fragment carries no ports: it passes only if a first fragment
   with the same (source, destination, identification) passed within the last 30 s,
   else ``fragment``. So no fragment ever reaches a port the rules did not allow; a
   datagram whose first fragment arrives last is lost.
8. **Bounded memory.** At most ``conntrack.max_flows_per_peer`` flows initiated by one
   peer (default 4096): its next flow evicts its own least recently used one
   (``evicted_peer_limit``). At most ``max_conntrack`` flows in all (default 65536); when
   full, the least recently used flow of the peer holding the most is evicted
   (``evicted``), so one peer's flood never evicts another peer's flows. Expiry is lazy on
   lookup, amortised on insertion, and ``expire(now)`` sweeps the rest.
9. **Reload.** ``replace_policy`` re-checks every tracked flow against the new rules with
   the peers that now own its addresses, and drops those no longer allowed: a tightened
   policy cuts an allowed flow at once. ``set_local_addresses`` likewise cuts tracked
   flows to an address that just became the gateway host's own without an exact rule.
10. **Disconnects.** ``forget_address`` (and ``forget_peer``) purge a peer's flows, so a
    re-leased address starts clean.

Counters (``stats``): ``allowed_new``, ``allowed_tracked``, ``allowed_related`` (ICMP
errors), ``allowed_fragment``, ``dropped_<reason>``, ``evicted``, ``evicted_peer_limit``,
``expired``,
``entries``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vpnd.config.schema import (
    AnyMatch,
    ConntrackConfig,
    GroupMatch,
    NetworkMatch,
    PeerMatch,
    PolicyConfig,
    Proto,
    RuleConfig,
)
from vpnd.policy.conntrack import ConntrackTable, Entry, FragmentTable, Key
from vpnd.policy.drops import Drop
from vpnd.policy.packet import (
    ICMP_REPLIES,
    ICMP_REQUESTS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Flow,
    describe_flow,
    parse_flow,
)

TCP_RST_TIMEOUT = 10.0
TCP_FIN_TIMEOUT = 120.0
FRAGMENT_TIMEOUT = 30.0
"""Linux's default reassembly timeout (net.ipv4.ipfrag_time)."""

_KIND = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmp"}
_ICMP_PROTO = {4: PROTO_ICMP, 6: PROTO_ICMPV6}
_RULE_PROTO = {Proto.TCP: PROTO_TCP, Proto.UDP: PROTO_UDP}


@dataclass(frozen=True, slots=True)
class PeerView:
    """What the firewall needs of a verified peer: its certificate name and groups."""

    name: str
    groups: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Rule:
    """A rule compiled for one IP version: raw-int CIDRs, sets, no ipaddress objects."""

    from_peer: str | None
    from_groups: frozenset[str]
    to_any: bool
    to_peer: str | None
    to_groups: frozenset[str] | None
    to_net: tuple[int, int] | None
    """(network, mask) as ints of the version's width."""
    to_host: bool
    """``to`` is one exact address (a /32 or /128): it may reach the gateway host."""
    ports: tuple[tuple[int, int], ...]

    def matches(
        self,
        src: PeerView,
        dst: PeerView | None,
        dst_addr: bytes,
        dport: int,
        host_only: bool = False,
    ) -> bool:
        if host_only and not self.to_host:
            return False
        if self.from_peer is not None and src.name != self.from_peer:
            return False
        if not self.from_groups <= src.groups:
            return False
        if self.ports and not any(lo <= dport <= hi for lo, hi in self.ports):
            return False
        return self._to_matches(dst, dst_addr)

    def _to_matches(self, dst: PeerView | None, dst_addr: bytes) -> bool:
        if self.to_any:
            return True
        if self.to_net is not None:
            net, mask = self.to_net
            return int.from_bytes(dst_addr, "big") & mask == net
        if dst is None:
            return False
        if self.to_peer is not None:
            return dst.name == self.to_peer
        return self.to_groups is not None and self.to_groups <= dst.groups


def _compile(rule: RuleConfig, version: int) -> _Rule | None:
    """``rule`` for packets of ``version``, or None if it can never match them."""
    src = rule.from_
    dst = rule.to
    to_net: tuple[int, int] | None = None
    to_host = False
    if isinstance(dst, NetworkMatch):
        if dst.network.version != version:
            return None
        to_net = (int(dst.network.network_address), int(dst.network.netmask))
        to_host = dst.network.prefixlen == dst.network.max_prefixlen
    return _Rule(
        from_peer=src.name if isinstance(src, PeerMatch) else None,
        from_groups=src.groups if isinstance(src, GroupMatch) else frozenset(),
        to_any=isinstance(dst, AnyMatch),
        to_peer=dst.name if isinstance(dst, PeerMatch) else None,
        to_groups=dst.groups if isinstance(dst, GroupMatch) else None,
        to_net=to_net,
        to_host=to_host,
        ports=rule.ports,
    )


class _RuleSet:
    """Rules pre-sorted by (IP version, protocol), in policy order."""

    def __init__(self, policy: PolicyConfig) -> None:
        self.by_proto: dict[tuple[int, int], tuple[_Rule, ...]] = {}
        self.other: dict[int, tuple[_Rule, ...]] = {}
        for version in (4, 6):
            icmp = _ICMP_PROTO[version]
            lists: dict[int, list[_Rule]] = {PROTO_TCP: [], PROTO_UDP: [], icmp: []}
            other: list[_Rule] = []
            for rule in policy.rules:
                compiled = _compile(rule, version)
                if compiled is None:
                    continue
                if rule.proto is Proto.ANY:
                    other.append(compiled)
                    for bucket in lists.values():
                        bucket.append(compiled)
                elif rule.proto is Proto.ICMP:
                    lists[icmp].append(compiled)
                else:
                    lists[_RULE_PROTO[rule.proto]].append(compiled)
            for proto, bucket in lists.items():
                self.by_proto[(version, proto)] = tuple(bucket)
            self.other[version] = tuple(other)

    def allows(
        self,
        kind: tuple[int, int],
        src: PeerView,
        dst: PeerView | None,
        addr: bytes,
        dport: int,
        *,
        host_only: bool = False,
    ) -> bool:
        """Does a rule for ``kind`` = (IP version, protocol) allow this new flow?

        ``host_only``: ``addr`` is the gateway host's own; only exact-host rules count.
        """
        rules = self.by_proto.get(kind)
        if rules is None:
            rules = self.other[kind[0]]
        return any(rule.matches(src, dst, addr, dport, host_only) for rule in rules)


def _timeouts(ct: ConntrackConfig) -> dict[str, float]:
    return {
        "tcp": ct.tcp_timeout,
        "udp": ct.udp_timeout,
        "icmp": ct.icmp_timeout,
        "other": ct.udp_timeout,
    }


def _key(flow: Flow) -> Key:
    if flow.icmp_type is None:
        return (flow.src, flow.dst, flow.proto, flow.sport, flow.dport)
    return (flow.src, flow.dst, flow.proto, flow.sport, flow.icmp_type)


class Firewall:
    """Stateful, default-deny packet filter between peers and the TUN side."""

    def __init__(
        self,
        policy: PolicyConfig,
        *,
        max_conntrack: int = 65536,
        local_addresses: frozenset[bytes] = frozenset(),
    ) -> None:
        self._rules = _RuleSet(policy)
        self._local = local_addresses
        """The gateway host's own non-overlay addresses (raw 4/16 bytes)."""
        self._timeout = _timeouts(policy.conntrack)
        self.policy = policy
        self._ct = ConntrackTable(max_conntrack, policy.conntrack.max_flows_per_peer)
        self._frags = FragmentTable(max(64, max_conntrack // 16), FRAGMENT_TIMEOUT)
        self._counts: dict[str, int] = {
            "allowed_new": 0,
            "allowed_tracked": 0,
            "allowed_related": 0,
            "allowed_fragment": 0,
        }

    # --- counters --------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters, plus ``evicted``, ``expired`` and ``entries``."""
        out = dict(self._counts)
        out["evicted"] = self._ct.evicted
        out["evicted_peer_limit"] = self._ct.evicted_peer_limit
        out["expired"] = self._ct.expired
        out["entries"] = len(self._ct)
        return out

    def _drop(self, reason: str) -> str:
        key = "dropped_" + reason
        self._counts[key] = self._counts.get(key, 0) + 1
        return reason

    # --- the data path ----------------------------------------------------------------

    def check_packet(
        self,
        pkt: bytes | bytearray | memoryview,
        *,
        offset: int = 0,
        src: PeerView | None,
        dst: PeerView | None,
        now: float,
    ) -> str | None:
        """Parse and check one packet: None to let it through, else the drop reason."""
        flow = parse_flow(pkt, offset)
        if isinstance(flow, str):
            return self._drop(flow)
        return self.check(flow, src=src, dst=dst, now=now)

    def check(
        self, flow: Flow, *, src: PeerView | None, dst: PeerView | None, now: float
    ) -> str | None:
        """None to let ``flow`` through (tracking it if new), else the drop reason."""
        fragment = flow.fragment
        if fragment == "later":
            names = (src.name if src is not None else None, dst.name if dst is not None else None)
            if self._frags.allowed((flow.src, flow.dst, flow.frag_id), names, now):
                self._counts["allowed_fragment"] += 1
                return None
            return self._drop(Drop.FRAGMENT)
        if flow.inner is not None:
            verdict = self._check_related(flow, flow.inner, src, dst, now)
        else:
            verdict = self._check_flow(flow, src, dst, now)
        if verdict is None and fragment == "first":
            names = (src.name if src is not None else None, dst.name if dst is not None else None)
            self._frags.add((flow.src, flow.dst, flow.frag_id), names, now)
        return verdict

    def _check_flow(
        self, flow: Flow, src: PeerView | None, dst: PeerView | None, now: float
    ) -> str | None:
        key = _key(flow)
        hit = self._ct.index.get(key)
        if hit is not None:
            entry, names = hit
            if (
                now - entry.last < entry.timeout
                and names[0] == (src.name if src is not None else None)
                and names[1] == (dst.name if dst is not None else None)
            ):
                if flow.tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST) and self._tcp_ending(
                    entry, flow.tcp_flags, key == entry.fwd
                ):
                    self._ct.remove(entry)
                else:
                    self._ct.touch(entry, now)
                    self._counts["allowed_tracked"] += 1
                    return None
            elif now - entry.last >= entry.timeout:
                self._ct.expired += 1
                self._ct.remove(entry)
            # Else the sides are not the flow's peers (a re-leased address, or a source
            # spoofed on the TUN side): judge the packet as new and keep the flow.
        return self._new_flow(flow, key, src, dst, now)

    def _new_flow(
        self, flow: Flow, key: Key, src: PeerView | None, dst: PeerView | None, now: float
    ) -> str | None:
        """A packet of no tracked flow: the rules decide, and an allowed one is tracked."""
        if src is None:
            return self._drop(Drop.NOT_TRACKED)  # the TUN side opens no flows
        denied = self._rule_verdict(flow, src, dst)
        if denied is not None:
            return self._drop(denied)
        self._counts["allowed_new"] += 1
        icmp_type = flow.icmp_type
        version = flow.version
        if icmp_type is not None:
            reply = ICMP_REQUESTS[version].get(icmp_type)
            if reply is None:
                return None  # router/neighbour messages etc.: allowed, not a flow
            rev: Key = (flow.dst, flow.src, flow.proto, flow.dport, reply)
        else:
            rev = (flow.dst, flow.src, flow.proto, flow.dport, flow.sport)
        kind = _KIND.get(flow.proto, "other")
        entry = Entry(
            fwd=key,
            rev=rev,
            version=version,
            dport=flow.dport if icmp_type is None else 0,
            a_name=src.name,
            b_name=dst.name if dst is not None else None,
            kind=kind,
            timeout=self._timeout[kind],
            now=now,
        )
        if flow.proto == PROTO_TCP and flow.tcp_flags & TCP_RST:
            self._close(entry, TCP_RST_TIMEOUT)
        self._ct.add(entry, now)
        return None

    def _rule_verdict(self, flow: Flow, src: PeerView, dst: PeerView | None) -> Drop | None:
        """Why the rules refuse a new flow from a peer, or None if one allows it."""
        icmp_type = flow.icmp_type
        version = flow.version
        if icmp_type is not None and icmp_type in ICMP_REPLIES[version]:
            return Drop.NOT_TRACKED
        kind_key = (version, flow.proto)
        allows = self._rules.allows
        if dst is None and flow.dst in self._local:
            if allows(kind_key, src, dst, flow.dst, flow.dport, host_only=True):
                return None
            if allows(kind_key, src, dst, flow.dst, flow.dport):
                return Drop.GATEWAY_HOST_NEEDS_EXACT_RULE
            return Drop.POLICY
        if not allows(kind_key, src, dst, flow.dst, flow.dport):
            return Drop.POLICY
        return None

    def _tcp_ending(self, entry: Entry, flags: int, forward: bool) -> bool:
        """Apply FIN/RST to ``entry``; True if this SYN must start a new flow instead."""
        if flags & TCP_RST:
            self._close(entry, TCP_RST_TIMEOUT)
        elif flags & TCP_SYN:
            return entry.closing and not flags & TCP_ACK
        elif flags & TCP_FIN:
            entry.fins |= 1 if forward else 2
            if entry.fins == 3:
                self._close(entry, TCP_FIN_TIMEOUT)
        return False

    def _close(self, entry: Entry, limit: float) -> None:
        entry.closing = True
        entry.timeout = min(entry.timeout, limit, self._timeout["tcp"])

    def _check_related(
        self, flow: Flow, inner: Flow, src: PeerView | None, dst: PeerView | None, now: float
    ) -> str | None:
        # The quoted packet was sent by the error's recipient, along a tracked flow; the
        # error must come back from that flow's other side.
        if inner.src != flow.dst:
            return self._drop(Drop.ICMP_UNTRACKED)
        hit = self._ct.index.get(_key(inner))
        if hit is None:
            return self._drop(Drop.ICMP_UNTRACKED)
        entry, names = hit
        if (
            now - entry.last >= entry.timeout
            or names[0] != (dst.name if dst is not None else None)
            or names[1] != (src.name if src is not None else None)
        ):
            return self._drop(Drop.ICMP_UNTRACKED)
        self._counts["allowed_related"] += 1
        return None

    # --- management -------------------------------------------------------------------

    def replace_policy(
        self, policy: PolicyConfig, *, now: float, peers: Callable[[bytes], PeerView | None]
    ) -> int:
        """Switch to ``policy``; drop tracked flows it no longer allows. Returns how many.

        ``peers(addr)`` names the peer that owns an address now (None: the TUN side or
        nobody); a flow whose ends changed owner is dropped too. New timeouts apply to
        existing flows at once (a flow already idle past one is expired, not counted).
        """
        rules = _RuleSet(policy)
        timeouts = _timeouts(policy.conntrack)
        self._rules, self._timeout, self.policy = rules, timeouts, policy
        self._ct.max_per_peer = policy.conntrack.max_flows_per_peer  # applies from the next flow
        # A later fragment would pass on an old decision: start the fragment state over.
        self._frags.clear()
        dropped = 0
        for entry in self._ct.entries():
            src = peers(entry.src)
            dst = peers(entry.dst)
            keep = (
                src is not None
                and src.name == entry.a_name
                and (dst.name if dst is not None else None) == entry.b_name
                and rules.allows(
                    (entry.version, entry.proto),
                    src,
                    dst,
                    entry.dst,
                    entry.dport,
                    host_only=dst is None and entry.dst in self._local,
                )
            )
            if not keep:
                self._ct.remove(entry)
                dropped += 1
                continue
            timeout = timeouts[entry.kind]
            if entry.closing:
                limit = TCP_FIN_TIMEOUT if entry.fins == 3 else TCP_RST_TIMEOUT
                timeout = min(timeout, limit)
            entry.timeout = timeout
            if now - entry.last >= timeout:  # idle past a shortened timeout
                self._ct.remove(entry)
                self._ct.expired += 1
        return dropped

    @property
    def local_addresses(self) -> frozenset[bytes]:
        """The gateway host's own non-overlay addresses (raw 4/16 bytes)."""
        return self._local

    def set_local_addresses(
        self, addrs: frozenset[bytes], *, peers: Callable[[bytes], PeerView | None]
    ) -> int:
        """Adopt the gateway host's current addresses; returns how many flows were cut.

        A tracked flow to an address that just became the host's own survives only if an
        exact-host rule allows it (``peers`` as for ``replace_policy``).
        """
        added = addrs - self._local
        self._local = addrs
        if not added:
            return 0
        self._frags.clear()
        dropped = 0
        for entry in self._ct.entries():
            if entry.dst not in added or peers(entry.dst) is not None:
                continue
            src = peers(entry.src)
            if (
                src is None
                or src.name != entry.a_name
                or not self._rules.allows(
                    (entry.version, entry.proto), src, None, entry.dst, entry.dport, host_only=True
                )
            ):
                self._ct.remove(entry)
                dropped += 1
        return dropped

    def forget_address(self, addr: bytes) -> int:
        """Purge every flow with ``addr`` (raw 4/16 bytes) at either end; returns how many."""
        self._frags.forget_address(addr)
        return self._ct.forget_address(addr)

    def forget_peer(self, name: str) -> int:
        """Purge every flow the peer ``name`` initiated or answers (routed subnets too)."""
        return self._ct.forget_peer(name)

    def expire(self, now: float) -> int:
        """Drop flows idle past their timeout; call it every few seconds. Returns how many."""
        return self._ct.expire(now)

    def describe(self, pkt: bytes | bytearray | memoryview, offset: int = 0) -> str:
        """One log line for a packet, e.g. ``tcp 10.8.0.2:51000 -> 192.168.50.10:22``."""
        flow = parse_flow(pkt, offset)
        if isinstance(flow, str):
            return f"malformed packet ({flow}, {max(0, len(pkt) - offset)} bytes)"
        return describe_flow(flow)
