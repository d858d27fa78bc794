"""Parse the headers the firewall needs from a raw IPv4/IPv6 packet, without allocating much.

``parse_flow`` returns a ``Flow`` or a short drop-reason string; it never raises on any
input. Only headers are read, so a GSO super-packet (one IP header for up to 64 KiB of
segments) costs the same as a small packet.

What counts as malformed (the returned reason):

- ``not_ip``: empty, or the version nibble is not 4 or 6.
- ``truncated``: the buffer ends inside a header, or before the length the IP header
  claims; a first fragment too short to hold its whole TCP (20 bytes), UDP or ICMP
  (8 bytes) header (RFC 1858 tiny fragments).
- ``bad_ihl``, ``bad_length``, ``bad_options``: an inconsistent IPv4 header.
- ``bad_fragment``: an IPv4 fragment reaching past 65535 bytes.
- ``bad_tcp``: a TCP data offset below 5 words.
- ``source_route``: IPv4 LSRR/SSRR options, or an IPv6 routing header with segments
  left; either would let the real destination differ from the one the policy checked.
- ``ipv6_ext_too_many`` (more than 8 extension headers), ``ipv6_ext_loop`` (a header
  type repeated; destination options may appear twice), ``ipv6_ext_order`` (hop-by-hop
  not first).
- ``icmp_nested``: an ICMP error quoting another ICMP error (RFC 1122 forbids sending it).
- ``icmp_inner``: an ICMP error whose quoted packet cannot be parsed, or is of the
  other IP version.

Ports: ``sport``/``dport`` are the TCP/UDP ports; for ICMP echo (and ICMPv4 timestamp)
both hold the identifier, which plays the port's role in connection tracking; otherwise 0.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal, NamedTuple

Fragment = Literal["none", "first", "later"]

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

ICMP_ERRORS = {4: frozenset({3, 4, 11, 12}), 6: frozenset({1, 2, 3, 4})}
"""Destination unreachable, (source quench,) time exceeded / packet too big, parameter problem."""
ICMP_REQUESTS = {4: {8: 0, 13: 14}, 6: {128: 129}}
"""Query request type -> its reply type (echo; ICMPv4 timestamp)."""
ICMP_REPLIES = {4: frozenset({0, 14}), 6: frozenset({129})}

MAX_IPV6_EXT = 8

_V4 = struct.Struct("!BxHHHxB2x4s4s")  # vihl, tot_len, id, frag, proto, src, dst
_V6 = struct.Struct("!4xHBx16s16s")  # payload_len, next_header, src, dst
_PORTS = struct.Struct("!HH")
_ICMP = struct.Struct("!BxxxH")  # type, identifier
_V6_FRAG = struct.Struct("!BxHI")  # next_header, offset|M, identification

_V6_EXT = frozenset({0, 43, 44, 51, 60, 135, 139, 140})
_V6_DEST_OPTS = 60


class Flow(NamedTuple):
    """The header facts of one packet (or GSO super-packet) that policy decides on.

    Immutable. A NamedTuple rather than a frozen dataclass: it is built once per packet,
    and a frozen dataclass's ``__init__`` costs about four times as much.
    """

    version: int
    """4 or 6."""
    proto: int
    """IP protocol number (for IPv6: the upper-layer header after extension headers)."""
    src: bytes
    """Raw source address (4 or 16 bytes)."""
    dst: bytes
    """Raw destination address."""
    sport: int
    """TCP/UDP source port, the ICMP query identifier, or 0."""
    dport: int
    """TCP/UDP destination port, the ICMP query identifier, or 0."""
    icmp_type: int | None
    """The ICMP/ICMPv6 type, None for other protocols and for non-first fragments."""
    fragment: Fragment
    """``none``: whole packet; ``first``: offset 0 with more to come; ``later``: no L4 header."""
    inner: Flow | None = None
    """The quoted (original) packet of an ICMP error."""
    tcp_flags: int = 0
    """The TCP flags byte (FIN/SYN/RST/ACK...), 0 for other protocols."""
    frag_id: int = 0
    """The fragment identification (IPv4 16-bit, IPv6 32-bit) when ``fragment`` != none."""


def parse_flow(pkt: bytes | bytearray | memoryview, offset: int = 0) -> Flow | str:
    """The packet's ``Flow`` starting at ``offset``, or why it must be dropped."""
    n = len(pkt)
    if offset < 0 or offset >= n:
        return "not_ip" if offset >= n else "truncated"
    version = pkt[offset] >> 4
    if version == 4:
        return _parse_v4(pkt, offset, n, inner=False)
    if version == 6:
        return _parse_v6(pkt, offset, n, inner=False)
    return "not_ip"


def _parse_v4(pkt: bytes | bytearray | memoryview, o: int, n: int, *, inner: bool) -> Flow | str:
    if n - o < 20:
        return "truncated"
    vihl, tot_len, ident, frag, proto, src, dst = _V4.unpack_from(pkt, o)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        return "bad_ihl"
    if inner:
        # A quoted packet is cut short by design: trust only what is there.
        end = n
        if end - o < ihl:
            return "truncated"
    else:
        if tot_len < ihl:
            return "bad_ihl" if tot_len >= 20 else "bad_length"
        end = o + tot_len
        if end > n:
            return "truncated"
    if ihl > 20:
        problem = _check_v4_options(pkt, o + 20, o + ihl)
        if problem is not None:
            return problem
    frag_off = (frag & 0x1FFF) * 8
    more = frag & 0x2000
    if frag_off:
        if not inner and frag_off + (tot_len - ihl) > 65535:
            return "bad_fragment"
        return Flow(4, proto, src, dst, 0, 0, None, "later", None, 0, ident)
    if more:
        return _parse_l4(pkt, o + ihl, end, 4, proto, src, dst, "first", ident, inner)
    return _parse_l4(pkt, o + ihl, end, 4, proto, src, dst, "none", 0, inner)


def _check_v4_options(pkt: bytes | bytearray | memoryview, pos: int, end: int) -> str | None:
    while pos < end:
        kind = pkt[pos]
        if kind == 0:  # end of option list
            return None
        if kind == 1:  # no-op
            pos += 1
            continue
        if pos + 1 >= end:
            return "bad_options"
        length = pkt[pos + 1]
        if length < 2 or pos + length > end:
            return "bad_options"
        if kind in (131, 137):  # loose / strict source route
            return "source_route"
        pos += length
    return None


def _parse_v6(pkt: bytes | bytearray | memoryview, o: int, n: int, *, inner: bool) -> Flow | str:
    if n - o < 40:
        return "truncated"
    plen, nh, src, dst = _V6.unpack_from(pkt, o)
    if inner:
        end = n
    else:
        end = o + 40 + plen
        if end > n:
            return "truncated"
    if nh in _V6_EXT:
        return _parse_v6_ext(pkt, o + 40, end, nh, src, dst, inner)
    return _parse_l4(pkt, o + 40, end, 6, nh, src, dst, "none", 0, inner)


def _parse_v6_ext(  # noqa: PLR0917 - hot path: no per-packet argument object
    pkt: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    nh: int,
    src: bytes,
    dst: bytes,
    inner: bool,
) -> Flow | str:
    """Walk the extension headers starting with ``nh`` at ``pos``, then parse the L4 header."""
    fragment: Fragment = "none"
    frag_id = 0
    count = 0
    seen = 0  # bit per extension-header type
    dest_opts = 0
    while nh in _V6_EXT:
        count += 1
        dest_opts += nh == _V6_DEST_OPTS
        if count > MAX_IPV6_EXT:
            return "ipv6_ext_too_many"
        if nh == 0 and count != 1:
            return "ipv6_ext_order"
        # Destination options may appear twice (before routing, and last); others once.
        if dest_opts > 2 or (nh != _V6_DEST_OPTS and seen & (1 << nh)):
            return "ipv6_ext_loop"
        seen |= 1 << nh
        if end - pos < 8:
            return "truncated"
        if nh == 44:
            nxt, off_m, ident = _V6_FRAG.unpack_from(pkt, pos)
            if off_m & 0xFFF8:
                return Flow(6, nxt, src, dst, 0, 0, None, "later", None, 0, ident)
            if off_m & 1:
                fragment, frag_id = "first", ident
            hlen = 8  # an atomic fragment (offset 0, no M) is a whole packet
        else:
            nxt = pkt[pos]
            # AH counts 4-byte words beyond the first two, the others 8-byte units beyond one.
            hlen = (pkt[pos + 1] + 2) * 4 if nh == 51 else (pkt[pos + 1] + 1) * 8
            if nh == 43 and pkt[pos + 3]:  # routing header with segments left
                return "source_route"
        pos += hlen
        if pos > end:
            return "truncated"
        nh = nxt
    return _parse_l4(pkt, pos, end, 6, nh, src, dst, fragment, frag_id, inner)


def _parse_l4(  # noqa: PLR0917 - hot path: no per-packet argument object
    pkt: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    version: int,
    proto: int,
    src: bytes,
    dst: bytes,
    fragment: Fragment,
    frag_id: int,
    inner: bool,
) -> Flow | str:
    avail = end - pos
    if proto == PROTO_TCP:
        # A quoted packet only promises 8 bytes; a real one must hold the whole header.
        if avail < (8 if inner else 20):
            return "truncated"
        sport, dport = _PORTS.unpack_from(pkt, pos)
        if inner:
            return Flow(version, proto, src, dst, sport, dport, None, fragment, None, 0, frag_id)
        if pkt[pos + 12] >> 4 < 5:
            return "bad_tcp"
        flags = pkt[pos + 13]
        return Flow(version, proto, src, dst, sport, dport, None, fragment, None, flags, frag_id)
    if proto == PROTO_UDP:
        if avail < 8:
            return "truncated"
        sport, dport = _PORTS.unpack_from(pkt, pos)
        return Flow(version, proto, src, dst, sport, dport, None, fragment, None, 0, frag_id)
    if proto == (PROTO_ICMP if version == 4 else PROTO_ICMPV6):
        return _parse_icmp(pkt, pos, end, version, proto, src, dst, fragment, frag_id, inner)
    return Flow(version, proto, src, dst, 0, 0, None, fragment, None, 0, frag_id)


def _parse_icmp(  # noqa: PLR0917 - hot path: no per-packet argument object
    pkt: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    version: int,
    proto: int,
    src: bytes,
    dst: bytes,
    fragment: Fragment,
    frag_id: int,
    inner: bool,
) -> Flow | str:
    if end - pos < 8:
        return "truncated"
    icmp_type, ident = _ICMP.unpack_from(pkt, pos)
    if icmp_type in ICMP_ERRORS[version]:
        if inner:
            return "icmp_nested"
        quoted = _parse_quoted(pkt, pos + 8, end, version)
        if isinstance(quoted, str):
            return quoted
        return Flow(version, proto, src, dst, 0, 0, icmp_type, fragment, quoted, 0, frag_id)
    if icmp_type in ICMP_REQUESTS[version] or icmp_type in ICMP_REPLIES[version]:
        return Flow(version, proto, src, dst, ident, ident, icmp_type, fragment, None, 0, frag_id)
    return Flow(version, proto, src, dst, 0, 0, icmp_type, fragment, None, 0, frag_id)


def _parse_quoted(
    pkt: bytes | bytearray | memoryview, pos: int, end: int, version: int
) -> Flow | str:
    """The packet an ICMP error quotes: same IP version, headers possibly cut short."""
    if pos >= end or pkt[pos] >> 4 != version:
        return "icmp_inner"
    # ``end`` (the outer packet's end) bounds every read of the quoted headers.
    quoted = (
        _parse_v4(pkt, pos, end, inner=True)
        if version == 4
        else _parse_v6(pkt, pos, end, inner=True)
    )
    if quoted == "icmp_nested":
        return quoted
    if isinstance(quoted, str):
        return "icmp_inner"
    return quoted


_PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMPV6: "icmpv6"}


def describe_flow(flow: Flow) -> str:
    """One log line, e.g. ``tcp 10.8.0.2:51000 -> 192.168.50.10:22`` (not for the hot path)."""
    src = ipaddress.ip_address(flow.src)
    dst = ipaddress.ip_address(flow.dst)
    name = _PROTO_NAMES.get(flow.proto, f"proto {flow.proto}")
    frag = "" if flow.fragment == "none" else f" ({flow.fragment} fragment)"
    if flow.fragment != "later" and flow.proto in (PROTO_TCP, PROTO_UDP):
        if flow.version == 6:
            return f"{name} [{src}]:{flow.sport} -> [{dst}]:{flow.dport}{frag}"
        return f"{name} {src}:{flow.sport} -> {dst}:{flow.dport}{frag}"
    text = f"{name} {src} -> {dst}"
    if flow.icmp_type is not None:
        text += f" type {flow.icmp_type}"
        if flow.sport:
            text += f" id {flow.sport}"
        if flow.inner is not None:
            text += f" about [{describe_flow(flow.inner)}]"
    return text + frag
