"""The sans-I/O tunnel session: bytes and ``now`` in; bytes, events and a timer out.

Driven like aioquic's ``QuicConnection``: the owner feeds decrypted stream bytes to
``receive_data()``, writes ``data_to_send()`` to the TLS stream, dispatches
``next_event()`` until None, and calls ``handle_timer()`` when ``get_timer()`` says.
Nothing here reads a clock or touches a socket.

Two clocks, never mixed: every ``now`` is *monotonic* (the event loop's time), so
keepalives, dead-peer detection and setup deadlines ignore wall-clock steps. Wall
time (Unix seconds) enters only as ``wall``, for certificate validity: ``set_expiry``
takes notAfter, and each ``handle_timer(now, wall=...)`` re-anchors it on the
monotonic clock, so the cut follows the wall clock (a step is seen at the next timer
tick) while nothing else does.

Keepalive: a PING goes out when nothing was *sent* for ``keepalive_interval``; the
peer is declared dead when nothing was *received* for ``keepalive_timeout``. Until
the tunnel is established the ``SessionConfig`` values apply; from then on both ends
use the values in the pushed ``TunnelConfig``, so they cannot disagree.
"""

from __future__ import annotations

import enum
import math
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from vpnd.proto.close import CloseCode
from vpnd.proto.errors import LocalProtocolError, RemoteProtocolError
from vpnd.proto.events import (
    ConfigReceived,
    Event,
    HelloReceived,
    PacketsReceived,
    RenewalIssued,
    RenewalRefused,
    RenewalRequested,
    RenewHint,
    SessionClosed,
)
from vpnd.proto.frames import (
    DATA_OVERHEAD,
    DEFAULT_MAX_FRAME,
    EXTENSION_MIN,
    FLAG_VNET,
    FORMAT_MAX_LENGTH,
    HEADER,
    HEADER_SIZE,
    JSON_MAX,
    PACKET_PREFIX_SIZE,
    U32,
    VNET_HDR_LEN,
    FrameDecoder,
    FrameType,
    decode_close,
    decode_data,
    encode_close,
)
from vpnd.proto.messages import SOFTWARE, Hello, TunnelConfig
from vpnd.proto.renewal_frames import (
    RefusalCode,
    RenewalFrame,
    decode_hint,
    decode_issued,
    decode_refused,
    decode_request,
    encode_hint,
    encode_issued,
    encode_refused,
    encode_request,
)

Role = Literal["gateway", "client"]

# DATA header plus its flags byte, written in one go.
_DATA_START = struct.Struct(">IB")
_PING = struct.Struct(">Q")


class SessionState(enum.Enum):
    """Where a session is in its life."""

    AWAIT_HELLO = "await_hello"  # gateway: waiting for the client's HELLO
    AWAIT_CONFIG = "await_config"  # client: waiting for CONFIG; gateway: owner must send it
    ESTABLISHED = "established"
    QUARANTINED = "quarantined"  # expired certificate: only renewal, no CONFIG, no packets
    CLOSED = "closed"


_S = SessionState
_F = FrameType

# The spec: role -> state -> frame received from the peer -> next state. Anything
# missing is the peer's protocol error. Ignorable extensions (>= 0x80) are allowed
# in every open state.
_RECEIVE: dict[Role, dict[SessionState, dict[FrameType, SessionState]]] = {
    "gateway": {
        _S.AWAIT_HELLO: {_F.HELLO: _S.AWAIT_CONFIG, _F.CLOSE: _S.CLOSED},
        _S.AWAIT_CONFIG: {_F.PING: _S.AWAIT_CONFIG, _F.PONG: _S.AWAIT_CONFIG, _F.CLOSE: _S.CLOSED},
        _S.ESTABLISHED: {
            _F.DATA: _S.ESTABLISHED,
            _F.PING: _S.ESTABLISHED,
            _F.PONG: _S.ESTABLISHED,
            _F.CLOSE: _S.CLOSED,
        },
        _S.QUARANTINED: {_F.PING: _S.QUARANTINED, _F.PONG: _S.QUARANTINED, _F.CLOSE: _S.CLOSED},
    },
    "client": {
        _S.AWAIT_CONFIG: {
            _F.CONFIG: _S.ESTABLISHED,
            _F.PING: _S.AWAIT_CONFIG,
            _F.PONG: _S.AWAIT_CONFIG,
            _F.CLOSE: _S.CLOSED,
        },
        _S.ESTABLISHED: {
            _F.DATA: _S.ESTABLISHED,
            _F.PING: _S.ESTABLISHED,
            _F.PONG: _S.ESTABLISHED,
            _F.CLOSE: _S.CLOSED,
        },
        _S.QUARANTINED: {_F.PING: _S.QUARANTINED, _F.PONG: _S.QUARANTINED, _F.CLOSE: _S.CLOSED},
    },
}

_R = RenewalFrame
# Renewal frames: role -> frame received -> states it is allowed in (elsewhere, and
# from the wrong side, it is the peer's protocol error).
_RENEW_RECEIVE: dict[Role, dict[RenewalFrame, frozenset[SessionState]]] = {
    "gateway": {_R.RENEW_REQUEST: frozenset({_S.ESTABLISHED, _S.QUARANTINED})},
    "client": {
        _R.RENEW_ISSUED: frozenset({_S.ESTABLISHED, _S.QUARANTINED}),
        _R.RENEW_REFUSED: frozenset({_S.ESTABLISHED, _S.QUARANTINED}),
        _R.RENEW_HINT: frozenset({_S.AWAIT_CONFIG, _S.ESTABLISHED, _S.QUARANTINED}),
    },
}
_RENEW_STATES = frozenset({_S.ESTABLISHED, _S.QUARANTINED})

# Our own actions: role -> state -> action -> next state; anything missing is our bug.
_SEND: dict[Role, dict[SessionState, dict[str, SessionState]]] = {
    "gateway": {
        _S.AWAIT_CONFIG: {"config": _S.ESTABLISHED},
        _S.ESTABLISHED: {"data": _S.ESTABLISHED},
    },
    "client": {_S.ESTABLISHED: {"data": _S.ESTABLISHED}},
}

_PEER: dict[Role, str] = {"gateway": "client", "client": "gateway"}
_SETUP_STATES = frozenset({_S.AWAIT_HELLO, _S.AWAIT_CONFIG})
_RENEWAL_TYPES = frozenset(int(t) for t in RenewalFrame)


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LocalProtocolError(f"SessionConfig.{name} must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise LocalProtocolError(f"SessionConfig.{name} must be a positive number, got {value}")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How a session behaves; validated on construction (``LocalProtocolError``)."""

    role: Role
    """"gateway" or "client"."""
    keepalive_interval: float = 10.0
    """Seconds without sending before a PING (until CONFIG takes over)."""
    keepalive_timeout: float = 30.0
    """Seconds without receiving before the peer is dead (until CONFIG takes over)."""
    max_frame: int = DEFAULT_MAX_FRAME
    """Largest frame payload accepted, and the size DATA frames are split to."""
    config_timeout: float = 10.0
    """Client: CONFIG must arrive by then. Gateway: HELLO must arrive, and CONFIG be sent."""
    renewal_timeout: float = 60.0
    """Client: a renewal request unanswered this long ends as a local RenewalRefused."""

    def __post_init__(self) -> None:
        if self.role not in ("gateway", "client"):
            raise LocalProtocolError(
                f"SessionConfig.role must be 'gateway' or 'client', got {self.role!r}"
            )
        _check_seconds("keepalive_interval", self.keepalive_interval)
        _check_seconds("keepalive_timeout", self.keepalive_timeout)
        _check_seconds("config_timeout", self.config_timeout)
        _check_seconds("renewal_timeout", self.renewal_timeout)
        if self.keepalive_timeout <= self.keepalive_interval:
            raise LocalProtocolError(
                "SessionConfig.keepalive_timeout must exceed keepalive_interval"
            )
        if isinstance(self.max_frame, bool) or not isinstance(self.max_frame, int):
            raise LocalProtocolError("SessionConfig.max_frame must be an integer")
        if not JSON_MAX <= self.max_frame <= FORMAT_MAX_LENGTH:
            raise LocalProtocolError(
                f"SessionConfig.max_frame must be in {JSON_MAX}..{FORMAT_MAX_LENGTH}, "
                f"got {self.max_frame}"
            )


@dataclass(slots=True)
class SessionCounters:
    """Traffic counters; ``bytes_*`` count stream bytes, ``packets_*`` IP packets."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    packet_bytes_out: int = 0
    """The IP bytes of the packets queued (virtio headers and framing not counted)."""
    drops: dict[str, int] = field(default_factory=dict)
    """Reason -> count: "oversize", "short" (empty, or shorter than a virtio_net_hdr),
    "closed" and "quarantined" for packets not sent; "extension" for skipped unknown
    frames; "stale_renewal" for a renewal answer that came after its timeout."""

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count


class Session:
    """One tunnel session, gateway or client side, without I/O."""

    def __init__(
        self,
        config: SessionConfig,
        now: float,
        *,
        offload: bool = False,
        software: str = SOFTWARE,
    ) -> None:
        self.config = config
        self.role: Role = config.role
        self.state = _S.AWAIT_HELLO if config.role == "gateway" else _S.AWAIT_CONFIG
        self.peer_hello: Hello | None = None
        """Gateway side: the client's HELLO, once received."""
        self.tunnel_config: TunnelConfig | None = None
        """The pushed CONFIG, once sent (gateway) or received (client)."""
        self.counters = SessionCounters()
        self.rtt: float | None = None
        """Seconds between our last answered PING and its PONG."""
        self.close_event: SessionClosed | None = None
        """How the session ended, once it has."""
        self._decoder = FrameDecoder(config.max_frame)
        # Output is a list of chunks joined once in data_to_send(): a packet is copied
        # exactly once on its way out, with no buffer regrowth (measured: the bytearray
        # version spent a fifth of the sender's CPU in `out += packet`).
        self._out: list[bytes | memoryview] = []
        self._out_len = 0
        self._events: deque[Event] = deque()
        self._vnet_ok = False
        self._ka_interval = config.keepalive_interval
        self._ka_timeout = config.keepalive_timeout
        self._last_sent = now
        self._last_received = now
        self._setup_deadline = now + config.config_timeout
        self._deadline: tuple[float, int, str] | None = None
        self._expiry: tuple[float, int, str] | None = None
        self._ping_seq = 0
        self._ping_out: tuple[bytes, float] | None = None
        self._hello: Hello | None = None
        self._renew_next_id = 1
        # Client: (id, monotonic deadline) of our outstanding request. Gateway: the id
        # of the client's request we have not answered yet.
        self._renew_pending: tuple[int, float] | None = None
        self._renew_open: int | None = None
        if config.role == "client":
            self._hello = Hello(offload=offload, software=software)
            self._queue(_F.HELLO, self._hello.to_json(), now)

    @property
    def closed(self) -> bool:
        """True once the session is CLOSED."""
        return self.state is _S.CLOSED

    # ---- input -------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview, now: float) -> None:
        """Feed decrypted stream bytes, in chunks of any size. Ignored once CLOSED."""
        if self.state is _S.CLOSED or not data:
            return
        self._last_received = now
        counters = self.counters
        counters.bytes_in += len(data)
        decoder = self._decoder
        decoder.feed(data)
        events = self._events
        try:
            while not self.closed:
                frame = decoder.next_frame()
                if frame is None:
                    break
                ftype, payload = frame
                counters.frames_in += 1
                # Hot path; the table allows DATA exactly in ESTABLISHED for both roles.
                if ftype == _F.DATA and self.state is _S.ESTABLISHED:
                    vnet, packets = decode_data(payload)
                    if vnet and not self._vnet_ok:
                        raise RemoteProtocolError("DATA frame uses VNET but offload is off")
                    counters.packets_in += len(packets)
                    events.append(PacketsReceived(packets, vnet))
                else:
                    self._handle_frame(ftype, payload, now)
        except RemoteProtocolError as exc:
            self._close(exc.code, str(exc), now, by_peer=False, send=True)

    def _handle_frame(self, ftype: int, payload: memoryview, now: float) -> None:
        if ftype >= EXTENSION_MIN:
            if ftype in _RENEWAL_TYPES:
                self._handle_renewal(RenewalFrame(ftype), payload)
            else:
                self.counters.drop("extension")
            return
        kind = FrameType(ftype)  # the decoder already refused unknown critical types
        new_state = _RECEIVE[self.role].get(self.state, {}).get(kind)
        if new_state is None:
            raise RemoteProtocolError(
                f"{kind.name} frame from the {_PEER[self.role]} is not allowed in state "
                f"{self.state.value}"
            )
        if kind is _F.HELLO:
            hello = Hello.from_json(payload)
            self.peer_hello = hello
            self.state = new_state
            self._events.append(HelloReceived(hello))
        elif kind is _F.CONFIG:
            cfg = TunnelConfig.from_json(payload)
            if cfg.offload and not (self._hello is not None and self._hello.offload):
                raise RemoteProtocolError("CONFIG enables offload, which this client did not offer")
            self._establish(cfg)
            self._events.append(ConfigReceived(cfg))
        elif kind is _F.DATA:
            raise AssertionError("DATA is handled on the hot path")  # pragma: no cover
        elif kind is _F.PING:
            self._queue(_F.PONG, payload, now)
        elif kind is _F.PONG:
            if self._ping_out is not None and payload == self._ping_out[0]:
                self.rtt = now - self._ping_out[1]
                self._ping_out = None
        elif kind is _F.CLOSE:
            code, message = decode_close(payload)
            self._close(code, message, now, by_peer=True, send=False)

    def _handle_renewal(self, kind: RenewalFrame, payload: memoryview) -> None:
        allowed = _RENEW_RECEIVE[self.role].get(kind)
        if allowed is None:
            raise RemoteProtocolError(f"{kind.name} frame from the {_PEER[self.role]} is invalid")
        if self.state not in allowed:
            raise RemoteProtocolError(
                f"{kind.name} frame from the {_PEER[self.role]} is not allowed in state "
                f"{self.state.value}"
            )
        if kind is _R.RENEW_REQUEST:
            request_id, csr = decode_request(payload)
            if self._renew_open is not None:
                raise RemoteProtocolError(
                    f"RENEW_REQUEST {request_id} while request {self._renew_open} is unanswered"
                )
            self._renew_open = request_id
            self._events.append(RenewalRequested(request_id, csr))
        elif kind is _R.RENEW_ISSUED:
            request_id, pem = decode_issued(payload)
            if self._answers_pending(request_id, kind):
                self._events.append(RenewalIssued(request_id, pem))
        elif kind is _R.RENEW_REFUSED:
            request_id, code, message = decode_refused(payload)
            if self._answers_pending(request_id, kind):
                self._events.append(RenewalRefused(request_id, code, message))
        else:
            reason, quarantined = decode_hint(payload)
            if quarantined:
                if self.state is _S.ESTABLISHED:
                    raise RemoteProtocolError("RENEW_HINT quarantines a session after its CONFIG")
                self.state = _S.QUARANTINED
            self._events.append(RenewHint(reason, quarantined))

    def _answers_pending(self, request_id: int, kind: RenewalFrame) -> bool:
        """Whether an answer matches our outstanding request (True: it is consumed);
        False for the late answer to one that timed out; an id never sent is an error."""
        pending = self._renew_pending
        if pending is not None and pending[0] == request_id:
            self._renew_pending = None
            return True
        if request_id < self._renew_next_id:
            self.counters.drop("stale_renewal")
            return False
        raise RemoteProtocolError(f"{kind.name} answers request {request_id}, never sent")

    # ---- our actions -------------------------------------------------------------

    def send_config(self, cfg: TunnelConfig, now: float) -> None:
        """Gateway: push the tunnel configuration; the session becomes ESTABLISHED.

        A no-op once CLOSED (the peer may have gone while the owner prepared ``cfg``).
        """
        if self.role != "gateway":
            raise LocalProtocolError("only a gateway sends CONFIG")
        if self.state is _S.CLOSED:
            return
        new_state = _SEND[self.role].get(self.state, {}).get("config")
        if new_state is None:
            raise LocalProtocolError(f"cannot send CONFIG in state {self.state.value}")
        assert self.peer_hello is not None  # AWAIT_CONFIG is reached only via HELLO
        if cfg.offload and not self.peer_hello.offload:
            raise LocalProtocolError("cannot enable offload: the client did not offer it")
        self._queue(_F.CONFIG, cfg.to_json(), now)
        self._establish(cfg)

    def send_packets(
        self, packets: Sequence[bytes | memoryview], now: float, *, vnet: bool = False
    ) -> int:
        """Queue IP packets as DATA frames, as many per frame as ``max_frame`` allows.

        Returns how many packets were *not* queued: too big for one frame ("oversize"),
        empty or shorter than a virtio_net_hdr ("short"), or the session is CLOSED
        ("closed"); each is counted in ``counters.drops``. Raises
        ``LocalProtocolError`` before ESTABLISHED, or for ``vnet`` without offload.
        """
        if _SEND[self.role].get(self.state, {}).get("data") is None:
            return self._refuse_packets(len(packets))
        if vnet and not self._vnet_ok:
            raise LocalProtocolError("cannot send VNET packets: offload is off on this tunnel")
        max_payload = self.config.max_frame
        largest = max_payload - DATA_OVERHEAD
        shortest = VNET_HDR_LEN if vnet else 1
        flags = FLAG_VNET if vnet else 0
        out = self._out
        total = 0
        pack_len = U32.pack
        frame_at = -1
        frame_len = 0
        frames = sent = oversize = short = 0
        for packet in packets:
            size = len(packet)
            if size > largest:
                oversize += 1
                continue
            if size < shortest:
                short += 1
                continue
            if frame_at < 0 or frame_len + PACKET_PREFIX_SIZE + size > max_payload:
                if frame_at >= 0:
                    out[frame_at] = _DATA_START.pack((_F.DATA << 24) | frame_len, flags)
                    total += HEADER_SIZE + frame_len
                frame_at = len(out)
                out.append(b"")  # the frame header, filled in once its length is known
                frame_len = 1
                frames += 1
            out.append(pack_len(size))
            out.append(packet)
            frame_len += PACKET_PREFIX_SIZE + size
            sent += 1
        if frame_at >= 0:
            out[frame_at] = _DATA_START.pack((_F.DATA << 24) | frame_len, flags)
            total += HEADER_SIZE + frame_len
        self._out_len += total
        counters = self.counters
        if oversize or short:
            self._count_unsendable(oversize, short)
        if frames:
            counters.frames_out += frames
            counters.bytes_out += total
            counters.packets_out += sent
            # Framing is fixed-size, so the packets' own bytes follow without a sum.
            overhead = frames * (HEADER_SIZE + 1) + sent * (PACKET_PREFIX_SIZE + shortest - 1)
            counters.packet_bytes_out += total - overhead
            self._last_sent = now
        return oversize + short

    def _refuse_packets(self, count: int) -> int:
        """``send_packets`` outside ESTABLISHED: all dropped once CLOSED or QUARANTINED,
        an error before."""
        if self.state is _S.QUARANTINED:
            reason = "quarantined"
        elif self.state is _S.CLOSED:
            reason = "closed"
        else:
            raise LocalProtocolError(f"cannot send packets in state {self.state.value}")
        if count:
            self.counters.drop(reason, count)
        return count

    def _count_unsendable(self, oversize: int, short: int) -> None:
        if oversize:
            self.counters.drop("oversize", oversize)
        if short:
            self.counters.drop("short", short)

    # ---- renewal -----------------------------------------------------------------

    @property
    def renewal_pending(self) -> int | None:
        """Client: the id of our unanswered renewal request. Gateway: the id of the
        client's request not yet answered. None when there is none."""
        if self.role == "client":
            return self._renew_pending[0] if self._renew_pending is not None else None
        return self._renew_open

    def request_renewal(self, csr_der: bytes, now: float) -> int:
        """Client: send a CSR (DER) for a renewed certificate; returns the request id.

        One request at a time: the answer is a ``RenewalIssued`` or ``RenewalRefused``
        event, a local ``RenewalRefused`` (``RefusalCode.TIMEOUT``) after
        ``renewal_timeout``, or the session's close. Allowed when ESTABLISHED or
        QUARANTINED; ``LocalProtocolError`` otherwise.
        """
        if self.role != "client":
            raise LocalProtocolError("only a client requests a renewal")
        if self.state not in _RENEW_STATES:
            raise LocalProtocolError(f"cannot request a renewal in state {self.state.value}")
        if self._renew_pending is not None:
            raise LocalProtocolError(
                f"renewal request {self._renew_pending[0]} is still outstanding"
            )
        request_id = self._renew_next_id
        self._queue(RenewalFrame.RENEW_REQUEST, encode_request(request_id, csr_der), now)
        self._renew_next_id += 1
        self._renew_pending = (request_id, now + self.config.renewal_timeout)
        return request_id

    def _answer(self, request_id: int, what: str) -> bool:
        """Gateway: may we answer ``request_id``? False once CLOSED (a no-op then)."""
        if self.role != "gateway":
            raise LocalProtocolError(f"only a gateway {what}")
        if self.state is _S.CLOSED:
            return False
        if self._renew_open != request_id:
            open_id = self._renew_open
            raise LocalProtocolError(
                f"renewal request {request_id} is not the open one ({open_id or 'none'})"
            )
        self._renew_open = None
        return True

    def send_renewed(self, request_id: int, pem: bytes, now: float) -> None:
        """Gateway: answer the open request with the new leaf and its chain (PEM)."""
        payload = encode_issued(request_id, pem)
        if self._answer(request_id, "sends a renewed certificate"):
            self._queue(RenewalFrame.RENEW_ISSUED, payload, now)

    def refuse_renewal(self, request_id: int, code: int, message: str, now: float) -> None:
        """Gateway: refuse the open request (``code``: a ``RefusalCode``)."""
        payload = encode_refused(request_id, code, message)
        if self._answer(request_id, "refuses a renewal"):
            self._queue(RenewalFrame.RENEW_REFUSED, payload, now)

    def send_renew_hint(self, reason: str, now: float) -> None:
        """Gateway: ask the client to renew now (e.g. its groups changed). A no-op once
        CLOSED; ``LocalProtocolError`` before the session is ESTABLISHED or QUARANTINED."""
        if self.role != "gateway":
            raise LocalProtocolError("only a gateway sends a renew hint")
        if self.state is _S.CLOSED:
            return
        if self.state not in _RENEW_STATES:
            raise LocalProtocolError(f"cannot send a renew hint in state {self.state.value}")
        quarantined = self.state is _S.QUARANTINED
        self._queue(RenewalFrame.RENEW_HINT, encode_hint(reason, quarantined=quarantined), now)

    def quarantine(
        self,
        now: float,
        deadline: float,
        *,
        reason: str = "certificate expired: renew now",
        code: CloseCode = CloseCode.POLICY,
        message: str = "the renewal grace period for an expired certificate ended",
    ) -> None:
        """Gateway, instead of ``send_config``: admit the client only to renew.

        After HELLO only: no CONFIG will come, packets are refused, and only renewal,
        PING/PONG and CLOSE frames are allowed. Sends RENEW_HINT (quarantined) and
        closes with ``code`` at monotonic ``deadline`` unless the client leaves first.
        """
        if self.role != "gateway":
            raise LocalProtocolError("only a gateway quarantines a session")
        if self.state is _S.CLOSED:
            return
        if self.state is not _S.AWAIT_CONFIG:
            raise LocalProtocolError(f"cannot quarantine a session in state {self.state.value}")
        self.state = _S.QUARANTINED
        self._queue(RenewalFrame.RENEW_HINT, encode_hint(reason, quarantined=True), now)
        self.set_deadline(deadline, code, message)

    # ---- closing -----------------------------------------------------------------

    def close(self, code: CloseCode, message: str, now: float) -> None:
        """Queue CLOSE and end the session; idempotent.

        The owner should still write ``data_to_send()`` (it holds the CLOSE) before
        closing the TLS stream.
        """
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFFFF:
            raise LocalProtocolError(f"close code {code!r} is not a 16-bit integer")
        self._close(code, message, now, by_peer=False, send=True)

    def set_deadline(self, when: float, code: CloseCode, message: str) -> None:
        """At ``when``, close with ``code`` (e.g. certificate notAfter); replaces any earlier."""
        if not math.isfinite(when):
            raise LocalProtocolError(f"deadline {when!r} is not a finite time")
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFFFF:
            raise LocalProtocolError(f"close code {code!r} is not a 16-bit integer")
        if self.state is not _S.CLOSED:
            self._deadline = (when, code, message)
            self._expiry = None

    def set_expiry(
        self, not_after: float, code: CloseCode, message: str, *, now: float, wall: float
    ) -> None:
        """Close with ``code`` once the *wall* clock reaches ``not_after`` (Unix seconds,
        e.g. certificate notAfter); replaces any earlier deadline.

        ``now`` is the monotonic time and ``wall`` the wall time at this moment: the
        monotonic deadline is ``now + (not_after - wall)``, recomputed by every
        ``handle_timer`` that is given ``wall``. Past ``not_after`` already, the
        session closes at the next ``handle_timer``.
        """
        if not math.isfinite(not_after) or not math.isfinite(wall):
            raise LocalProtocolError(f"expiry {not_after!r} is not a finite time")
        self.set_deadline(now + max(0.0, not_after - wall), code, message)
        if self.state is not _S.CLOSED:
            self._expiry = (not_after, code, message)

    def clear_deadline(self) -> None:
        """Forget the deadline or expiry (e.g. after an in-tunnel renewal)."""
        self._deadline = None
        self._expiry = None

    # ---- output ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Drain queued output: concatenated frames for the TLS stream."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        return data

    def next_event(self) -> Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    # ---- time --------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None once CLOSED."""
        if self.state is _S.CLOSED:
            return None
        when = min(self._last_sent + self._ka_interval, self._last_received + self._ka_timeout)
        if self.state in _SETUP_STATES:
            when = min(when, self._setup_deadline)
        if self._renew_pending is not None:
            when = min(when, self._renew_pending[1])
        if self._deadline is not None:
            when = min(when, self._deadline[0])
        return when

    def handle_timer(self, now: float, wall: float | None = None) -> None:
        """Act on whatever is due at monotonic ``now``; harmless to call early.

        ``wall``: the wall time now, to re-anchor a ``set_expiry`` deadline (a stepped
        wall clock moves the cut; keepalives never see it).
        """
        if self.state is _S.CLOSED:
            return
        pending = self._renew_pending
        if pending is not None and now >= pending[1]:
            self._renew_pending = None
            limit = f"{self.config.renewal_timeout:g}s"
            text = f"no answer to renewal request {pending[0]} within {limit}"
            self._events.append(RenewalRefused(pending[0], RefusalCode.TIMEOUT, text, local=True))
        if wall is not None and self._expiry is not None:
            not_after, code, message = self._expiry
            self._deadline = (now + max(0.0, not_after - wall), code, message)
        if self._deadline is not None and now >= self._deadline[0]:
            _, code, message = self._deadline
            self._close(code, message, now, by_peer=False, send=True)
        elif self.state in _SETUP_STATES and now >= self._setup_deadline:
            self._close(CloseCode.CONFIG_TIMEOUT, self._setup_timeout_message(), now, False, True)
        elif now >= self._last_received + self._ka_timeout:
            message = f"nothing received from the {_PEER[self.role]} for {self._ka_timeout:g}s"
            self._close(CloseCode.KEEPALIVE_TIMEOUT, message, now, by_peer=False, send=True)
        elif now >= self._last_sent + self._ka_interval:
            self._ping_seq += 1
            payload = _PING.pack(self._ping_seq)
            self._ping_out = (payload, now)
            self._queue(_F.PING, payload, now)

    # ---- internals ---------------------------------------------------------------

    def _setup_timeout_message(self) -> str:
        limit = f"{self.config.config_timeout:g}s"
        if self.state is _S.AWAIT_HELLO:
            return f"no HELLO from the client within {limit}"
        if self.role == "gateway":
            return f"CONFIG was not sent within {limit} of the session start"
        return f"no CONFIG from the gateway within {limit}"

    def _establish(self, cfg: TunnelConfig) -> None:
        self.tunnel_config = cfg
        self._vnet_ok = cfg.offload
        self._ka_interval = cfg.keepalive_interval
        self._ka_timeout = cfg.keepalive_timeout
        self.state = _S.ESTABLISHED

    def _queue(self, ftype: int, payload: bytes | memoryview, now: float) -> None:
        self._out.append(HEADER.pack((ftype << 24) | len(payload)))
        self._out.append(bytes(payload))
        self._out_len += HEADER_SIZE + len(payload)
        self.counters.frames_out += 1
        self.counters.bytes_out += HEADER_SIZE + len(payload)
        self._last_sent = now

    def _close(self, code: int, message: str, now: float, by_peer: bool, send: bool) -> None:
        if self.state is _S.CLOSED:
            return
        if send:
            self._queue(_F.CLOSE, encode_close(code, message), now)
        self.state = _S.CLOSED
        self._deadline = None
        self._expiry = None
        self._renew_pending = None
        self._renew_open = None
        self._decoder = FrameDecoder(self.config.max_frame)  # free buffered input
        event = SessionClosed(code, message, by_peer)
        self.close_event = event
        self._events.append(event)
