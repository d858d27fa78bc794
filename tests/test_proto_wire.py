"""Malformed input of every kind: each must close the session with a clear reason, never raise."""

from __future__ import annotations

import ast
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proto_fixtures import established_client, established_gateway, sent_close, the_close

from vpnd.proto import CloseCode, Session, SessionClosed, SessionConfig, SessionState
from vpnd.proto.frames import FrameDecoder, FrameType, encode_frame
from vpnd.proto.messages import Hello

PROTOCOL_CLOSES = {CloseCode.PROTOCOL_ERROR, CloseCode.FRAME_TOO_LARGE}


def fresh(role: str) -> Session:
    session = Session(SessionConfig(role), 0.0)  # type: ignore[arg-type]
    session.data_to_send()
    return session


def hello_frame(body: bytes) -> bytes:
    return encode_frame(FrameType.HELLO, body)


def rejected(
    session: Session, data: bytes, fragment: str, code: int = CloseCode.PROTOCOL_ERROR
) -> None:
    session.receive_data(data, 1.0)
    closed = the_close(session)
    assert (closed.code, closed.by_peer) == (code, False), closed
    assert fragment in closed.message, closed.message
    assert "\n" not in closed.message
    assert sent_close(session) == (code, closed.message)


# ---- frame headers -----------------------------------------------------------------


def test_oversize_header_is_rejected_before_the_payload_arrives() -> None:
    gw = established_gateway()
    header = struct.pack(">I", (FrameType.DATA << 24) | (262144 + 1))
    rejected(gw, header, "262145 bytes, limit is 262144", CloseCode.FRAME_TOO_LARGE)


def test_oversize_json_header_is_rejected_at_the_header() -> None:
    rejected(
        fresh("gateway"),
        struct.pack(">I", (FrameType.HELLO << 24) | 8193),
        "HELLO frame declares 8193 bytes",
        CloseCode.FRAME_TOO_LARGE,
    )
    rejected(
        established_client(),
        struct.pack(">I", (FrameType.PING << 24) | 65),
        "limit is 64",
        CloseCode.FRAME_TOO_LARGE,
    )


def test_decoder_alone_rejects_header_without_buffering() -> None:
    decoder = FrameDecoder(max_frame=8192)
    decoder.feed(b"\x03\x00\x20")
    assert decoder.next_frame() is None  # 3 header bytes: not judged yet
    decoder.feed(b"\x01")
    with pytest.raises(Exception, match="limit is 8192"):
        decoder.next_frame()


@pytest.mark.parametrize("ftype", [0x00, 0x07, 0x42, 0x7F])
def test_unknown_critical_type_is_rejected(ftype: int) -> None:
    rejected(established_client(), bytes([ftype, 0, 0, 0]), f"0x{ftype:02x}")


@pytest.mark.parametrize("ftype", [0x80, 0xC3, 0xFF])
def test_ignorable_extension_is_skipped_in_any_state(ftype: int) -> None:
    gw = fresh("gateway")
    gw.receive_data(encode_frame(ftype, b"\x00" * 300), 1.0)
    assert gw.state is SessionState.AWAIT_HELLO
    assert gw.counters.drops == {"extension": 1}
    gw.receive_data(hello_frame(Hello().to_json()), 1.0)
    assert gw.peer_hello == Hello()


# ---- the transition table ----------------------------------------------------------


def _data(*packets: bytes, flags: int = 0) -> bytes:
    body = bytes([flags]) + b"".join(struct.pack(">I", len(p)) + p for p in packets)
    return encode_frame(FrameType.DATA, body)


@pytest.mark.parametrize(
    ("make", "frame", "fragment"),
    [
        (
            lambda: fresh("client"),
            _data(b"\x45"),
            "DATA frame from the gateway is not allowed in state await_config",
        ),
        (
            lambda: fresh("gateway"),
            _data(b"\x45"),
            "DATA frame from the client is not allowed in state await_hello",
        ),
        (lambda: fresh("gateway"), encode_frame(FrameType.PING, b""), "PING frame from the client"),
        (lambda: fresh("client"), hello_frame(Hello().to_json()), "HELLO frame from the gateway"),
        (
            established_gateway,
            hello_frame(Hello().to_json()),
            "HELLO frame from the client is not allowed in state established",
        ),
        (
            established_gateway,
            encode_frame(FrameType.CONFIG, b"{}"),
            "CONFIG frame from the client",
        ),
        (
            established_client,
            encode_frame(FrameType.CONFIG, b"{}"),
            "CONFIG frame from the gateway is not allowed in state established",
        ),
    ],
)
def test_peer_breaking_the_state_table_is_a_protocol_error(
    make: Callable[[], Session], frame: bytes, fragment: str
) -> None:
    rejected(make(), frame, fragment)


def test_second_hello_before_config_is_rejected() -> None:
    gw = fresh("gateway")
    gw.receive_data(hello_frame(Hello().to_json()), 0.5)
    gw.next_event()
    rejected(
        gw,
        hello_frame(Hello().to_json()),
        "HELLO frame from the client is not allowed in state await_config",
    )


# ---- payloads ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"[1, 2]", "expected a JSON object, got a list"),
        (b'{"offload": false, "software": "x"}', "missing field 'version'"),
        (b'{"version": 2, "offload": false, "software": "x"}', "unsupported version 2"),
        (b'{"version": "1", "offload": false, "software": "x"}', "'version' must be an integer"),
        (b'{"version": true, "offload": false, "software": "x"}', "'version' must be an integer"),
        (b'{"version": 1, "offload": "yes", "software": "x"}', "'offload' must be a boolean"),
        (b'{"version": 1, "offload": false, "software": 7}', "'software' must be a string"),
        (b'{"version": 1, "offload": false, "software": "a\\u0007"}', "printable"),
        (b'{"version": 1, "version": 1, "offload": false, "software": "x"}', "duplicate key"),
        (b'{"version": NaN, "offload": false, "software": "x"}', "NaN is not allowed"),
        (b"[" * 4000 + b"]" * 4000, "not valid UTF-8 JSON"),
    ],
)
def test_malformed_hello_is_rejected(body: bytes, fragment: str) -> None:
    rejected(fresh("gateway"), hello_frame(body), fragment)


def test_hello_ignores_unknown_extra_keys() -> None:
    gw = fresh("gateway")
    gw.receive_data(hello_frame(b'{"version":1,"offload":true,"software":"x","dns":[]}'), 0.1)
    assert gw.peer_hello == Hello(offload=True, software="x")


GOOD_CONFIG = {
    "address": '"10.8.0.5/24"',
    "gateway": '"10.8.0.1"',
    "routes": '["10.8.0.0/24"]',
    "mtu": "1400",
    "keepalive_interval": "10",
    "keepalive_timeout": "30.5",
    "offload": "false",
}


def config_body(**changes: str | None) -> bytes:
    fields = {**GOOD_CONFIG, **changes}
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items() if v is not None) + "}").encode()


def test_good_config_body_is_accepted() -> None:
    client = fresh("client")
    client.receive_data(encode_frame(FrameType.CONFIG, config_body()), 0.1)
    assert client.state is SessionState.ESTABLISHED
    assert client.tunnel_config is not None
    assert client.tunnel_config.keepalive_interval == 10.0
    assert client.tunnel_config.extra_addresses == ()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mtu": "100"}, "field 'mtu' must be in 576..65535, got 100"),
        ({"mtu": "true"}, "field 'mtu' must be an integer, got a boolean"),
        ({"mtu": "1400.0"}, "field 'mtu' must be an integer, got a number"),
        ({"mtu": None}, "missing field 'mtu'"),
        ({"gateway": None}, "missing field 'gateway'"),
        ({"address": '"10.8.0.5"'}, "field 'address' must be an address with a prefix length"),
        ({"address": '"10.8.0.500/24"'}, "field 'address' is not an address/prefix"),
        ({"gateway": '"gw"'}, "field 'gateway' is not an IP address"),
        ({"routes": '["10.8.0.1/24"]'}, "field 'routes' is not a network with host bits clear"),
        ({"routes": '"10.8.0.0/24"'}, "field 'routes' must be a list, got a string"),
        ({"keepalive_interval": "0"}, "field 'keepalive_interval' must be between 0 and 86400"),
        (
            {"keepalive_timeout": "5"},
            "field 'keepalive_timeout' (5s) must exceed 'keepalive_interval'",
        ),
        ({"keepalive_timeout": "1e999"}, "field 'keepalive_timeout' must be between"),
        ({"offload": "0"}, "field 'offload' must be a boolean, got an integer"),
        ({"extra_addresses": "[1]"}, "field 'extra_addresses' must be a string"),
    ],
)
def test_malformed_config_is_rejected(changes: dict[str, str | None], fragment: str) -> None:
    body = config_body(**changes)
    rejected(fresh("client"), encode_frame(FrameType.CONFIG, body), "CONFIG: " + fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "has no 16-bit code"),
        (b"\x00", "has no 16-bit code"),
        (b"\x00\x01\xc3\x28", "not valid UTF-8"),
    ],
)
def test_malformed_close_is_rejected(body: bytes, fragment: str) -> None:
    rejected(established_gateway(), encode_frame(FrameType.CLOSE, body), fragment)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "DATA frame is empty"),
        (b"\x00", "carries no packets"),
        (b"\x00" + struct.pack(">I", 0), "packet that is empty"),
        (b"\x00" + struct.pack(">I", 5) + b"abcd", "runs past the end"),
        (b"\x00" + struct.pack(">I", 1) + b"a" + b"\x00\x00", "ends inside a packet length"),
        (b"\x02" + struct.pack(">I", 1) + b"a", "reserved flag bits"),
    ],
)
def test_malformed_data_is_rejected(payload: bytes, fragment: str) -> None:
    rejected(established_client(), encode_frame(FrameType.DATA, payload), fragment)


def test_vnet_packet_shorter_than_its_header_is_rejected() -> None:
    client = established_client(offload=True)
    rejected(client, _data(b"\x00" * 9, flags=1), "shorter than its virtio_net_hdr")


def test_frames_before_a_bad_one_are_still_delivered() -> None:
    client = established_client()
    client.receive_data(_data(b"good") + b"\x07\x00\x00\x00", 1.0)
    first = client.next_event()
    assert first is not None and [bytes(p) for p in first.packets] == [b"good"]  # type: ignore[attr-defined]
    assert the_close(client).code == CloseCode.PROTOCOL_ERROR


# ---- fuzzing -----------------------------------------------------------------------


def _check_outcome(session: Session) -> None:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    closes = [e for e in events if isinstance(e, SessionClosed)]
    assert len(closes) <= 1
    if session.state is SessionState.CLOSED:
        assert len(closes) == 1
        closed = closes[0]
        # Random bytes may spell a valid CLOSE from the peer; anything else is our verdict.
        assert closed.by_peer or closed.code in PROTOCOL_CLOSES, closed
        assert "\n" not in closed.message
    else:
        assert not closes


MAKERS: dict[str, Callable[[], Session]] = {
    "fresh gateway": lambda: fresh("gateway"),
    "fresh client": lambda: fresh("client"),
    "established gateway": established_gateway,
    "established client": lambda: established_client(offload=True),
}


@settings(max_examples=200, deadline=None)
@given(
    which=st.sampled_from(sorted(MAKERS)),
    chunks=st.lists(st.binary(max_size=600), min_size=1, max_size=6),
)
def test_random_bytes_never_raise(which: str, chunks: list[bytes]) -> None:
    session = MAKERS[which]()
    for chunk in chunks:
        session.receive_data(chunk, 1.0)
    _check_outcome(session)


@settings(max_examples=200, deadline=None)
@given(
    which=st.sampled_from(sorted(MAKERS)),
    frames=st.lists(
        st.tuples(st.sampled_from([*range(1, 8), 0x80, 0xFE]), st.binary(max_size=80)),
        min_size=1,
        max_size=5,
    ),
)
def test_well_framed_random_payloads_never_raise(
    which: str, frames: list[tuple[int, bytes]]
) -> None:
    session = MAKERS[which]()
    session.receive_data(b"".join(encode_frame(t, body) for t, body in frames), 1.0)
    _check_outcome(session)


# ---- purity ------------------------------------------------------------------------


def test_proto_imports_nothing_else_from_vpnd() -> None:
    root = Path(__file__).resolve().parents[1] / "vpnd" / "proto"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vpnd"):
                assert node.module.startswith("vpnd.proto"), f"{path.name} imports {node.module}"
