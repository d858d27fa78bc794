"""Sans-I/O tunnel protocol: frames, control messages, keepalive timers and events.

Pure: no asyncio, sockets or clocks; time is always an argument. See ``frames`` for
the wire format and ``session`` for how to drive a ``Session``.
"""

from vpnd.proto.close import CloseCode, describe_close
from vpnd.proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
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
from vpnd.proto.frames import DEFAULT_MAX_FRAME, VNET_HDR_LEN, FrameType
from vpnd.proto.messages import (
    PROTOCOL_VERSION,
    SOFTWARE,
    Hello,
    IPAddress,
    IPInterface,
    IPNetwork,
    TunnelConfig,
)
from vpnd.proto.renewal_frames import RefusalCode, RenewalFrame
from vpnd.proto.session import Session, SessionConfig, SessionCounters, SessionState

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_VERSION",
    "SOFTWARE",
    "VNET_HDR_LEN",
    "CloseCode",
    "ConfigReceived",
    "Event",
    "FrameType",
    "Hello",
    "HelloReceived",
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "LocalProtocolError",
    "PacketsReceived",
    "ProtocolError",
    "RefusalCode",
    "RemoteProtocolError",
    "RenewHint",
    "RenewalFrame",
    "RenewalIssued",
    "RenewalRefused",
    "RenewalRequested",
    "Session",
    "SessionClosed",
    "SessionConfig",
    "SessionCounters",
    "SessionState",
    "TunnelConfig",
    "describe_close",
]
