"""virtio_net_hdr validation and the per-packet address extractor."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnd.net.vnet import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR_LEN,
    ip_src_dst,
    plain_vnet_header,
    strip_vnet,
    validate_vnet_packet,
    vnet_segments,
)

SRC4, DST4 = ipaddress.IPv4Address("10.8.0.2"), ipaddress.IPv4Address("10.8.0.1")
SRC6, DST6 = ipaddress.IPv6Address("fd00::2"), ipaddress.IPv6Address("fd00::1")


def tcp_header(doff_words: int = 5) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, doff_words << 4, 0x10, 65535, 0, 0)
    return hdr + bytes(doff_words * 4 - 20)


def ipv4(payload: bytes, proto: int = 6, total: int | None = None, ihl: int = 5) -> bytes:
    size = ihl * 4 + len(payload)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        size if total is None else total,
        0,
        0x4000,
        64,
        proto,
        0,
        SRC4.packed,
        DST4.packed,
    )
    return hdr + bytes(max(0, ihl * 4 - 20)) + payload


def ipv6(payload: bytes, nxt: int = 6, plen: int | None = None) -> bytes:
    hdr = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload) if plen is None else plen,
        nxt,
        64,
        SRC6.packed,
        DST6.packed,
    )
    return hdr + payload


def vnet(
    *,
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


DATA = bytes(range(256)) * 12  # 3072 bytes: a super-packet of three segments


def gso4(**kw: int) -> bytes:
    h = dict(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV4,
        hdr_len=40,
        gso_size=1448,
        csum_start=20,
        csum_offset=16,
    )
    h.update(kw)
    return vnet(**h) + ipv4(tcp_header() + DATA)


def gso6(**kw: int) -> bytes:
    h = dict(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV6,
        hdr_len=60,
        gso_size=1428,
        csum_start=40,
        csum_offset=16,
    )
    h.update(kw)
    return vnet(**h) + ipv6(tcp_header() + DATA)


def test_plain_header_is_zeros() -> None:
    assert plain_vnet_header() == bytes(10)
    assert VNET_HDR_LEN == 10


@pytest.mark.parametrize(
    "pkt",
    [
        gso4(),
        gso6(),
        gso4(gso_type=GSO_TCPV4 | GSO_ECN),
        gso6(gso_type=GSO_TCPV6 | GSO_ECN),
        gso4(hdr_len=0),  # a hint only: the kernel accepts zero
        vnet() + ipv4(b"\x08\x00" + bytes(62), proto=1),  # plain ICMP
        vnet(flags=F_DATA_VALID) + ipv4(tcp_header(), proto=6),
        vnet(flags=F_NEEDS_CSUM, csum_start=20, csum_offset=6) + ipv4(bytes(8) + b"x", proto=17),
        vnet(flags=F_NEEDS_CSUM, csum_start=40, csum_offset=16) + ipv6(tcp_header() + b"x"),
        vnet(
            gso_type=GSO_TCPV4,
            flags=F_NEEDS_CSUM,
            hdr_len=64,
            gso_size=1000,
            csum_start=24,
            csum_offset=16,
        )
        + ipv4(tcp_header(doff_words=10) + DATA, ihl=6),
    ],
)
def test_valid_packets(pkt: bytes) -> None:
    assert validate_vnet_packet(pkt) is None
    assert validate_vnet_packet(memoryview(pkt)) is None


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (b"", "vnet_short"),
        (bytes(9), "vnet_short"),
        (bytes(10), "vnet_short"),  # a header and no packet
        (gso4(flags=F_NEEDS_CSUM | 0x04), "vnet_bad_flags"),  # RSC_INFO
        (gso4(flags=F_NEEDS_CSUM | F_DATA_VALID), "vnet_bad_flags"),
        (gso4(gso_type=3), "vnet_bad_gso_type"),  # UDP (UFO)
        (gso4(gso_type=5), "vnet_bad_gso_type"),  # UDP_L4
        (gso4(gso_type=0x42), "vnet_bad_gso_type"),
        (vnet(gso_type=GSO_ECN) + ipv4(tcp_header()), "vnet_bad_gso_type"),  # ECN without TCP
        (gso4(hdr_len=len(DATA) + 41), "vnet_bad_hdr_len"),
        (gso4(csum_start=10), "vnet_bad_csum_offsets"),  # inside the IP header
        (gso4(csum_start=30), "vnet_bad_csum_offsets"),  # GSO: must be the TCP header
        (gso4(csum_offset=6), "vnet_bad_csum_offsets"),  # GSO: must be tcphdr.check
        (gso4(csum_offset=60000), "vnet_bad_csum_offsets"),
        (
            vnet(flags=F_NEEDS_CSUM, csum_start=20, csum_offset=7) + ipv4(bytes(8), proto=17),
            "vnet_bad_csum_offsets",  # 20 + 7 + 2 > 28
        ),
        (vnet(csum_start=20) + ipv4(tcp_header()), "vnet_bad_csum_offsets"),  # without NEEDS_CSUM
        (vnet(csum_offset=16) + ipv4(tcp_header()), "vnet_bad_csum_offsets"),
        (gso4(gso_size=0), "vnet_gso_size"),
        (gso4(gso_size=0xFFFF), "vnet_gso_size"),  # GSO_BY_FRAGS
        (vnet(gso_size=1400) + ipv4(tcp_header()), "vnet_gso_size"),  # size without GSO
        (gso4(flags=0, csum_start=0, csum_offset=0), "vnet_gso_needs_csum"),
        (gso4(gso_type=GSO_TCPV6), "vnet_gso_ip_version"),
        (gso6(gso_type=GSO_TCPV4), "vnet_gso_ip_version"),
        (
            vnet(
                flags=F_NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1400, csum_start=20, csum_offset=16
            )
            + ipv4(bytes(8) + DATA, proto=17),
            "vnet_gso_not_tcp",
        ),
        (
            vnet(
                flags=F_NEEDS_CSUM, gso_type=GSO_TCPV6, gso_size=1400, csum_start=40, csum_offset=16
            )
            + ipv6(tcp_header() + DATA, nxt=0),
            "vnet_gso_not_tcp",  # extension headers are not accepted in a super-packet
        ),
        (
            vnet(
                flags=F_NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1400, csum_start=20, csum_offset=16
            )
            + ipv4(b"\x00" * 12 + b"\x20" + bytes(7)),
            "vnet_bad_tcp_header",  # data offset 2 words
        ),
        (
            vnet(
                flags=F_NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1400, csum_start=20, csum_offset=16
            )
            + ipv4(b"\x00" * 12 + b"\xf0" + bytes(7)),
            "vnet_bad_tcp_header",  # 60-byte TCP header in a 20-byte payload
        ),
        (vnet() + b"\x00" * 40, "vnet_not_ip"),
        (vnet() + ipv4(b"abc")[:19], "vnet_not_ip"),
        (vnet() + ipv4(b"abc", total=100), "vnet_not_ip"),  # IP length != packet length
        (vnet() + ipv4(b"abc", total=22), "vnet_not_ip"),
        (vnet() + ipv4(b"abc", ihl=4), "vnet_not_ip"),
        (vnet() + ipv6(b"abc", plen=10), "vnet_not_ip"),
        (vnet() + ipv6(b"")[:39], "vnet_not_ip"),
    ],
)
def test_each_malformation_has_its_reason(pkt: bytes, reason: str) -> None:
    assert validate_vnet_packet(pkt) == reason


@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    r = validate_vnet_packet(data)
    assert r is None or r.startswith("vnet_")
    ip_src_dst(data)


@given(
    st.tuples(
        *(st.integers(0, 255) for _ in range(2)), *(st.integers(0, 0xFFFF) for _ in range(4))
    ),
    st.sampled_from([ipv4(tcp_header() + DATA), ipv6(tcp_header() + DATA), ipv4(b"x", proto=17)]),
)
def test_random_headers_on_real_packets_never_raise(
    hdr: tuple[int, int, int, int, int, int], body: bytes
) -> None:
    pkt = struct.pack("<BBHHHH", *hdr) + body
    r = validate_vnet_packet(pkt)
    if r is None:  # whatever passes must satisfy the invariants the kernel relies on
        flags, gso_type, hdr_len, gso_size, cs, co = hdr
        assert hdr_len <= len(body)
        if flags & F_NEEDS_CSUM:
            assert cs + co + 2 <= len(body)
        assert (gso_type != GSO_NONE) == (gso_size != 0)


def test_strip_vnet_is_zero_copy_view() -> None:
    pkt = gso4()
    view = strip_vnet(pkt)
    assert isinstance(view, memoryview)
    assert bytes(view) == pkt[10:]
    with pytest.raises(ValueError, match="shorter than a virtio_net_hdr"):
        strip_vnet(b"123")


def test_ip_src_dst_v4_v6() -> None:
    assert ip_src_dst(ipv4(b"hello", proto=17)) == (SRC4.packed, DST4.packed)
    assert ip_src_dst(ipv6(b"hello", nxt=17)) == (SRC6.packed, DST6.packed)
    pkt = gso4()
    assert ip_src_dst(pkt, VNET_HDR_LEN) == (SRC4.packed, DST4.packed)
    assert ip_src_dst(memoryview(gso6()), VNET_HDR_LEN) == (SRC6.packed, DST6.packed)
    # Trailing bytes beyond the IP length are tolerated (link padding).
    assert ip_src_dst(ipv4(b"x") + b"pad") == (SRC4.packed, DST4.packed)


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        b"\x45",
        ipv4(b"x")[:19],  # truncated header
        ipv4(b"x", total=200),  # claims more than there is
        ipv4(b"x", total=10),  # shorter than its own header
        ipv4(b"xyzw", ihl=4),
        ipv6(b"x")[:39],
        ipv6(b"x", plen=5),
        b"\x00" * 60,  # version 0
        b"\x55" * 60,  # version 5
        b"\xff" * 60,
    ],
)
def test_ip_src_dst_rejects_malformed(pkt: bytes) -> None:
    assert ip_src_dst(pkt) is None


def test_ip_src_dst_offset_bounds() -> None:
    assert ip_src_dst(ipv4(b"x"), offset=100) is None
    assert ip_src_dst(ipv4(b"x"), offset=-1) is None


# -- GSO fan-out bound ------------------------------------------------------------------


def big4(gso_size: int, *, doff_words: int = 5, size: int = 60000) -> bytes:
    h = vnet(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV4,
        hdr_len=20 + doff_words * 4,
        gso_size=gso_size,
        csum_start=20,
        csum_offset=16,
    )
    return h + ipv4(tcp_header(doff_words=doff_words) + bytes(size))


def big6(gso_size: int, *, doff_words: int = 5, size: int = 60000) -> bytes:
    h = vnet(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV6,
        hdr_len=40 + doff_words * 4,
        gso_size=gso_size,
        csum_start=40,
        csum_offset=16,
    )
    return h + ipv6(tcp_header(doff_words=doff_words) + bytes(size))


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (big4(1), "vnet_gso_size_small"),  # 60,000 segments
        (big4(100), "vnet_gso_size_small"),
        (big4(535), "vnet_gso_size_small"),
        (big4(536), None),  # IPv4's minimum MSS
        (big4(523, doff_words=8), "vnet_gso_size_small"),  # 12 bytes of options: 524
        (big4(524, doff_words=8), None),  # MSS 536 less the timestamp option
        (big6(1), "vnet_gso_size_small"),
        (big6(1219), "vnet_gso_size_small"),
        (big6(1220), None),  # IPv6's minimum MTU less 60
        (big6(1207, doff_words=8), "vnet_gso_size_small"),
        (big6(1208, doff_words=8), None),
    ],
)
def test_a_tiny_gso_size_is_refused(pkt: bytes, reason: str | None) -> None:
    assert validate_vnet_packet(pkt) == reason


@pytest.mark.parametrize(
    ("pkt", "segments"),
    [
        (big4(1448, size=1), 1),
        (big4(1448, size=1448), 1),
        (big4(1448, size=1449), 2),
        (big4(1448, size=60000), 42),
        (big4(536, size=60000), 112),
        (big6(1428, size=60000), 43),
        (big4(524, doff_words=8, size=60000), 115),
        (vnet() + ipv4(tcp_header() + bytes(100)), 1),  # not GSO
        (gso4(), 3),  # 3072 bytes at 1448
    ],
)
def test_segments_counts_what_segmentation_produces(pkt: bytes, segments: int) -> None:
    assert validate_vnet_packet(pkt) is None
    assert vnet_segments(pkt) == segments
