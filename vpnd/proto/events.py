"""What a ``Session`` tells its owner, one frozen dataclass per kind (dispatch with ``match``)."""

from __future__ import annotations

from dataclasses import dataclass

from vpnd.proto.messages import Hello, TunnelConfig


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every session event."""


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """Gateway side: the client said HELLO; answer with ``Session.send_config``."""

    hello: Hello
    """The validated HELLO."""


@dataclass(frozen=True, slots=True)
class ConfigReceived(Event):
    """Client side: the gateway pushed the tunnel configuration; the session is established."""

    config: TunnelConfig
    """The validated CONFIG."""


@dataclass(frozen=True, slots=True, eq=False)
class PacketsReceived(Event):
    """One DATA frame's worth of IP packets."""

    packets: list[memoryview | bytes]
    """The packets, in order; read-only slices of the received frame, not copies."""
    vnet: bool
    """Every packet starts with a 10-byte virtio_net_hdr."""


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """The session is over (emitted exactly once, whatever the cause)."""

    code: int
    """A ``CloseCode`` member, or a plain int for a code this release does not know."""
    message: str
    """Human-readable detail (peer text is sanitised to printable characters)."""
    by_peer: bool
    """True if the peer sent CLOSE; False for our close(), protocol errors and timers."""
