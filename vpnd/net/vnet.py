"""virtio_net_hdr handling: packets read from an offload TUN carry one, and a peer's is untrusted.

A header from the far side is written to our TUN as-is, so it is checked here first:
the kernel trusts it to build a GSO skb. We accept only what a Linux TUN read
produces (GSO NONE/TCPv4/TCPv6, optional ECN, partial TCP/UDP checksums) and
refuse everything else with a short, stable drop reason.
"""

from __future__ import annotations

import struct

from vpnd.policy.drops import Drop

VNET_HDR_LEN = 10
_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
_KNOWN_FLAGS = F_NEEDS_CSUM | F_DATA_VALID

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
_GSO_BY_FRAGS = 0xFFFF  # kernel-internal marker, never valid from outside

_TCP_CSUM_OFFSET = 16  # offsetof(struct tcphdr, check): the kernel insists on it for TSO
_IPPROTO_TCP = 6
_IPPROTO_UDP = 17
# offsetof(check) in the TCP and UDP headers: the only fields a partial checksum may name.
_CSUM_FIELD = {_IPPROTO_TCP: 16, _IPPROTO_UDP: 6}
_PLAIN = bytes(VNET_HDR_LEN)

MIN_MSS = {4: 536, 6: 1220}
"""The smallest MSS a TCP sender uses without ICMP help: IPv4's 576-byte minimum
reassembly size and IPv6's 1280-byte minimum MTU, less the IP and TCP headers. A kernel
sets gso_size to the MSS less the TCP options each segment carries, so a super-packet's
gso_size is refused below ``MIN_MSS - options`` (``vnet_gso_size_small``): otherwise a
64 KB super-packet with gso_size 1 fans out into 64,000 segments of gateway CPU."""


def plain_vnet_header() -> bytes:
    """The header of a packet with no offload: all zeros."""
    return _PLAIN


def strip_vnet(pkt: bytes | memoryview) -> memoryview:
    """The IP packet after the header (zero-copy). Raises ValueError if shorter than a header."""
    if len(pkt) < VNET_HDR_LEN:
        raise ValueError(f"packet of {len(pkt)} bytes is shorter than a virtio_net_hdr")
    return memoryview(pkt)[VNET_HDR_LEN:]


def _ip_header_len(pkt: bytes | memoryview, off: int, size: int) -> tuple[int, int, int] | None:
    """(version, L3 header length, L4 protocol) if the IP header is well-formed and its
    length field matches ``size`` exactly, else None."""
    if size < 1:
        return None
    version = pkt[off] >> 4
    if version == 4:
        if size < 20:
            return None
        ihl = (pkt[off] & 0x0F) * 4
        total = (pkt[off + 2] << 8) | pkt[off + 3]
        if ihl < 20 or ihl > size or total != size:
            return None
        return 4, ihl, pkt[off + 9]
    if version == 6:
        if size < 40:
            return None
        payload = (pkt[off + 4] << 8) | pkt[off + 5]
        if payload + 40 != size:
            return None
        return 6, 40, pkt[off + 6]
    return None


def validate_vnet_packet(pkt: bytes | memoryview) -> Drop | None:
    """None if ``pkt`` (header + IP packet) is safe to write to an offload TUN, else a drop reason.

    Never raises, whatever the bytes.
    """
    n = len(pkt)
    if n < VNET_HDR_LEN + 1:
        return Drop.VNET_SHORT
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(pkt, 0)
    size = n - VNET_HDR_LEN
    if flags & ~_KNOWN_FLAGS or flags == _KNOWN_FLAGS:
        return Drop.VNET_BAD_FLAGS
    base = gso_type & ~GSO_ECN
    if base not in (GSO_NONE, GSO_TCPV4, GSO_TCPV6) or (gso_type & GSO_ECN and base == GSO_NONE):
        return Drop.VNET_BAD_GSO_TYPE
    if hdr_len > size:
        return Drop.VNET_BAD_HDR_LEN
    ip = _ip_header_len(pkt, VNET_HDR_LEN, size)
    if ip is None:
        return Drop.VNET_NOT_IP
    version, l3_len, proto = ip
    if flags & F_NEEDS_CSUM:
        # The checksum position must be the real TCP/UDP checksum field. A peer that
        # points it elsewhere (at the ports, say) would have whoever completes the sum
        # rewrite those bytes *after* the firewall judged the packet.
        # (GSO packets get the same check, TCP only, in ``_check_gso``.)
        if base == GSO_NONE:
            want = _CSUM_FIELD.get(proto)
            if want is None or csum_start != l3_len or csum_offset != want:
                return Drop.VNET_BAD_CSUM_OFFSETS
            if l3_len + want + 2 > size:
                return Drop.VNET_BAD_CSUM_OFFSETS
    elif csum_start or csum_offset:
        # The kernel zeroes these unless the checksum is partial; anything else is forged.
        return Drop.VNET_BAD_CSUM_OFFSETS
    if base == GSO_NONE:
        return Drop.VNET_GSO_SIZE if gso_size else None
    return _check_gso(
        pkt,
        base=base,
        flags=flags,
        gso_size=gso_size,
        csum_start=csum_start,
        csum_offset=csum_offset,
        version=version,
        l3_len=l3_len,
        proto=proto,
    )


def _check_gso(
    pkt: bytes | memoryview,
    *,
    base: int,
    flags: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
    version: int,
    l3_len: int,
    proto: int,
) -> Drop | None:
    """A GSO super-packet: TCP only, over the IP version the type names."""
    size = len(pkt) - VNET_HDR_LEN
    if gso_size in (0, _GSO_BY_FRAGS):
        return Drop.VNET_GSO_SIZE
    if (base == GSO_TCPV4) != (version == 4):
        return Drop.VNET_GSO_IP_VERSION
    if proto != _IPPROTO_TCP:
        return Drop.VNET_GSO_NOT_TCP
    if not flags & F_NEEDS_CSUM:
        return Drop.VNET_GSO_NEEDS_CSUM
    if csum_start != l3_len or csum_offset != _TCP_CSUM_OFFSET:
        return Drop.VNET_BAD_CSUM_OFFSETS
    tcp_off = VNET_HDR_LEN + l3_len
    if size < l3_len + 20:
        return Drop.VNET_BAD_TCP_HEADER
    doff = (pkt[tcp_off + 12] >> 4) * 4
    if doff < 20 or l3_len + doff > size:
        return Drop.VNET_BAD_TCP_HEADER
    if gso_size < MIN_MSS[version] - (doff - 20):
        return Drop.VNET_GSO_SIZE_SMALL
    return None


def vnet_segments(pkt: bytes | memoryview) -> int:
    """How many packets ``pkt`` (header + IP packet) becomes once segmented: 1 for a plain
    packet, ceil(TCP payload / gso_size) for a super-packet. For budgets: a peer is
    charged per packet the gateway or the kernel will produce, not per frame.
    Call it on a packet ``validate_vnet_packet`` accepted (else it answers 1)."""
    if len(pkt) < VNET_HDR_LEN + 40 or not pkt[1] & ~GSO_ECN:
        return 1
    gso_size = pkt[4] | (pkt[5] << 8)
    off = VNET_HDR_LEN
    l3 = (pkt[off] & 0x0F) * 4 if pkt[off] >> 4 == 4 else 40
    if gso_size == 0 or len(pkt) < off + l3 + 13:
        return 1
    doff = (pkt[off + l3 + 12] >> 4) * 4
    payload = len(pkt) - off - l3 - doff
    return max(1, -(-payload // gso_size))


def ip_src_dst(pkt: bytes | memoryview, offset: int = 0) -> tuple[bytes, bytes] | None:
    """Raw (source, destination) address bytes of the IPv4/IPv6 packet at ``offset``.

    None if the header is not well-formed: too short, bad IHL, or a length field that
    claims more bytes than there are. Cheap enough to call on every packet.
    """
    avail = len(pkt) - offset
    if offset < 0 or avail < 1:
        return None
    version = pkt[offset] >> 4
    if version == 4:
        if avail < 20:
            return None
        ihl = (pkt[offset] & 0x0F) * 4
        total = (pkt[offset + 2] << 8) | pkt[offset + 3]
        if ihl < 20 or total < ihl or total > avail:
            return None
        return bytes(pkt[offset + 12 : offset + 16]), bytes(pkt[offset + 16 : offset + 20])
    if version == 6:
        if avail < 40:
            return None
        payload = (pkt[offset + 4] << 8) | pkt[offset + 5]
        if payload + 40 > avail:
            return None
        return bytes(pkt[offset + 8 : offset + 24]), bytes(pkt[offset + 24 : offset + 40])
    return None
