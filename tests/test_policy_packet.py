"""vpnd.policy.packet: header facts of good packets, a reason for every malformed one."""

from __future__ import annotations

import struct

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
    frag6,
    icmp,
    icmp_error,
    ipv4,
    ipv6,
    opts6,
    raw,
    routing6,
    tcp,
    udp,
)

from vpnd.policy.packet import Flow, describe_flow, parse_flow

A4, B4 = "10.8.0.2", "192.168.50.10"
A6, B6 = "fd00::2", "fd00:50::10"


def flow(pkt: bytes, offset: int = 0) -> Flow:
    result = parse_flow(pkt, offset)
    assert isinstance(result, Flow), result
    return result


# --- well-formed packets -----------------------------------------------------------------


def test_ipv4_tcp() -> None:
    f = flow(ipv4(A4, B4, TCP, tcp(51000, 22, SYN)))
    assert f == Flow(4, TCP, raw(A4), raw(B4), 51000, 22, None, "none", None, SYN, 0)


def test_ipv4_udp_with_options_and_trailing_padding() -> None:
    pkt = ipv4(A4, B4, UDP, udp(5353, 53), options=b"\x01\x01\x01\x00") + b"\0" * 6
    f = flow(pkt)
    assert (f.proto, f.sport, f.dport, f.fragment) == (UDP, 5353, 53, "none")


def test_ipv6_tcp_through_extension_headers() -> None:
    pkt = ipv6(A6, B6, TCP, tcp(40000, 443), headers=[(0, opts6(8)), (60, opts6(16))])
    f = flow(pkt)
    assert (f.version, f.proto, f.src, f.dst) == (6, TCP, raw(A6), raw(B6))
    assert (f.sport, f.dport, f.tcp_flags) == (40000, 443, ACK)


def test_destination_options_may_appear_twice() -> None:
    pkt = ipv6(A6, B6, UDP, udp(1, 2), headers=[(60, opts6()), (43, routing6(0)), (60, opts6())])
    assert flow(pkt).dport == 2


@pytest.mark.parametrize(
    ("pkt", "icmp_type", "ident"),
    [
        (ipv4(A4, B4, ICMP, icmp(8, ident=77)), 8, 77),
        (ipv4(B4, A4, ICMP, icmp(0, ident=77)), 0, 77),
        (ipv4(A4, B4, ICMP, icmp(13, ident=5)), 13, 5),
        (ipv6(A6, B6, ICMPV6, icmp(128, ident=9)), 128, 9),
        (ipv6(B6, A6, ICMPV6, icmp(129, ident=9)), 129, 9),
        (ipv6(A6, B6, ICMPV6, icmp(135, ident=9)), 135, 0),  # neighbour solicitation
        (ipv4(A4, B4, ICMP, icmp(5, ident=9)), 5, 0),  # redirect: no identifier
    ],
)
def test_icmp_identifier_plays_the_port(pkt: bytes, icmp_type: int, ident: int) -> None:
    f = flow(pkt)
    assert (f.icmp_type, f.sport, f.dport, f.inner) == (icmp_type, ident, ident, None)


def test_icmp_of_the_other_version_is_just_a_protocol() -> None:
    f = flow(ipv4(A4, B4, ICMPV6, icmp(128, ident=3)))
    assert (f.proto, f.icmp_type, f.sport) == (ICMPV6, None, 0)


def test_icmp_error_quotes_the_original_flow() -> None:
    original = ipv4(A4, B4, TCP, tcp(51000, 22)) + b"x" * 100
    f = flow(ipv4("192.168.50.1", A4, ICMP, icmp_error(3, original, code=4, keep=28)))
    assert f.icmp_type == 3
    assert f.inner is not None
    assert (f.inner.src, f.inner.dst, f.inner.sport, f.inner.dport) == (raw(A4), raw(B4), 51000, 22)


def test_icmpv6_packet_too_big_quotes_through_extension_headers() -> None:
    original = ipv6(A6, B6, UDP, udp(4000, 4433, b"y" * 1400), headers=[(60, opts6())])
    f = flow(ipv6("fd00:50::1", A6, ICMPV6, icmp_error(2, original, keep=1232)))
    assert f.inner is not None
    assert (f.inner.version, f.inner.proto, f.inner.dport) == (6, UDP, 4433)


def test_gso_super_packet_reads_headers_only() -> None:
    big = ipv4(A4, B4, TCP, tcp(1, 2, body=b"z" * 65000))
    assert flow(big).dport == 2


def test_offset_and_memoryview() -> None:
    pkt = b"\x01" * 10 + ipv6(A6, B6, UDP, udp(7, 8))
    result = parse_flow(memoryview(pkt), 10)
    assert isinstance(result, Flow)
    f = result
    assert (f.src, f.dport) == (raw(A6), 8)
    assert isinstance(f.src, bytes)


# --- fragments ---------------------------------------------------------------------------


def test_ipv4_fragments() -> None:
    first = flow(ipv4(A4, B4, UDP, udp(1, 53, b"q" * 32), more=True, ident=0x4242))
    assert (first.fragment, first.frag_id, first.dport) == ("first", 0x4242, 53)
    later = flow(ipv4(A4, B4, UDP, b"q" * 40, frag_offset=40, ident=0x4242))
    assert (later.fragment, later.frag_id, later.sport, later.dport) == ("later", 0x4242, 0, 0)
    last_with_more = flow(ipv4(A4, B4, UDP, b"q" * 40, frag_offset=40, more=True))
    assert last_with_more.fragment == "later"


def test_ipv6_fragments() -> None:
    first = ipv6(A6, B6, TCP, tcp(5, 80), headers=[(44, frag6(0, True, 0xDEADBEEF))])
    f = flow(first)
    assert (f.fragment, f.frag_id, f.dport) == ("first", 0xDEADBEEF, 80)
    later = ipv6(A6, B6, TCP, b"d" * 64, headers=[(44, frag6(1232, False, 0xDEADBEEF))])
    f = flow(later)
    assert (f.fragment, f.frag_id, f.proto, f.dport) == ("later", 0xDEADBEEF, TCP, 0)
    atomic = ipv6(A6, B6, TCP, tcp(5, 80), headers=[(44, frag6(0, False, 7))])
    assert flow(atomic).fragment == "none"


# --- malformed ---------------------------------------------------------------------------

GOOD4 = ipv4(A4, B4, TCP, tcp(1000, 22))
GOOD6 = ipv6(A6, B6, UDP, udp(1000, 53))
ICMP_IN_ICMP = ipv4(B4, A4, ICMP, icmp_error(3, ipv4(A4, B4, ICMP, icmp(8, ident=1)), keep=28))

EIGHT = [
    (0, opts6()),
    (60, opts6()),
    (139, opts6()),
    (140, opts6()),
    (135, opts6()),
    (51, b"\x01" + b"\0" * 10),  # AH: 12 bytes, counted in 4-byte words
    (43, routing6(0)),
    (44, frag6(0, False, 1)),
]
EIGHT_HEADERS = ipv6(A6, B6, UDP, udp(1, 2), headers=EIGHT)
NINE_HEADERS = ipv6(A6, B6, UDP, udp(1, 2), headers=[*EIGHT, (60, opts6())])

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not_ip"),
    ("version 5", b"\x50" + GOOD4[1:], "not_ip"),
    ("version 0", b"\x00" * 40, "not_ip"),
    ("ipv4 short header", GOOD4[:19], "truncated"),
    ("ipv4 ihl 4", b"\x44" + GOOD4[1:], "bad_ihl"),
    ("ipv4 ihl beyond total", ipv4(A4, B4, TCP, tcp(1, 2), ihl=15, tot_len=40), "bad_ihl"),
    ("ipv4 total below 20", ipv4(A4, B4, TCP, tcp(1, 2), tot_len=12), "bad_length"),
    ("ipv4 total beyond buffer", ipv4(A4, B4, TCP, tcp(1, 2), tot_len=41), "truncated"),
    ("ipv4 tcp header cut", ipv4(A4, B4, TCP, tcp(1, 2)[:19]), "truncated"),
    ("ipv4 udp header cut", ipv4(A4, B4, UDP, udp(1, 2)[:7]), "truncated"),
    ("ipv4 icmp header cut", ipv4(A4, B4, ICMP, icmp(8)[:7]), "truncated"),
    ("tcp data offset 4", ipv4(A4, B4, TCP, tcp(1, 2, doff=4) + b"\0" * 4), "bad_tcp"),
    ("tiny first fragment", ipv4(A4, B4, TCP, tcp(1, 2)[:8], more=True), "truncated"),
    (
        "ipv4 option runs past ihl",
        ipv4(A4, B4, UDP, udp(1, 2), options=b"\x07\x09\0\0"),
        "bad_options",
    ),
    ("ipv4 option length 1", ipv4(A4, B4, UDP, udp(1, 2), options=b"\x07\x01\0\0"), "bad_options"),
    (
        "ipv4 option without length",
        ipv4(A4, B4, UDP, udp(1, 2), options=b"\x01\x01\x01\x07"),
        "bad_options",
    ),
    (
        "ipv4 loose source route",
        ipv4(A4, B4, UDP, udp(1, 2), options=b"\x83\x03\x04\x00"),
        "source_route",
    ),
    (
        "ipv4 strict source route",
        ipv4(A4, B4, UDP, udp(1, 2), options=b"\x89\x03\x04\x00"),
        "source_route",
    ),
    ("ipv4 fragment past 64k", ipv4(A4, B4, UDP, b"p" * 16, frag_offset=65528), "bad_fragment"),
    ("ipv6 short header", GOOD6[:39], "truncated"),
    ("ipv6 payload beyond buffer", ipv6(A6, B6, UDP, udp(1, 2), plen=9), "truncated"),
    ("ipv6 udp cut by payload length", ipv6(A6, B6, UDP, udp(1, 2), plen=7), "truncated"),
    ("ipv6 ext header cut", ipv6(A6, B6, UDP, b"", headers=[(60, opts6(16))], plen=8), "truncated"),
    (
        "ipv6 ext header needs 8 bytes",
        ipv6(A6, B6, UDP, b"", headers=[(60, opts6())], plen=6),
        "truncated",
    ),
    ("ipv6 nine ext headers", NINE_HEADERS, "ipv6_ext_too_many"),
    (
        "ipv6 repeated routing",
        ipv6(A6, B6, UDP, udp(1, 2), headers=[(43, routing6(0)), (43, routing6(0))]),
        "ipv6_ext_loop",
    ),
    (
        "ipv6 repeated fragment",
        ipv6(A6, B6, UDP, udp(1, 2), headers=[(44, frag6(0, False, 1)), (44, frag6(0, False, 1))]),
        "ipv6_ext_loop",
    ),
    (
        "ipv6 three dest options",
        ipv6(A6, B6, UDP, udp(1, 2), headers=[(60, opts6())] * 3),
        "ipv6_ext_loop",
    ),
    (
        "ipv6 late hop-by-hop",
        ipv6(A6, B6, UDP, udp(1, 2), headers=[(60, opts6()), (0, opts6())]),
        "ipv6_ext_order",
    ),
    (
        "ipv6 routing with segments left",
        ipv6(A6, B6, UDP, udp(1, 2), headers=[(43, routing6(1))]),
        "source_route",
    ),
    (
        "icmp error quoting an icmp error",
        ipv4(A4, B4, ICMP, icmp_error(11, ICMP_IN_ICMP)),
        "icmp_nested",
    ),
    ("icmp error quoting nothing", ipv4(B4, A4, ICMP, icmp_error(3, b"")), "icmp_inner"),
    ("icmp error quoting ipv6", ipv4(B4, A4, ICMP, icmp_error(3, GOOD6)), "icmp_inner"),
    ("icmpv6 error quoting ipv4", ipv6(B6, A6, ICMPV6, icmp_error(1, GOOD4)), "icmp_inner"),
    (
        "icmp error quoting 4 tcp bytes",
        ipv4(B4, A4, ICMP, icmp_error(3, GOOD4, keep=24)),
        "icmp_inner",
    ),
    (
        "icmp error quoting bad ihl",
        ipv4(B4, A4, ICMP, icmp_error(3, b"\x44" + GOOD4[1:])),
        "icmp_inner",
    ),
]


@pytest.mark.parametrize(
    ("pkt", "reason"), [(p, r) for _, p, r in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_malformed_packets_get_a_reason(pkt: bytes, reason: str) -> None:
    assert parse_flow(pkt) == reason


def test_eight_extension_headers_are_fine() -> None:
    assert flow(EIGHT_HEADERS).dport == 2


def test_offset_past_the_end() -> None:
    assert parse_flow(GOOD4, len(GOOD4)) == "not_ip"
    assert parse_flow(GOOD4, -1) == "truncated"


def test_other_protocols_pass_through_without_ports() -> None:
    f = flow(ipv4(A4, B4, GRE, b"\0" * 4))
    assert (f.proto, f.sport, f.dport, f.icmp_type) == (GRE, 0, 0, None)
    f = flow(ipv6(A6, B6, 59, b""))  # no next header
    assert f.proto == 59


# --- never raises ------------------------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=-2, max_value=60))
def test_random_bytes_never_raise(data: bytes, offset: int) -> None:
    result = parse_flow(data, offset)
    assert isinstance(result, (Flow, str))


SEEDS = [
    GOOD4,
    GOOD6,
    ICMP_IN_ICMP,
    ipv4("192.168.50.1", A4, ICMP, icmp_error(3, GOOD4)),
    ipv6(
        "fd00:50::1",
        A6,
        ICMPV6,
        icmp_error(2, ipv6(A6, B6, TCP, tcp(1, 2), headers=[(0, opts6())])),
    ),
    ipv6(A6, B6, TCP, tcp(5, 80), headers=[(0, opts6()), (44, frag6(0, True, 9)), (60, opts6())]),
    ipv4(A4, B4, UDP, udp(1, 2), options=b"\x01\x07\x03\x00"),
]


@settings(max_examples=800, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
)
def test_mutated_packets_never_raise(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    pkt = bytearray(seed)
    for pos, value in edits:
        if pos < len(pkt):
            pkt[pos] = value
    result = parse_flow(bytes(pkt[: len(pkt) - cut % (len(pkt) + 1)]))
    assert isinstance(result, (Flow, str))


# --- describe ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pkt", "text"),
    [
        (ipv4(A4, B4, TCP, tcp(51000, 22)), "tcp 10.8.0.2:51000 -> 192.168.50.10:22"),
        (ipv6(A6, B6, UDP, udp(5, 53)), "udp [fd00::2]:5 -> [fd00:50::10]:53"),
        (ipv4(A4, B4, ICMP, icmp(8, ident=7)), "icmp 10.8.0.2 -> 192.168.50.10 type 8 id 7"),
        (ipv4(A4, B4, GRE, b""), "proto 47 10.8.0.2 -> 192.168.50.10"),
        (
            ipv4(A4, B4, UDP, b"x" * 8, frag_offset=8),
            "udp 10.8.0.2 -> 192.168.50.10 (later fragment)",
        ),
        (
            ipv4(B4, A4, ICMP, icmp_error(3, GOOD4)),
            "icmp 192.168.50.10 -> 10.8.0.2 type 3 about [tcp 10.8.0.2:1000 -> 192.168.50.10:22]",
        ),
    ],
)
def test_describe(pkt: bytes, text: str) -> None:
    assert describe_flow(flow(pkt)) == text


def test_struct_layout_matches_the_wire() -> None:
    # Guard for the fixtures themselves: a real header's fields land where RFC 791 says.
    pkt = ipv4(A4, B4, UDP, udp(1, 2))
    assert struct.unpack_from("!BBH", pkt) == (0x45, 0, 28)
    assert pkt[9] == UDP and pkt[12:16] == raw(A4)
