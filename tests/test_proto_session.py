"""Two sans-I/O sessions wired back to back with a stepped clock (never sleeps)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proto_fixtures import (
    TICK,
    Pair,
    established_client,
    established_gateway,
    packets_of,
    sent_close,
    the_close,
    tunnel_config,
)

from vpnd.proto import (
    CloseCode,
    ConfigReceived,
    Hello,
    HelloReceived,
    LocalProtocolError,
    PacketsReceived,
    Session,
    SessionClosed,
    SessionConfig,
    SessionState,
    describe_close,
)
from vpnd.proto.frames import FrameType, encode_close, encode_frame

# ---- handshake ---------------------------------------------------------------------


def test_handshake_completes() -> None:
    pair = Pair(offload=True)
    assert pair.gw.state is SessionState.AWAIT_HELLO
    assert pair.cl.state is SessionState.AWAIT_CONFIG
    cfg = pair.handshake(tunnel_config(offload=True))
    assert pair.gw_events == [HelloReceived(Hello(version=1, offload=True, software="vpnd/0.1.0"))]
    assert pair.cl_events == [ConfigReceived(cfg)]
    assert pair.gw.peer_hello == Hello(offload=True)
    assert pair.cl.tunnel_config == cfg
    assert pair.gw.tunnel_config == cfg


def test_gateway_refuses_offload_the_client_did_not_offer() -> None:
    pair = Pair(offload=False)
    pair.pump()
    with pytest.raises(LocalProtocolError, match="did not offer"):
        pair.gw.send_config(tunnel_config(offload=True), pair.now)
    assert pair.gw.state is SessionState.AWAIT_CONFIG


def test_client_rejects_config_enabling_unoffered_offload() -> None:
    client = Session(SessionConfig("client"), 0.0, offload=False)
    client.data_to_send()
    client.receive_data(encode_frame(FrameType.CONFIG, tunnel_config(offload=True).to_json()), 0.1)
    closed = the_close(client)
    assert closed.code == CloseCode.PROTOCOL_ERROR
    assert "offload" in closed.message
    assert sent_close(client)[0] == CloseCode.PROTOCOL_ERROR


# ---- data path ---------------------------------------------------------------------


def test_packets_round_trip_in_batches_both_ways() -> None:
    pair = Pair()
    pair.handshake()
    up = [bytes([i % 256]) * (20 + i * 37) for i in range(40)]
    down = [bytes(range(256)) * 5, b"\x45" + b"\x00" * 59]
    assert pair.cl.send_packets(up, pair.now) == 0
    assert pair.gw.send_packets([memoryview(p) for p in down], pair.now) == 0
    pair.pump()
    assert packets_of(pair.gw_events) == up
    assert packets_of(pair.cl_events) == down
    # One batch, one frame each way.
    assert sum(isinstance(e, PacketsReceived) for e in pair.gw_events) == 1


def test_vnet_packets_round_trip_when_offload_is_on() -> None:
    pair = Pair(offload=True)
    pair.handshake(tunnel_config(offload=True))
    batch = [bytes(10) + b"\x45" * 1400, b"\x01" * 10 + b"\x60" * 3000]
    pair.gw.send_packets(batch, pair.now, vnet=True)
    pair.pump()
    received = [e for e in pair.cl_events if isinstance(e, PacketsReceived)]
    assert [e.vnet for e in received] == [True]
    assert [bytes(p) for p in received[0].packets] == batch


def test_vnet_needs_offload_locally_and_remotely() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(LocalProtocolError, match="offload"):
        pair.cl.send_packets([bytes(20)], pair.now, vnet=True)
    client = established_client(offload=False)
    client.receive_data(
        encode_frame(FrameType.DATA, b"\x01" + struct.pack(">I", 12) + bytes(12)), 1
    )
    assert "VNET" in the_close(client).message


def test_received_packets_are_read_only_views() -> None:
    pair = Pair()
    pair.handshake()
    pair.cl.send_packets([b"abcdef"], pair.now)
    pair.pump()
    packet = packets_of(pair.gw_events)
    view = next(e for e in pair.gw_events if isinstance(e, PacketsReceived)).packets[0]
    assert packet == [b"abcdef"]
    assert isinstance(view, memoryview) and view.readonly


def _stream_for(packets: list[bytes], max_frame: int = 8192) -> tuple[bytes, Session]:
    """The gateway's byte stream for CONFIG + DATA, and a fresh client to feed it to."""
    gw = Session(SessionConfig("gateway", max_frame=max_frame), 0.0)
    client = Session(SessionConfig("client", max_frame=max_frame), 0.0)
    gw.receive_data(client.data_to_send(), 0.0)
    gw.send_config(tunnel_config(), 0.0)
    gw.send_packets(packets, 0.0)
    # An ignorable extension in the middle must be skipped wherever it is split.
    stream = (
        gw.data_to_send() + encode_frame(0x9A, b"renewal?") + encode_frame(FrameType.PING, b"x")
    )
    return stream, client


def _feed(client: Session, stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        if start < end:
            client.receive_data(stream[start:end], 0.0)
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert client.state is SessionState.ESTABLISHED, events
    assert client.counters.drops == {"extension": 1}
    return packets_of(events)


SMALL_BATCH = [b"\x45" * 7, b"\x60" * 1, bytes(range(200)), b"\x45" * 3000]


def test_every_single_split_point_delivers_the_same_packets() -> None:
    stream, _ = _stream_for(SMALL_BATCH)
    for cut in range(len(stream) + 1):
        _, client = _stream_for(SMALL_BATCH)
        assert _feed(client, stream, [cut]) == SMALL_BATCH, f"split at {cut}"


def test_one_byte_at_a_time_delivers_the_same_packets() -> None:
    stream, client = _stream_for(SMALL_BATCH)
    assert _feed(client, stream, list(range(len(stream)))) == SMALL_BATCH


@settings(max_examples=200, deadline=None)
@given(
    packets=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=40000), max_size=30),
    as_memoryview=st.booleans(),
)
def test_random_chunking_round_trips_byte_for_byte(
    packets: list[bytes], cuts: list[int], as_memoryview: bool
) -> None:
    stream, client = _stream_for(packets)
    cuts = [c % (len(stream) + 1) for c in cuts]
    if as_memoryview:
        # A caller's reusable buffer: the session must copy what it keeps.
        bounds = [0, *sorted(set(cuts)), len(stream)]
        scratch = bytearray(len(stream))
        for start, end in itertools.pairwise(bounds):
            if start < end:
                scratch[: end - start] = stream[start:end]
                client.receive_data(memoryview(scratch)[: end - start], 0.0)
                scratch[: end - start] = b"\xee" * (end - start)
        got: list[bytes] = []
        while (event := client.next_event()) is not None:
            if isinstance(event, PacketsReceived):
                got.extend(bytes(p) for p in event.packets)
        assert got == packets
    else:
        assert _feed(client, stream, cuts) == packets


def test_send_packets_splits_at_max_frame_and_drops_oversize() -> None:
    max_frame = 8192
    pair = Pair(max_frame=max_frame)
    pair.handshake()
    biggest = max_frame - 5  # flags byte + one length prefix
    batch = [b"a" * 1000] * 20 + [b"b" * biggest, b"c" * (biggest + 1), b""]
    before = pair.cl.counters.frames_out
    dropped = pair.cl.send_packets(batch, pair.now)
    assert dropped == 2
    assert pair.cl.counters.drops == {"oversize": 1, "short": 1}
    out = pair.cl.data_to_send()
    sizes = []
    pos = 0
    while pos < len(out):
        (word,) = struct.unpack_from(">I", out, pos)
        assert word >> 24 == FrameType.DATA
        sizes.append(word & 0xFFFFFF)
        pos += 4 + (word & 0xFFFFFF)
    # 8 packets of 1000 fill a frame (1 + 8 * 1004 = 8033); the near-max packet goes alone.
    assert sizes == [8033, 8033, 1 + 4 * 1004, 1 + 4 + biggest]
    assert pair.cl.counters.frames_out - before == 4
    pair.gw.receive_data(out, pair.now)
    pair.drain()
    assert packets_of(pair.gw_events) == batch[:21]


def test_counters_match_on_both_sides() -> None:
    pair = Pair()
    pair.handshake()
    for i in range(5):
        pair.cl.send_packets([bytes([i]) * 100] * 3, pair.now)
        pair.gw.send_packets([bytes([i]) * 50], pair.now)
        pair.pump()
    cl, gw = pair.cl.counters, pair.gw.counters
    assert cl.packets_out == gw.packets_in == 15
    assert gw.packets_out == cl.packets_in == 5
    assert (cl.frames_out, cl.bytes_out) == (gw.frames_in, gw.bytes_in)
    assert (gw.frames_out, gw.bytes_out) == (cl.frames_in, cl.bytes_in)
    # HELLO + 5 DATA from the client; CONFIG + 5 DATA from the gateway.
    assert cl.frames_out == 6 and gw.frames_out == 6
    assert cl.drops == gw.drops == {}


# ---- timers ------------------------------------------------------------------------


def test_keepalive_keeps_an_idle_pair_alive() -> None:
    pair = Pair()
    cfg = pair.handshake(tunnel_config(interval=2.0, timeout=6.0))
    pings_before = pair.cl.counters.frames_out
    pair.step(ticks=int(20 * cfg.keepalive_interval / TICK))  # 20 intervals
    assert pair.gw.state is SessionState.ESTABLISHED
    assert pair.cl.state is SessionState.ESTABLISHED
    assert not pair.closed(pair.gw_events) and not pair.closed(pair.cl_events)
    # Each interval the client sends one PING or one PONG, never more.
    assert 20 <= pair.cl.counters.frames_out - pings_before <= 40
    assert pair.cl.rtt == 0.0  # the back-to-back link answers within the same tick


def test_silent_peer_times_out_exactly_on_time() -> None:
    pair = Pair()
    cfg = pair.handshake(tunnel_config(interval=2.0, timeout=6.0))
    pair.step(ticks=9)
    pair.c2g = False  # the client goes silent as seen from the gateway
    expected = pair.gw_last_rx + cfg.keepalive_timeout
    assert pair.gw.get_timer() is not None
    while pair.now + TICK < expected:
        pair.step()
        assert pair.gw.state is SessionState.ESTABLISHED, pair.now
    pair.step()
    assert pair.now == expected
    [closed] = pair.closed(pair.gw_events)
    assert closed == SessionClosed(
        CloseCode.KEEPALIVE_TIMEOUT, "nothing received from the client for 6s", by_peer=False
    )
    # The gateway's CLOSE still reaches the client.
    [peer_view] = pair.closed(pair.cl_events)
    assert (peer_view.code, peer_view.by_peer) == (CloseCode.KEEPALIVE_TIMEOUT, True)
    assert pair.gw.get_timer() is None and pair.cl.get_timer() is None


def test_client_times_out_without_config() -> None:
    client = Session(SessionConfig("client", config_timeout=5.0), 100.0)
    assert client.get_timer() == 105.0
    client.handle_timer(104.875)
    assert client.state is SessionState.AWAIT_CONFIG
    client.handle_timer(105.0)
    closed = the_close(client)
    assert closed == SessionClosed(
        CloseCode.CONFIG_TIMEOUT, "no CONFIG from the gateway within 5s", False
    )
    assert sent_close(client)[0] == CloseCode.CONFIG_TIMEOUT


def test_gateway_times_out_without_hello_and_without_owner_config() -> None:
    gw = Session(SessionConfig("gateway", config_timeout=3.0), 0.0)
    gw.handle_timer(3.0)
    assert the_close(gw).message == "no HELLO from the client within 3s"
    pair = Pair(config_timeout=3.0)
    pair.pump()  # HELLO arrives, but the owner never answers
    pair.step(ticks=int(3.0 / TICK))
    [closed] = pair.closed(pair.gw_events)
    assert closed.code == CloseCode.CONFIG_TIMEOUT
    assert "CONFIG was not sent" in closed.message
    # Same timeout on both ends: the client gives up in the same tick.
    assert pair.closed(pair.cl_events)[0].code == CloseCode.CONFIG_TIMEOUT


def test_deadline_closes_with_cert_expired_and_the_peer_is_told() -> None:
    pair = Pair()
    pair.handshake(tunnel_config(interval=2.0, timeout=6.0))
    pair.gw.set_deadline(pair.now + 100.0, CloseCode.REVOKED, "never fires")
    when = pair.now + 4.5
    pair.gw.set_deadline(when, CloseCode.CERT_EXPIRED, "2026-12-01T00:00:00Z")  # replaces
    assert pair.gw.get_timer() is not None and pair.gw.get_timer() <= when  # type: ignore[operator]
    while pair.now < when - TICK:
        pair.step()
        assert pair.gw.state is SessionState.ESTABLISHED
    pair.step()
    [ours] = pair.closed(pair.gw_events)
    [theirs] = pair.closed(pair.cl_events)
    assert ours == SessionClosed(CloseCode.CERT_EXPIRED, "2026-12-01T00:00:00Z", by_peer=False)
    assert theirs == SessionClosed(CloseCode.CERT_EXPIRED, "2026-12-01T00:00:00Z", by_peer=True)
    assert describe_close(theirs.code, theirs.message) == (
        "your certificate expired at 2026-12-01T00:00:00Z; ask your admin for a new one"
    )


def test_timer_is_earliest_of_everything_pending() -> None:
    client = Session(
        SessionConfig("client", keepalive_interval=1.0, keepalive_timeout=4.0, config_timeout=9.0),
        0.0,
    )
    assert client.get_timer() == 1.0  # PING due: HELLO was the last thing sent at 0
    client.handle_timer(1.0)
    out = client.data_to_send()
    assert out[-12] == FrameType.PING  # 4-byte header + 8-byte sequence number
    assert client.get_timer() == 2.0
    client.set_deadline(1.5, CloseCode.KICKED, "bye")
    assert client.get_timer() == 1.5
    client.clear_deadline()
    assert client.get_timer() == 2.0


# ---- closing -----------------------------------------------------------------------


def test_close_is_idempotent_and_emits_once() -> None:
    pair = Pair()
    pair.handshake()
    pair.cl.close(CloseCode.NORMAL, "user quit", pair.now)
    pair.cl.close(CloseCode.SHUTDOWN, "again", pair.now)
    pair.pump()
    assert pair.closed(pair.cl_events) == [SessionClosed(CloseCode.NORMAL, "user quit", False)]
    assert pair.closed(pair.gw_events) == [SessionClosed(CloseCode.NORMAL, "user quit", True)]
    # After CLOSED: input ignored, packets dropped and counted, no timers.
    pair.gw.receive_data(b"\x07garbage", pair.now)
    assert pair.gw.next_event() is None and pair.gw.data_to_send() == b""
    assert pair.gw.send_packets([b"x", b"y"], pair.now) == 2
    assert pair.gw.counters.drops == {"closed": 2}
    pair.gw.send_config(tunnel_config(), pair.now)  # the owner raced the peer: harmless
    assert pair.gw.get_timer() is None


def test_close_message_is_truncated_on_a_character_boundary() -> None:
    gw = established_gateway()
    gw.close(CloseCode.POLICY, "é" * 400, 1.0)
    code, message = sent_close(gw)
    assert code == CloseCode.POLICY
    assert message == "é" * 256  # 512 bytes of two-byte characters
    with pytest.raises(LocalProtocolError):
        established_gateway().close(70000, "x", 1.0)  # type: ignore[arg-type]


def test_unknown_close_code_from_peer_is_kept_as_int() -> None:
    client = established_client()
    client.receive_data(encode_frame(FrameType.CLOSE, encode_close(4242, "future\x1b[2J")), 1.0)
    closed = the_close(client)
    assert closed == SessionClosed(4242, "future\ufffd[2J", by_peer=True)
    assert client.data_to_send() == b""  # no CLOSE echoed back
    assert describe_close(closed.code, closed.message) == (
        "the session was closed with unknown code 4242: future\ufffd[2J"
    )


# ---- misuse of the API -------------------------------------------------------------


def test_local_misuse_raises() -> None:
    client = Session(SessionConfig("client"), 0.0)
    with pytest.raises(LocalProtocolError, match="only a gateway"):
        client.send_config(tunnel_config(), 0.0)
    with pytest.raises(LocalProtocolError, match="await_config"):
        client.send_packets([b"x"], 0.0)
    gw = Session(SessionConfig("gateway"), 0.0)
    with pytest.raises(LocalProtocolError, match="await_hello"):
        gw.send_config(tunnel_config(), 0.0)
    gw = established_gateway()
    with pytest.raises(LocalProtocolError, match="established"):
        gw.send_config(tunnel_config(), 0.0)
    with pytest.raises(LocalProtocolError, match="finite"):
        gw.set_deadline(float("inf"), CloseCode.CERT_EXPIRED, "x")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"role": "server"}, "role"),
        ({"role": "client", "keepalive_interval": 0}, "keepalive_interval"),
        ({"role": "client", "keepalive_interval": 30, "keepalive_timeout": 30}, "exceed"),
        ({"role": "client", "config_timeout": float("nan")}, "config_timeout"),
        ({"role": "client", "max_frame": 100}, "max_frame"),
        ({"role": "client", "max_frame": 1 << 24}, "max_frame"),
    ],
)
def test_bad_session_config(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        SessionConfig(**kwargs)  # type: ignore[arg-type]


def _frame_sizes(out: bytes) -> list[int]:
    sizes, pos = [], 0
    while pos < len(out):
        (word,) = struct.unpack_from(">I", out, pos)
        sizes.append(word & 0xFFFFFF)
        pos += 4 + (word & 0xFFFFFF)
    return sizes


@pytest.mark.parametrize(
    ("second", "expected"),
    [(4183, [8192]), (4184, [1 + 4 + 4000, 1 + 4 + 4184])],
)
def test_frames_fill_exactly_to_max_frame(second: int, expected: list[int]) -> None:
    pair = Pair(max_frame=8192)
    pair.handshake()
    assert pair.cl.send_packets([b"p" * 4000, b"q" * second], pair.now) == 0
    out = pair.cl.data_to_send()
    assert _frame_sizes(out) == expected
    pair.gw.receive_data(out, pair.now)
    pair.drain()
    assert packets_of(pair.gw_events) == [b"p" * 4000, b"q" * second]
