"""The byte stream a session runs over, as the gateway and the client see it.

``TlsConnection`` is the real one (mutual TLS 1.3 over TCP); an in-memory pipe
implements the same protocol for tests, so a gateway and N clients run in one process
without sockets. Nothing above the transport layer names ``TlsConnection``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Peername = tuple[str, int]


class Stream(Protocol):
    """An established, authenticated, ordered byte stream to one peer.

    ``on_close`` given to ``set_receiver`` is called exactly once: None for an orderly
    end, else the reason. Writes after the stream closed are dropped silently.
    """

    @property
    def peername(self) -> Peername | None:
        """The remote transport address, for logs (None if unknown)."""
        ...

    @property
    def backlog_bytes(self) -> int:
        """Bytes written but not yet sent: callers apply backpressure on it."""
        ...

    def peer_chain(self) -> tuple[bytes, ...]:
        """The DER certificates the peer presented, leaf first (empty if none)."""
        ...

    def set_receiver(
        self, on_data: Callable[[bytes], None], on_close: Callable[[Exception | None], None]
    ) -> None: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def pause_delivery(self) -> None:
        """Deliver nothing more until ``resume_delivery`` (a per-turn budget is spent)."""
        ...

    def resume_delivery(self) -> None: ...

    def close(self) -> None:
        """Flush what was written, then end the stream. Idempotent."""
        ...

    def abort(self) -> None:
        """End the stream now, discarding anything unsent."""
        ...
