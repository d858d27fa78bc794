"""The enrollment exchange: a certless TLS connection trading an invite for a certificate.

Sans-I/O: encoders, and a reader that turns received bytes into messages. It runs on its
own connection (never inside a ``Session``): the gateway routes a TLS connection
without a client certificate here, and nothing else is possible on it.

Frames (the usual 4-byte header, types in the extension range)::

    0xA3 ENROLL_CA       gateway -> client, first: PEM of the trust anchors (<= 64 KiB).
                         The client checks that one of them has the token's pin.
    0xA0 ENROLL_REQUEST  client -> gateway: u8 version (1), u8 n + invite id (ASCII),
                         u8 n + secret (ASCII), then the CSR (DER) to the end (<= 16 KiB).
    0xA1 ENROLL_ISSUED   gateway -> client: UTF-8 JSON {"name", "serial" (hex),
                         "cert" (PEM: leaf, then the issuer chain), "ca" (PEM bundle),
                         "client_yaml"} (<= 64 KiB).
    0xA2 ENROLL_REFUSED  gateway -> client: u16 code (``EnrollRefusal``) + UTF-8 message.
    0x06 CLOSE           either way, as in the tunnel (a gateway refusing the connection).

Anything else, or a frame over its limit, is a protocol error and ends the connection.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import dataclass, field

from vpnd.proto.errors import LocalProtocolError, RemoteProtocolError
from vpnd.proto.frames import (
    CLOSE_CODE,
    CLOSE_MESSAGE_MAX,
    FrameDecoder,
    FrameType,
    decode_close,
    encode_close,
    encode_frame,
    truncate_utf8,
)

ENROLL_REQUEST = 0xA0
ENROLL_ISSUED = 0xA1
ENROLL_REFUSED = 0xA2
ENROLL_CA = 0xA3

REQUEST_VERSION = 1
REQUEST_MAX = 16 * 1024
BUNDLE_MAX = 64 * 1024
_U16 = struct.Struct(">H")
_ID_RE = re.compile(r"[0-9a-f]{1,64}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
_ISSUED_KEYS = frozenset({"name", "serial", "cert", "ca", "client_yaml"})


class EnrollRefusal(enum.IntEnum):
    """Why the gateway refused an enrollment (stable wire codes)."""

    INVALID = 1
    """Unknown invite id, or a secret that does not match: tampered, revoked or foreign."""
    USED = 2
    EXPIRED = 3
    BAD_CSR = 4
    RATE_LIMITED = 5
    BAD_REQUEST = 6
    UNAVAILABLE = 7
    """The gateway cannot sign right now (issuer or inventory trouble): try later."""


REFUSAL_TEXT = {
    EnrollRefusal.INVALID: "the gateway does not know this invite (tampered, cancelled, "
    "or for another gateway): ask the admin for a new one",
    EnrollRefusal.USED: "this invite was already used: an invite works once; ask the admin "
    "for a new one",
    EnrollRefusal.EXPIRED: "this invite has expired: ask the admin for a new one",
    EnrollRefusal.BAD_CSR: "the gateway refused the certificate request",
    EnrollRefusal.RATE_LIMITED: "the gateway is busy with other enrollments: try again in "
    "a few seconds",
    EnrollRefusal.BAD_REQUEST: "the gateway could not read the enrollment request",
    EnrollRefusal.UNAVAILABLE: "the gateway cannot issue certificates right now: try later "
    "or tell the admin",
}


def refusal_name(code: int) -> str:
    try:
        return EnrollRefusal(code).name.lower()
    except ValueError:
        return f"code {code}"


@dataclass(frozen=True, slots=True)
class CaBundle:
    pem: bytes


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    invite_id: str
    secret: str = field(repr=False)
    csr_der: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EnrollIssued:
    name: str
    serial: str
    cert_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    client_yaml: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class EnrollRefused:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class EnrollClosed:
    """A CLOSE frame (the gateway refused the connection before enrollment)."""

    code: int
    message: str


EnrollMessage = CaBundle | EnrollRequest | EnrollIssued | EnrollRefused | EnrollClosed


# --- encoding -------------------------------------------------------------------------


def encode_ca(pem: bytes) -> bytes:
    if len(pem) > BUNDLE_MAX:
        raise LocalProtocolError(f"CA bundle of {len(pem)} bytes exceeds {BUNDLE_MAX}")
    return encode_frame(ENROLL_CA, pem)


def encode_request(req: EnrollRequest) -> bytes:
    inv, sec = req.invite_id.encode("ascii"), req.secret.encode("ascii")
    if not (0 < len(inv) < 256 and 0 < len(sec) < 256):
        raise LocalProtocolError("invite id and secret must be 1-255 ASCII bytes")
    payload = bytes([REQUEST_VERSION, len(inv)]) + inv + bytes([len(sec)]) + sec + req.csr_der
    if len(payload) > REQUEST_MAX:
        raise LocalProtocolError(f"enrollment request of {len(payload)} bytes is too large")
    return encode_frame(ENROLL_REQUEST, payload)


def encode_issued(msg: EnrollIssued) -> bytes:
    body = json.dumps(
        {
            "name": msg.name,
            "serial": msg.serial,
            "cert": msg.cert_pem.decode("ascii"),
            "ca": msg.ca_pem.decode("ascii"),
            "client_yaml": msg.client_yaml,
        }
    ).encode()
    if len(body) > BUNDLE_MAX:
        raise LocalProtocolError(f"enrollment answer of {len(body)} bytes is too large")
    return encode_frame(ENROLL_ISSUED, body)


def encode_refused(code: EnrollRefusal, message: str) -> bytes:
    return encode_frame(
        ENROLL_REFUSED, _U16.pack(int(code)) + truncate_utf8(message, CLOSE_MESSAGE_MAX)
    )


# --- decoding -------------------------------------------------------------------------


class EnrollmentReader:
    """Received bytes -> messages, for one side (``role`` "client" or "gateway")."""

    def __init__(self, role: str) -> None:
        if role not in ("client", "gateway"):
            raise ValueError(f"role must be client or gateway, not {role!r}")
        self._role = role
        if role == "gateway":
            self._allowed = {ENROLL_REQUEST: REQUEST_MAX, FrameType.CLOSE: _CLOSE_MAX}
        else:
            self._allowed = {
                ENROLL_CA: BUNDLE_MAX,
                ENROLL_ISSUED: BUNDLE_MAX,
                ENROLL_REFUSED: _CLOSE_MAX,
                FrameType.CLOSE: _CLOSE_MAX,
            }
        self._decoder = _LimitedDecoder(self._allowed)

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def feed(self, data: bytes) -> list[EnrollMessage]:
        """Every complete message in the bytes so far; ``RemoteProtocolError`` on junk."""
        self._decoder.feed(data)
        out: list[EnrollMessage] = []
        while (frame := self._decoder.next_frame()) is not None:
            ftype, payload = frame
            out.append(_decode(ftype, bytes(payload)))
        return out


_CLOSE_MAX = CLOSE_CODE.size + CLOSE_MESSAGE_MAX


class _LimitedDecoder(FrameDecoder):
    """A frame decoder taking only ``allowed`` types, each up to its own length: a
    header declaring more is refused before any of its payload is buffered."""

    def __init__(self, allowed: dict[int, int]) -> None:
        super().__init__(max_frame=BUNDLE_MAX)
        self._limits = [allowed.get(t, -1) for t in range(256)]


def _decode(ftype: int, payload: bytes) -> EnrollMessage:
    if ftype == ENROLL_REQUEST:
        return decode_request(payload)
    if ftype == ENROLL_CA:
        return CaBundle(payload)
    if ftype == ENROLL_ISSUED:
        return decode_issued(payload)
    if ftype == ENROLL_REFUSED:
        code, message = decode_close(memoryview(payload))
        return EnrollRefused(int(code), message)
    code, message = decode_close(memoryview(payload))
    return EnrollClosed(int(code), message)


def decode_request(payload: bytes) -> EnrollRequest:
    if len(payload) < 3 or payload[0] != REQUEST_VERSION:
        raise RemoteProtocolError("enrollment request has an unknown version or is empty")
    pos = 1
    fields: list[str] = []
    for what in ("invite id", "secret"):
        n = payload[pos]
        pos += 1
        raw = payload[pos : pos + n]
        if n == 0 or len(raw) != n:
            raise RemoteProtocolError(f"enrollment request: {what} is missing or cut")
        try:
            fields.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"enrollment request: {what} is not ASCII") from None
        pos += n
        if pos >= len(payload) and what == "invite id":
            raise RemoteProtocolError("enrollment request: secret is missing")
    csr = payload[pos:]
    if not csr:
        raise RemoteProtocolError("enrollment request carries no CSR")
    # Only the characters tokens are made of: the id goes into the audit log.
    if not _ID_RE.fullmatch(fields[0]) or not _SECRET_RE.fullmatch(fields[1]):
        raise RemoteProtocolError("enrollment request: malformed invite id or secret")
    return EnrollRequest(fields[0], fields[1], csr)


def decode_issued(payload: bytes) -> EnrollIssued:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise RemoteProtocolError("enrollment answer is not UTF-8 JSON") from None
    if not isinstance(data, dict) or set(data) != _ISSUED_KEYS:
        raise RemoteProtocolError("enrollment answer has unexpected fields")
    if not all(isinstance(v, str) for v in data.values()):
        raise RemoteProtocolError("enrollment answer has non-text fields")
    try:
        cert, ca = data["cert"].encode("ascii"), data["ca"].encode("ascii")
    except UnicodeEncodeError:
        raise RemoteProtocolError("enrollment answer: PEM is not ASCII") from None
    return EnrollIssued(data["name"], data["serial"], cert, ca, data["client_yaml"])


__all__ = [
    "ENROLL_CA",
    "ENROLL_ISSUED",
    "ENROLL_REFUSED",
    "ENROLL_REQUEST",
    "REFUSAL_TEXT",
    "CaBundle",
    "EnrollClosed",
    "EnrollIssued",
    "EnrollMessage",
    "EnrollRefusal",
    "EnrollRefused",
    "EnrollRequest",
    "EnrollmentReader",
    "encode_ca",
    "encode_close",
    "encode_issued",
    "encode_refused",
    "encode_request",
    "refusal_name",
]
