"""Shared helpers for the proto tests: a back-to-back session pair with a stepped clock.

Import as ``from proto_fixtures import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import ipaddress
import struct

from vpnd.proto import (
    Event,
    HelloReceived,
    PacketsReceived,
    Session,
    SessionClosed,
    SessionConfig,
    SessionState,
    TunnelConfig,
)
from vpnd.proto.frames import FrameType

# A power of two, so sums of ticks are exact and timer expectations can be exact too.
TICK = 0.125


def tunnel_config(
    *, offload: bool = False, interval: float = 2.0, timeout: float = 6.0
) -> TunnelConfig:
    return TunnelConfig(
        address=ipaddress.ip_interface("10.8.0.5/24"),
        gateway=ipaddress.ip_address("10.8.0.1"),
        routes=(ipaddress.ip_network("10.8.0.0/24"), ipaddress.ip_network("192.168.50.0/24")),
        mtu=1400,
        keepalive_interval=interval,
        keepalive_timeout=timeout,
        offload=offload,
        extra_addresses=(ipaddress.ip_interface("fd00:8::5/64"),),
    )


class Pair:
    """A gateway and a client session joined by two one-way links that can be cut."""

    def __init__(
        self,
        *,
        offload: bool = False,
        max_frame: int = 262144,
        config_timeout: float = 10.0,
    ) -> None:
        self.now = 0.0
        self.gw = Session(
            SessionConfig("gateway", max_frame=max_frame, config_timeout=config_timeout), self.now
        )
        self.cl = Session(
            SessionConfig("client", max_frame=max_frame, config_timeout=config_timeout),
            self.now,
            offload=offload,
        )
        self.gw_events: list[Event] = []
        self.cl_events: list[Event] = []
        self.c2g = True  # client -> gateway link up
        self.g2c = True
        self.gw_last_rx = self.now  # when the gateway last received something

    def pump(self) -> None:
        for _ in range(50):
            up = self.cl.data_to_send()
            down = self.gw.data_to_send()
            if not up and not down:
                break
            if up and self.c2g:
                self.gw.receive_data(up, self.now)
                self.gw_last_rx = self.now
            if down and self.g2c:
                self.cl.receive_data(down, self.now)
            self.drain()
        else:
            raise AssertionError("the pair never went quiet")
        self.drain()

    def drain(self) -> None:
        for session, sink in ((self.gw, self.gw_events), (self.cl, self.cl_events)):
            while (event := session.next_event()) is not None:
                sink.append(event)

    def handshake(self, cfg: TunnelConfig | None = None) -> TunnelConfig:
        cfg = cfg or tunnel_config(offload=False)
        self.pump()
        assert isinstance(self.gw_events[-1], HelloReceived)
        self.gw.send_config(cfg, self.now)
        self.pump()
        assert self.gw.state is SessionState.ESTABLISHED
        assert self.cl.state is SessionState.ESTABLISHED
        return cfg

    def step(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.now += TICK
            for session in (self.gw, self.cl):
                timer = session.get_timer()
                if timer is not None and timer <= self.now:
                    session.handle_timer(self.now)
            self.pump()

    def closed(self, events: list[Event]) -> list[SessionClosed]:
        return [e for e in events if isinstance(e, SessionClosed)]


def packets_of(events: list[Event]) -> list[bytes]:
    return [bytes(p) for e in events if isinstance(e, PacketsReceived) for p in e.packets]


def established_client(*, offload: bool = False, max_frame: int = 262144) -> Session:
    """A client that has received CONFIG, built from the gateway's real bytes."""
    pair = Pair(offload=offload, max_frame=max_frame)
    pair.handshake(tunnel_config(offload=offload))
    pair.cl_events.clear()
    return pair.cl


def established_gateway(*, offload: bool = False) -> Session:
    pair = Pair(offload=offload)
    pair.handshake(tunnel_config(offload=offload))
    pair.gw_events.clear()
    return pair.gw


def sent_close(session: Session) -> tuple[int, str]:
    """The CLOSE frame a session queued last (there must be one)."""
    out = session.data_to_send()
    pos = 0
    last: tuple[int, str] | None = None
    while pos < len(out):
        (word,) = struct.unpack_from(">I", out, pos)
        ftype, length = word >> 24, word & 0xFFFFFF
        if ftype == FrameType.CLOSE:
            body = out[pos + 4 : pos + 4 + length]
            last = (struct.unpack_from(">H", body)[0], body[2:].decode())
        pos += 4 + length
    assert pos == len(out), "output is not a whole number of frames"
    assert last is not None, "no CLOSE frame was queued"
    return last


def the_close(session: Session) -> SessionClosed:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    closes = [e for e in events if isinstance(e, SessionClosed)]
    assert len(closes) == 1, events
    assert session.state is SessionState.CLOSED
    return closes[0]
