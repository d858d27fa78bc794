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


@dataclass(frozen=True, slots=True)
class RenewalRequested(Event):
    """Gateway side: the client asks for a renewed certificate; answer with
    ``Session.send_renewed`` or ``Session.refuse_renewal`` (one request at a time)."""

    request_id: int
    csr_der: bytes
    """The CSR as sent (at most 16 KiB, DER framing checked only): verify it."""


@dataclass(frozen=True, slots=True)
class RenewalIssued(Event):
    """Client side: the gateway signed our CSR."""

    request_id: int
    pem: bytes
    """The new leaf, then its chain, PEM (at most 16 KiB): verify it before use."""


@dataclass(frozen=True, slots=True)
class RenewalRefused(Event):
    """Client side: the renewal did not happen (refused, or no answer in time)."""

    request_id: int
    code: int
    """A ``RefusalCode`` member, or a plain int for a code this release does not know."""
    message: str
    """Human-readable detail (sanitised to printable characters)."""
    local: bool = False
    """True when no answer came in time (``RefusalCode.TIMEOUT``), not the gateway's word."""


@dataclass(frozen=True, slots=True)
class RenewHint(Event):
    """Client side: the gateway asks us to renew now."""

    reason: str
    quarantined: bool
    """Our certificate expired: this session only renews (no CONFIG, no packets)."""
