"""Software GSO: turn a virtio-net packet (header + maybe a 64 KB super-packet) into
plain IP packets with complete checksums.

Needed where an offload TUN meets a peer without offload (``tun.offload: false`` on
one end): the kernel hands the gateway TSO super-packets and partial checksums that a
plain TUN on the far side cannot take. The common path, offload on both ends, never
calls this: the super-packet crosses the tunnel whole and the far kernel segments it.

Checksums use the RFC 1071 property that the ones'-complement sum of 16-bit words is
the value of the bytes as one big-endian integer modulo 0xFFFF (2**16 == 1 mod 0xFFFF),
so ``int.from_bytes(...) % 0xFFFF`` does the whole sum in C.
"""

from __future__ import annotations

import struct

from vpnd.net.vnet import (
    _HDR,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR_LEN,
    validate_vnet_packet,
)
from vpnd.policy.drops import Drop

_IPPROTO_UDP = 17
_TCP_FIN = 0x01
_TCP_PSH = 0x08
_TCP_CWR = 0x80


def _sum(data: bytes | bytearray | memoryview) -> int:
    """Ones'-complement sum of ``data`` (padded to even length), as an int mod 0xFFFF."""
    if len(data) & 1:
        return int.from_bytes(bytes(data) + b"\0", "big") % 0xFFFF
    return int.from_bytes(data, "big") % 0xFFFF


def _finish(total: int) -> int:
    """The checksum field for a ones'-complement sum already reduced mod 0xFFFF."""
    total %= 0xFFFF
    return 0xFFFF - total if total else 0


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of ``data``."""
    return _finish(_sum(data))


class GsoError(ValueError):
    """The packet cannot be turned into plain packets (it would fail validation)."""

    def __init__(self, reason: Drop) -> None:
        super().__init__(reason)
        self.reason = reason


def to_plain(pkt: bytes | memoryview) -> list[bytes | memoryview]:
    """Plain IP packets for a header-prefixed packet from an offload TUN or peer."""
    reason = validate_vnet_packet(pkt)
    if reason is not None:
        raise GsoError(reason)
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(pkt, 0)
    view = memoryview(pkt)
    if gso_type & ~GSO_ECN == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [view[VNET_HDR_LEN:]]
        return [_complete_checksum(view[VNET_HDR_LEN:], csum_start, csum_offset)]
    return _segment_tcp(view[VNET_HDR_LEN:], gso_type & ~GSO_ECN, gso_size)


def _complete_checksum(ip: memoryview, start: int, offset: int) -> bytes:
    """Finish a partial checksum: the field holds the pseudo-header sum; add the rest."""
    out = bytearray(ip)
    value = _finish(_sum(out[start:]))
    if value == 0 and _l4_proto(out) == _IPPROTO_UDP:
        value = 0xFFFF  # zero means "no checksum" in UDP
    struct.pack_into("!H", out, start + offset, value)
    return bytes(out)


def _l4_proto(ip: bytes | bytearray | memoryview) -> int:
    return ip[9] if ip[0] >> 4 == 4 else ip[6]


def _segment_tcp(ip: memoryview, gso: int, mss: int) -> list[bytes | memoryview]:
    v4 = gso == GSO_TCPV4
    l3 = (ip[0] & 0x0F) * 4 if v4 else 40
    doff = (ip[l3 + 12] >> 4) * 4
    hlen = l3 + doff
    payload = ip[hlen:]
    header = bytes(ip[:hlen])
    src, dst = (header[12:16], header[16:20]) if v4 else (header[8:24], header[24:40])
    seq = int.from_bytes(header[l3 + 4 : l3 + 8], "big")
    flags = header[l3 + 13]
    ip_id = int.from_bytes(header[4:6], "big") if v4 else 0
    pseudo_base = _sum(src + dst) + 6  # + protocol (TCP)
    out: list[bytes | memoryview] = []
    count = max(1, -(-len(payload) // mss))
    for i in range(count):
        seg = payload[i * mss : (i + 1) * mss]
        tcp_len = doff + len(seg)
        h = bytearray(header)
        if v4:
            struct.pack_into("!H", h, 2, hlen + len(seg))
            struct.pack_into("!H", h, 4, (ip_id + i) & 0xFFFF)
            struct.pack_into("!H", h, 10, 0)
            struct.pack_into("!H", h, 10, checksum(h[:l3]))
        else:
            struct.pack_into("!H", h, 4, doff + len(seg))
        struct.pack_into("!I", h, l3 + 4, (seq + i * mss) & 0xFFFFFFFF)
        f = flags
        if i < count - 1:
            f &= ~(_TCP_FIN | _TCP_PSH)
        if i > 0:
            f &= ~_TCP_CWR
        h[l3 + 13] = f
        struct.pack_into("!H", h, l3 + 16, 0)
        total = pseudo_base + tcp_len + _sum(h[l3:]) + _sum(seg)
        struct.pack_into("!H", h, l3 + 16, _finish(total))
        out.append(bytes(h) + bytes(seg))
    return out


__all__ = ["GSO_TCPV4", "GSO_TCPV6", "GsoError", "checksum", "to_plain"]
