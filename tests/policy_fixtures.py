"""Hand-built IPv4/IPv6 packets (struct only) and peers for the firewall tests.

Checksums are left zero: the firewall never reads them.
"""

from __future__ import annotations

import ipaddress
import struct

from vpnd.policy.firewall import PeerView

TCP, UDP, ICMP, ICMPV6, GRE = 6, 17, 1, 58, 47
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def raw(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def peer(name: str, *groups: str) -> PeerView:
    return PeerView(name, frozenset(groups))


# --- layer 4 ---------------------------------------------------------------------------


def tcp(sport: int, dport: int, flags: int = ACK, *, doff: int = 5, body: bytes = b"") -> bytes:
    head = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 65535, 0, 0)
    return head + b"\0" * max(0, doff * 4 - 20) + body


def udp(sport: int, dport: int, body: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body


def icmp(kind: int, code: int = 0, ident: int = 0, seq: int = 0, body: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", kind, code, 0, ident, seq) + body


def icmp_error(kind: int, quoted: bytes, code: int = 0, *, keep: int | None = None) -> bytes:
    """An ICMP(v6) error quoting ``quoted`` (cut to ``keep`` bytes, as routers do)."""
    return struct.pack("!BBHI", kind, code, 0, 0) + (quoted if keep is None else quoted[:keep])


# --- IP --------------------------------------------------------------------------------


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ident: int = 0x1234,
    frag_offset: int = 0,
    more: bool = False,
    options: bytes = b"",
    ihl: int | None = None,
    tot_len: int | None = None,
) -> bytes:
    """``frag_offset`` in bytes (a multiple of 8)."""
    words = ihl if ihl is not None else 5 + len(options) // 4
    length = tot_len if tot_len is not None else 20 + len(options) + len(payload)
    frag = (frag_offset // 8) | (0x2000 if more else 0)
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | words, 0, length, ident, frag, 64, proto, 0, raw(src), raw(dst)
    )
    return head + options + payload


def ipv6(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    headers: list[tuple[int, bytes]] | None = None,
    plen: int | None = None,
) -> bytes:
    """``headers``: (type, bytes after the next-header byte) chained before ``proto``."""
    chain = headers or []
    types = [t for t, _ in chain] + [proto]
    blob = b"".join(bytes([types[i + 1]]) + body for i, (_, body) in enumerate(chain))
    length = plen if plen is not None else len(blob) + len(payload)
    head = struct.pack("!IHBB16s16s", 0x60000000, length, types[0], 64, raw(src), raw(dst))
    return head + blob + payload


def opts6(size: int = 8) -> bytes:
    """The body (after next-header) of a hop-by-hop/destination-options header of ``size``."""
    return bytes([size // 8 - 1]) + b"\x01" + bytes([size - 4]) + b"\0" * (size - 4)


def frag6(offset: int, more: bool, ident: int) -> bytes:
    """The body (after next-header) of an IPv6 fragment header; ``offset`` in bytes."""
    return struct.pack("!BHI", 0, offset | (1 if more else 0), ident)


def routing6(segments_left: int) -> bytes:
    """The body of a type-2-like routing header with one address."""
    return bytes([2, 2, segments_left]) + b"\0" * 4 + b"\0" * 16
