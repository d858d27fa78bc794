"""Typed protocol errors that say whose fault it was (h11 style)."""

from __future__ import annotations

from vpnd.proto.close import CloseCode


class ProtocolError(Exception):
    """Base class; ``str(err)`` is one actionable line for a human."""


class LocalProtocolError(ProtocolError):
    """We misused the API or tried to build an invalid message: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the session closes with ``code``."""

    def __init__(self, message: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code
