"""Wire format of the in-tunnel renewal frames (extension types 0x90-0x93).

They sit in the ignorable extension range, so a peer that predates renewal skips
them; a peer that knows them parses them strictly (a bad one is a protocol error)::

    RENEW_REQUEST 0x90  client -> gateway  u32 request id + CSR (DER, <= 16 KiB)
    RENEW_ISSUED  0x91  gateway -> client  u32 request id + PEM (leaf, then chain; <= 16 KiB)
    RENEW_REFUSED 0x92  gateway -> client  u32 request id + u16 code + UTF-8 message (<= 512 B)
    RENEW_HINT    0x93  gateway -> client  u8 flags (bit 0 = quarantined) + UTF-8 reason (<= 512 B)

Their receive limits are fixed here, independent of ``max_frame``.
"""

from __future__ import annotations

import enum
import struct

from vpnd.proto import frames
from vpnd.proto.close import printable
from vpnd.proto.errors import LocalProtocolError, RemoteProtocolError
from vpnd.proto.frames import truncate_utf8

CSR_MAX = frames.RENEW_CSR_MAX
PEM_MAX = frames.RENEW_PEM_MAX
TEXT_MAX = frames.RENEW_TEXT_MAX
REQUEST_ID_MAX = 0xFFFFFFFF

HINT_QUARANTINED = 0x01

_ID = struct.Struct(">I")
_REFUSAL = struct.Struct(">IH")
_FLAGS = struct.Struct(">B")
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


class RenewalFrame(enum.IntEnum):
    """The renewal extension frame types."""

    RENEW_REQUEST = frames.RENEW_REQUEST
    RENEW_ISSUED = frames.RENEW_ISSUED
    RENEW_REFUSED = frames.RENEW_REFUSED
    RENEW_HINT = frames.RENEW_HINT


class RefusalCode(enum.IntEnum):
    """Why a gateway refused a renewal (u16 on the wire; never renumber).

    A code this release does not know stays a plain int.
    """

    REFUSED = 1
    """Generic: the gateway's policy refused it (see the message)."""
    NOT_ENABLED = 2
    """Renewal is off on this gateway: ask the admin."""
    BAD_CSR = 3
    """The CSR was unreadable, badly signed or names someone else."""
    UNKNOWN_IDENTITY = 4
    """No inventory record for this peer."""
    REVOKED = 5
    """This certificate (or identity) is revoked or superseded."""
    BUSY = 6
    """Try again later (rate limit, issuer unavailable)."""
    INTERNAL = 7
    """The gateway failed to sign (its log says why)."""
    TIMEOUT = 0xFFFF
    """Local only, never sent: no answer arrived in time."""


def _check_id(request_id: int) -> None:
    if isinstance(request_id, bool) or not isinstance(request_id, int):
        raise LocalProtocolError(f"renewal request id {request_id!r} is not an integer")
    if not 1 <= request_id <= REQUEST_ID_MAX:
        raise LocalProtocolError(f"renewal request id {request_id} is not in 1..{REQUEST_ID_MAX}")


def _text(payload: memoryview, what: str) -> str:
    try:
        return printable(bytes(payload).decode("utf-8"))
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} text is not valid UTF-8") from None


def _request_id(payload: memoryview, what: str) -> int:
    if len(payload) < _ID.size:
        raise RemoteProtocolError(f"{what} frame of {len(payload)} bytes has no request id")
    (request_id,) = _ID.unpack_from(payload, 0)
    if request_id == 0:
        raise RemoteProtocolError(f"{what} frame has request id 0")
    return int(request_id)


def encode_request(request_id: int, csr_der: bytes) -> bytes:
    _check_id(request_id)
    if not isinstance(csr_der, bytes | bytearray | memoryview):
        raise LocalProtocolError("a renewal CSR must be DER bytes")
    if not 0 < len(csr_der) <= CSR_MAX or csr_der[0] != 0x30:
        raise LocalProtocolError(f"a renewal CSR must be 1..{CSR_MAX} bytes of DER")
    return _ID.pack(request_id) + bytes(csr_der)


def decode_request(payload: memoryview) -> tuple[int, bytes]:
    request_id = _request_id(payload, "RENEW_REQUEST")
    csr = bytes(payload[_ID.size :])
    if not csr:
        raise RemoteProtocolError("RENEW_REQUEST frame carries no CSR")
    if csr[0] != 0x30:
        raise RemoteProtocolError("RENEW_REQUEST CSR is not DER (no SEQUENCE tag)")
    return request_id, csr


def _check_pem(pem: bytes, error: type[Exception]) -> None:
    try:
        pem.decode("ascii")
    except UnicodeDecodeError:
        raise error("renewed certificate PEM is not ASCII") from None
    if not pem.lstrip().startswith(_PEM_BEGIN):
        raise error("renewed certificate PEM does not start with a certificate")


def encode_issued(request_id: int, pem: bytes) -> bytes:
    _check_id(request_id)
    if not isinstance(pem, bytes) or not 0 < len(pem) <= PEM_MAX:
        raise LocalProtocolError(f"a renewed certificate must be 1..{PEM_MAX} bytes of PEM")
    _check_pem(pem, LocalProtocolError)
    return _ID.pack(request_id) + pem


def decode_issued(payload: memoryview) -> tuple[int, bytes]:
    request_id = _request_id(payload, "RENEW_ISSUED")
    pem = bytes(payload[_ID.size :])
    if not pem:
        raise RemoteProtocolError("RENEW_ISSUED frame carries no certificate")
    _check_pem(pem, RemoteProtocolError)
    return request_id, pem


def encode_refused(request_id: int, code: int, message: str) -> bytes:
    _check_id(request_id)
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFFFF:
        raise LocalProtocolError(f"refusal code {code!r} is not a 16-bit integer")
    return _REFUSAL.pack(request_id, code) + truncate_utf8(message, TEXT_MAX)


def refusal_code(value: int) -> int:
    """The ``RefusalCode`` member for ``value``, or the plain int if unknown."""
    try:
        return RefusalCode(value)
    except ValueError:
        return value


def decode_refused(payload: memoryview) -> tuple[int, int, str]:
    request_id = _request_id(payload, "RENEW_REFUSED")
    if len(payload) < _REFUSAL.size:
        raise RemoteProtocolError("RENEW_REFUSED frame has no 16-bit code")
    _, code = _REFUSAL.unpack_from(payload, 0)
    return request_id, refusal_code(code), _text(payload[_REFUSAL.size :], "RENEW_REFUSED")


def encode_hint(reason: str, *, quarantined: bool) -> bytes:
    return _FLAGS.pack(HINT_QUARANTINED if quarantined else 0) + truncate_utf8(reason, TEXT_MAX)


def decode_hint(payload: memoryview) -> tuple[str, bool]:
    if len(payload) < _FLAGS.size:
        raise RemoteProtocolError("RENEW_HINT frame is empty (no flags byte)")
    flags = payload[0]
    if flags & ~HINT_QUARANTINED:
        raise RemoteProtocolError(f"RENEW_HINT frame has reserved flag bits set (0x{flags:02x})")
    return _text(payload[_FLAGS.size :], "RENEW_HINT"), bool(flags & HINT_QUARANTINED)
