"""The enrollment frames: round trips, chunking, limits and wrong-direction frames."""

from __future__ import annotations

import pytest

from vpnd.proto.enrollment import (
    ENROLL_REQUEST,
    REQUEST_MAX,
    CaBundle,
    EnrollClosed,
    EnrollIssued,
    EnrollmentReader,
    EnrollRefusal,
    EnrollRefused,
    EnrollRequest,
    encode_ca,
    encode_close,
    encode_issued,
    encode_refused,
    encode_request,
    refusal_name,
)
from vpnd.proto.errors import LocalProtocolError, RemoteProtocolError
from vpnd.proto.frames import FrameType, encode_frame

REQ = EnrollRequest("0123456789abcdef", "s" * 43, b"\x30\x82csr-der")


@pytest.mark.parametrize(
    ("invite_id", "secret"), [("abc\ndef", "s"), ("ABCD", "s"), ("ab", "s s"), ("ab", "s\x00")]
)
def test_request_fields_limited_to_token_characters(invite_id: str, secret: str) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed"):
        EnrollmentReader("gateway").feed(encode_request(EnrollRequest(invite_id, secret, b"x")))


def test_request_round_trip_in_single_bytes() -> None:
    reader = EnrollmentReader("gateway")
    got = []
    for b in encode_request(REQ):
        got += reader.feed(bytes([b]))
    assert got == [REQ]
    assert reader.buffered == 0


def test_client_side_messages() -> None:
    issued = EnrollIssued("alice", "1f", b"CERT", b"CA", "mode: client\n")
    wire = (
        encode_ca(b"PEM")
        + encode_issued(issued)
        + encode_refused(EnrollRefusal.USED, "used")
        + encode_frame(FrameType.CLOSE, encode_close(9, "bye"))
    )
    msgs = EnrollmentReader("client").feed(wire)
    assert msgs == [
        CaBundle(b"PEM"),
        issued,
        EnrollRefused(EnrollRefusal.USED, "used"),
        EnrollClosed(9, "bye"),
    ]


def test_secret_not_in_repr() -> None:
    assert REQ.secret not in repr(REQ)


@pytest.mark.parametrize(
    ("role", "frame"),
    [
        ("gateway", encode_ca(b"x")),
        ("gateway", encode_frame(FrameType.HELLO, b"{}")),
        ("gateway", encode_frame(FrameType.DATA, b"\x00")),
        ("client", encode_request(REQ)),
        ("client", encode_frame(0x90, b"renew")),
    ],
)
def test_wrong_frames_refused(role: str, frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        EnrollmentReader(role).feed(frame)


def test_oversized_request_refused_from_the_header() -> None:
    header_only = encode_frame(ENROLL_REQUEST, b"\x00" * (REQUEST_MAX + 1))[:4]
    with pytest.raises(RemoteProtocolError, match="limit is 16384"):
        EnrollmentReader("gateway").feed(header_only + b"\x01")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x02\x01a\x01bX",
        b"\x01\x00",
        b"\x01\x05ab",
        b"\x01\x01a",
        b"\x01\x01a\x01b",
        b"\x01\x01\xff\x01bX",
    ],
)
def test_bad_requests(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        EnrollmentReader("gateway").feed(encode_frame(ENROLL_REQUEST, payload))


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"name": 1}', b'{"name":"a"}'])
def test_bad_issued(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        EnrollmentReader("client").feed(encode_frame(0xA1, body))


def test_encode_refuses_oversized() -> None:
    with pytest.raises(LocalProtocolError):
        encode_request(EnrollRequest("a", "b", b"x" * REQUEST_MAX))
    with pytest.raises(LocalProtocolError):
        encode_request(EnrollRequest("", "b", b"x"))


def test_refusal_names() -> None:
    assert refusal_name(2) == "used"
    assert refusal_name(99) == "code 99"
