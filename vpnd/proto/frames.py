"""Tunnel frame wire format: encoding, and a chunk-tolerant decoder.

The tunnel runs inside an authenticated TLS 1.3 stream; this module sees only the
decrypted byte stream.

Frame
    4-byte header, then ``length`` bytes of payload::

        +--------+--------------------------+-----------------+
        | type u8| length u24 (big-endian)  | payload ...     |
        +--------+--------------------------+-----------------+

    The format allows payloads up to 16 MiB - 1; a receiver enforces its own, smaller
    ``max_frame`` (default 262144) and rejects a larger declared length as soon as
    the header arrives, without buffering the payload.

Types
    ``0x01 HELLO``  client -> gateway, UTF-8 JSON object (<= 8 KiB):
                    ``{"version": 1, "offload": bool, "software": "vpnd/0.1.0"}``
    ``0x02 CONFIG`` gateway -> client, UTF-8 JSON object (<= 8 KiB), see
                    ``vpnd.proto.messages.TunnelConfig``
    ``0x03 DATA``   ``u8 flags`` (bit 0 = VNET: every packet starts with a 10-byte
                    virtio_net_hdr; other bits must be zero), then one or more
                    packets, each ``u32 length`` (big-endian) + bytes. Zero packets,
                    a zero-length packet (or, with VNET, one shorter than the header)
                    and a length running past the payload are protocol errors.
    ``0x04 PING``   <= 64 opaque bytes, echoed back in PONG
    ``0x05 PONG``   the PING payload it answers
    ``0x06 CLOSE``  ``u16 code`` (see ``CloseCode``) + UTF-8 message <= 512 bytes
    ``0x80-0xFF``   ignorable extensions: a receiver that does not know one skips it
                    (room for a UDP data-channel handshake, ...). In-tunnel renewal
                    uses 0x90-0x93, see ``vpnd.proto.renewal_frames``; a receiver that
                    knows them parses them strictly, with the fixed limits below.

    Any other type below 0x80 is a protocol error.
"""

from __future__ import annotations

import enum
import struct

from vpnd.proto.close import CloseCode, close_code, printable
from vpnd.proto.errors import LocalProtocolError, RemoteProtocolError

HEADER_SIZE = 4
FORMAT_MAX_LENGTH = 0xFFFFFF  # u24
DEFAULT_MAX_FRAME = 262144
JSON_MAX = 8192
PING_MAX = 64
CLOSE_MESSAGE_MAX = 512
EXTENSION_MIN = 0x80

# In-tunnel renewal (vpnd.proto.renewal_frames): types and fixed payload limits.
RENEW_REQUEST = 0x90
RENEW_ISSUED = 0x91
RENEW_REFUSED = 0x92
RENEW_HINT = 0x93
RENEW_CSR_MAX = 16384
RENEW_PEM_MAX = 16384
RENEW_TEXT_MAX = 512
_RENEW_NAMES = {
    RENEW_REQUEST: "RENEW_REQUEST",
    RENEW_ISSUED: "RENEW_ISSUED",
    RENEW_REFUSED: "RENEW_REFUSED",
    RENEW_HINT: "RENEW_HINT",
}

FLAG_VNET = 0x01
VNET_HDR_LEN = 10
DATA_FLAGS_SIZE = 1
PACKET_PREFIX_SIZE = 4
# Bytes a lone packet costs inside a DATA payload on top of its own length.
DATA_OVERHEAD = DATA_FLAGS_SIZE + PACKET_PREFIX_SIZE

HEADER = struct.Struct(">I")
U32 = struct.Struct(">I")
CLOSE_CODE = struct.Struct(">H")


class FrameType(enum.IntEnum):
    """Frame types below 0x80 (every receiver must know these)."""

    HELLO = 0x01
    CONFIG = 0x02
    DATA = 0x03
    PING = 0x04
    PONG = 0x05
    CLOSE = 0x06


def frame_name(ftype: int) -> str:
    """A readable name for a frame type, for error messages."""
    try:
        return FrameType(ftype).name
    except ValueError:
        return _RENEW_NAMES.get(ftype, f"type 0x{ftype:02x}")


def encode_header(ftype: int, length: int) -> bytes:
    """The 4-byte header for a frame of ``length`` payload bytes."""
    if not 0 <= ftype <= 0xFF:
        raise LocalProtocolError(f"frame type {ftype} does not fit in a byte")
    if not 0 <= length <= FORMAT_MAX_LENGTH:
        raise LocalProtocolError(f"frame payload of {length} bytes exceeds the 16 MiB format limit")
    return HEADER.pack((ftype << 24) | length)


def encode_frame(ftype: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One complete frame."""
    return encode_header(ftype, len(payload)) + bytes(payload)


def receive_limits(max_frame: int) -> list[int]:
    """Per-type maximum payload length a receiver accepts; -1 marks an unknown type."""
    limits = [-1] * 256
    limits[FrameType.HELLO] = min(JSON_MAX, max_frame)
    limits[FrameType.CONFIG] = min(JSON_MAX, max_frame)
    limits[FrameType.DATA] = max_frame
    limits[FrameType.PING] = PING_MAX
    limits[FrameType.PONG] = PING_MAX
    limits[FrameType.CLOSE] = CLOSE_CODE.size + CLOSE_MESSAGE_MAX
    for ftype in range(EXTENSION_MIN, 256):
        limits[ftype] = max_frame
    limits[RENEW_REQUEST] = 4 + RENEW_CSR_MAX  # u32 id + CSR DER
    limits[RENEW_ISSUED] = 4 + RENEW_PEM_MAX  # u32 id + PEM
    limits[RENEW_REFUSED] = 4 + 2 + RENEW_TEXT_MAX  # u32 id + u16 code + text
    limits[RENEW_HINT] = 1 + RENEW_TEXT_MAX  # u8 flags + text
    return limits


class FrameDecoder:
    """Splits a byte stream, delivered in chunks of any size, into frames.

    Call ``feed()`` with each chunk, then ``next_frame()`` until it returns None.
    Payloads are read-only memoryviews over immutable bytes, so consumers may keep
    them. A whole ``bytes`` chunk that arrives on an empty buffer is sliced without
    copying; anything else is buffered in a bytearray read at an offset (one copy
    in, one copy out per frame, never a repeated copy of the whole buffer).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._limits = receive_limits(max_frame)
        self._buf = bytearray()
        self._pos = 0
        self._chunk: bytes = b""
        self._cpos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos + len(self._chunk) - self._cpos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received stream bytes."""
        if not data:
            return
        if self._cpos < len(self._chunk):
            self._spill()
        if self._pos:
            # Deleting a bytearray's prefix only moves its start pointer (CPython).
            del self._buf[: self._pos]
            self._pos = 0
        if not self._buf and type(data) is bytes:
            self._chunk = data
            self._cpos = 0
        else:
            self._buf += data

    def next_frame(self) -> tuple[int, memoryview] | None:
        """The next complete frame as (type, payload), or None if more bytes are needed.

        Raises ``RemoteProtocolError`` as soon as a header is bad, even if its payload
        has not arrived yet.
        """
        chunk = self._chunk
        if self._cpos < len(chunk):
            pos = self._cpos
            if len(chunk) - pos >= HEADER_SIZE:
                ftype, length = self._check_header(chunk, pos)
                end = pos + HEADER_SIZE + length
                if end <= len(chunk):
                    if end == len(chunk):
                        # Drop our reference; the payload views keep what they need.
                        self._chunk = b""
                        self._cpos = 0
                    else:
                        self._cpos = end
                    return ftype, memoryview(chunk)[pos + HEADER_SIZE : end]
            self._spill()
            return None
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        ftype, length = self._check_header(buf, pos)
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            return None
        with memoryview(buf) as view:
            payload = view[pos + HEADER_SIZE : end].tobytes()
        self._pos = end
        return ftype, memoryview(payload)

    def _spill(self) -> None:
        # The zero-copy chunk ends in a partial frame: keep the remainder.
        self._buf += memoryview(self._chunk)[self._cpos :]
        self._chunk = b""
        self._cpos = 0

    def _check_header(self, src: bytes | bytearray, pos: int) -> tuple[int, int]:
        (word,) = HEADER.unpack_from(src, pos)
        ftype = word >> 24
        length = word & FORMAT_MAX_LENGTH
        limit = self._limits[ftype]
        if limit < 0:
            raise RemoteProtocolError(f"unknown critical frame type 0x{ftype:02x}")
        if length > limit:
            raise RemoteProtocolError(
                f"{frame_name(ftype)} frame declares {length} bytes, limit is {limit}",
                CloseCode.FRAME_TOO_LARGE,
            )
        return ftype, length


def decode_data(payload: memoryview) -> tuple[bool, list[memoryview | bytes]]:
    """Split a DATA payload into (vnet, packets); packets are slices, not copies."""
    size = len(payload)
    if size < DATA_FLAGS_SIZE:
        raise RemoteProtocolError("DATA frame is empty (no flags byte)")
    flags = payload[0]
    if flags & ~FLAG_VNET:
        raise RemoteProtocolError(f"DATA frame has reserved flag bits set (0x{flags:02x})")
    vnet = bool(flags)
    shortest = VNET_HDR_LEN if vnet else 1
    packets: list[memoryview | bytes] = []
    append = packets.append
    unpack = U32.unpack_from
    pos = DATA_FLAGS_SIZE
    while pos < size:
        if size - pos < PACKET_PREFIX_SIZE:
            raise RemoteProtocolError("DATA frame ends inside a packet length")
        (plen,) = unpack(payload, pos)
        pos += PACKET_PREFIX_SIZE
        end = pos + plen
        if plen < shortest:
            what = "shorter than its virtio_net_hdr" if vnet else "empty"
            raise RemoteProtocolError(f"DATA frame carries a packet that is {what}")
        if end > size:
            raise RemoteProtocolError(
                f"DATA packet length {plen} runs past the end of the frame payload"
            )
        append(payload[pos:end])
        pos = end
    if not packets:
        raise RemoteProtocolError("DATA frame carries no packets")
    return vnet, packets


def truncate_utf8(text: str, limit: int) -> bytes:
    """UTF-8 encode ``text``, cut to at most ``limit`` bytes on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_close(code: int, message: str) -> bytes:
    """A CLOSE payload; an over-long message is truncated, not refused."""
    if not 0 <= code <= 0xFFFF:
        raise LocalProtocolError(f"close code {code} does not fit in 16 bits")
    return CLOSE_CODE.pack(code) + truncate_utf8(message, CLOSE_MESSAGE_MAX)


def decode_close(payload: memoryview) -> tuple[int, str]:
    """(code, message) from a CLOSE payload; unknown codes stay plain ints."""
    if len(payload) < CLOSE_CODE.size:
        raise RemoteProtocolError(f"CLOSE frame of {len(payload)} bytes has no 16-bit code")
    (code,) = CLOSE_CODE.unpack_from(payload, 0)
    try:
        message = bytes(payload[CLOSE_CODE.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("CLOSE message is not valid UTF-8") from None
    return close_code(code), printable(message)
