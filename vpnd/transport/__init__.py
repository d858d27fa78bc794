"""asyncio edges: the TLS listener/connector (mutual TLS 1.3, real alerts) and friends.

Only the TLS names are re-exported here; import other edges from their own modules.
"""

from vpnd.transport.alerts import alert_from_ssl_error, describe_alert
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.tlsctx import ALPN, TlsConfigError, client_context, server_context
from vpnd.transport.tlsengine import (
    TlsAlertReceived,
    TlsClosed,
    TlsEngine,
    TlsError,
    TlsHandshakeError,
    TlsProtocolError,
    TlsStateError,
)

__all__ = [
    "ALPN",
    "TlsAlertReceived",
    "TlsClosed",
    "TlsConfigError",
    "TlsConnection",
    "TlsEngine",
    "TlsError",
    "TlsHandshakeError",
    "TlsProtocolError",
    "TlsStateError",
    "alert_from_ssl_error",
    "client_context",
    "connect",
    "describe_alert",
    "serve",
    "server_context",
]
