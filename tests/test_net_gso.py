"""Software GSO against scapy's own checksums and segment arithmetic."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from vpnd.net.gso import GsoError, _sum, checksum, to_plain
from vpnd.net.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR_LEN


def _vnet(*fields: int) -> bytes:
    """flags, gso_type, hdr_len, gso_size, csum_start, csum_offset"""
    return struct.pack("<BBHHHH", *fields)


def _pseudo_partial(ip: bytes, l3: int, proto: int) -> int:
    """What the kernel leaves in a CHECKSUM_PARTIAL field: the folded pseudo-header sum."""
    src_dst = ip[12:20] if ip[0] >> 4 == 4 else ip[8:40]
    s = _sum(src_dst) + proto + (len(ip) - l3)
    s %= 0xFFFF
    return s or 0xFFFF


def _partial(pkt: Packet, proto: int) -> bytes:
    raw = bytearray(bytes(pkt))
    l3 = 20 if raw[0] >> 4 == 4 else 40
    field = l3 + (16 if proto == 6 else 6)
    struct.pack_into("!H", raw, field, _pseudo_partial(bytes(raw), l3, proto))
    return bytes(raw)


def _valid(raw: bytes) -> Packet:
    pkt: Packet = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    got = l4.chksum
    del l4.chksum
    if IP in pkt:
        ip_got = pkt[IP].chksum
        del pkt[IP].chksum
    rebuilt = pkt.__class__(bytes(pkt))
    assert (rebuilt[TCP] if TCP in rebuilt else rebuilt[UDP]).chksum == got, "L4 checksum"
    if IP in rebuilt:
        assert rebuilt[IP].chksum == ip_got, "IPv4 header checksum"
    return rebuilt


@pytest.mark.parametrize("size", [1, 1399, 1400, 1401, 4000, 64000])
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tso_super_packet_becomes_valid_segments(size: int, v6: bool) -> None:
    payload = bytes((i * 7) % 256 for i in range(size))
    net = IPv6(src="fd00::2", dst="fd00::1") if v6 else IP(src="10.8.0.2", dst="10.8.0.1", id=100)
    pkt = net / TCP(sport=5000, dport=80, seq=1_000, flags="PA") / payload
    raw = _partial(pkt, 6)
    l3 = 40 if v6 else 20
    mss = 1400
    hdr = _vnet(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, l3 + 20, mss, l3, 16)
    segs = [bytes(s) for s in to_plain(hdr + raw)]
    assert len(segs) == max(1, -(-size // mss))
    data = b""
    for i, seg in enumerate(segs):
        p = _valid(seg)
        assert p[TCP].seq == 1_000 + i * mss
        assert ("P" in str(p[TCP].flags)) == (i == len(segs) - 1)
        if not v6:
            assert p[IP].id == 100 + i
        data += bytes(p[TCP].payload)
    assert data == payload


def test_partial_checksum_is_completed_for_udp_and_tcp() -> None:
    for proto, pkt in (
        (17, IP(src="10.8.0.2", dst="10.8.0.9") / UDP(sport=1, dport=2) / b"hello world!"),
        (6, IPv6(src="fd00::2", dst="fd00::9") / TCP(sport=1, dport=2, flags="S")),
    ):
        raw = _partial(pkt, proto)
        l3 = 20 if raw[0] >> 4 == 4 else 40
        hdr = _vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, l3, 6 if proto == 17 else 16)
        (out,) = to_plain(hdr + raw)
        _valid(bytes(out))


def test_plain_packet_passes_through_without_copy() -> None:
    raw = bytes(IP(src="10.8.0.2", dst="10.8.0.9") / UDP() / b"x")
    (out,) = to_plain(bytes(VNET_HDR_LEN) + raw)
    assert isinstance(out, memoryview) and bytes(out) == raw


def test_invalid_header_is_refused() -> None:
    raw = bytes(IP(src="10.8.0.2", dst="10.8.0.9") / TCP() / (b"x" * 3000))
    with pytest.raises(GsoError):
        to_plain(_vnet(F_NEEDS_CSUM, GSO_TCPV6, 40, 1400, 20, 16) + raw)  # v6 type on v4


def test_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 section 3 example words 0001 f203 f4f5 f6f7 -> sum ddf2 (before ~)
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum(data) == (~0xDDF2) & 0xFFFF


@pytest.mark.parametrize("offset", [0, 2, 4, 8])
def test_partial_checksum_may_only_name_the_real_checksum_field(offset: int) -> None:
    """A peer pointing csum_offset at the ports would have them rewritten after the
    firewall judged the packet (a port-rule bypass); such headers are refused."""
    from vpnd.net.vnet import validate_vnet_packet

    raw = _partial(IP(src="10.8.0.2", dst="10.8.0.3") / UDP(sport=1000, dport=53) / (b"x" * 40), 17)
    assert validate_vnet_packet(_vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6) + raw) is None
    bad = _vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, offset) + raw
    assert validate_vnet_packet(bad) == "vnet_bad_csum_offsets"
    with pytest.raises(GsoError):
        to_plain(bad)
    # and csum_start must be where the L4 header starts
    assert validate_vnet_packet(_vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, 22, 4) + raw) is not None
