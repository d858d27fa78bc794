"""An in-memory ``Stream`` pair: a gateway and its clients in one process, no sockets.

It keeps the semantics of ``TlsConnection`` that the session code relies on: delivery
is asynchronous (``loop.call_soon``, in slices, a bounded amount per loop turn), data
that arrives before ``set_receiver`` is held, ``on_close`` is called exactly once
(None for an orderly end, ``ConnectionResetError`` when the other end aborted), and
writes after the end are dropped. ``backlog_bytes`` counts what was written but not
yet delivered, so a reader that stops reading makes the writer's backlog grow, as
with a socket. No certificate is checked here: the chains are what each side
*presents*, and verifying them is the owner's job.

Two differences from TLS, on purpose: ``resume_delivery`` delivers on the next loop turn
(TLS delivers what it has buffered at once, re-entrantly), and ``backlog_bytes`` is all
that is undelivered (TLS counts only what the kernel's socket buffer has not taken).
Tests of behaviour that depends on either run over real TLS.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from vpnd.transport.stream import Peername, Stream

DELIVERY_SLICE = 8192
"""Bytes per ``on_data`` call, as ``TlsConnection`` delivers decrypted data."""
TURN_BUDGET = 65536
"""Bytes delivered per loop turn before yielding, like one socket read."""

_EOF = None  # in an outbox: the writer's orderly end, after everything before it


class MemoryStream:
    """One end of a ``memory_pipe``; implements ``Stream``."""

    def __init__(
        self,
        chain: Sequence[bytes],
        peername: Peername | None,
        *,
        max_backlog: int | None,
        on_activity: Callable[[], None] | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._chain = tuple(chain)
        self._peername = peername
        # Like TlsConnection's max_write_backlog: while this much waits for a peer
        # that does not read, stop reading from it, so memory stays bounded.
        self._max_backlog = max_backlog
        self._on_activity = on_activity
        self._peer: MemoryStream | None = None
        self._outbox: deque[bytes | None] = deque()
        self._out_bytes = 0
        self._pump_scheduled = False
        self._on_data: Callable[[bytes], None] | None = None
        self._on_close: Callable[[Exception | None], None] | None = None
        self._released = False  # a receiver is set and the held data may flow
        self._user_paused = False
        self._yielding = False
        self._closing = False
        self._ended = False
        self._end_reason: Exception | None = None
        self._reported = False

    # -- Stream ------------------------------------------------------------------

    @property
    def peername(self) -> Peername | None:
        return self._peername

    @property
    def backlog_bytes(self) -> int:
        return self._out_bytes

    def peer_chain(self) -> tuple[bytes, ...]:
        return self._chain

    def set_receiver(
        self, on_data: Callable[[bytes], None], on_close: Callable[[Exception | None], None]
    ) -> None:
        self._on_data = on_data
        self._on_close = on_close
        self._loop.call_soon(self._release)

    def write(self, data: bytes | memoryview) -> None:
        if self._closing or self._ended or not data:
            return
        self._outbox.append(bytes(data))
        self._out_bytes += len(data)
        self._schedule()

    def pause_delivery(self) -> None:
        self._yielding = True

    def resume_delivery(self) -> None:
        self._set_flag(yielding=False)

    def close(self) -> None:
        """Deliver what was written, then end both sides in order. Idempotent."""
        if self._closing or self._ended:
            return
        self._closing = True
        self._outbox.append(_EOF)
        self._schedule()

    def abort(self) -> None:
        """End now, dropping what is undelivered; the other end sees a reset."""
        if self._ended:
            return
        peer = self._peer
        self._end(None)
        if peer is not None:
            reset = ConnectionResetError("the other end aborted the stream")
            self._loop.call_soon(peer._end, reset)

    # -- test controls -------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop taking data from the other end (a stalled reader): its backlog grows."""
        self._user_paused = True

    def resume_reading(self) -> None:
        self._set_flag(user_paused=False)

    # -- internals -----------------------------------------------------------------

    def _accepting(self) -> bool:
        """Whether this end takes data from the other one now."""
        return (
            self._released
            and not (self._user_paused or self._yielding or self._ended or self._over_cap())
            and self._on_data is not None
        )

    def _over_cap(self) -> bool:
        return self._max_backlog is not None and self._out_bytes > self._max_backlog

    def _set_flag(self, *, yielding: bool | None = None, user_paused: bool | None = None) -> None:
        before = self._accepting()
        if yielding is not None:
            self._yielding = yielding
        if user_paused is not None:
            self._user_paused = user_paused
        if not before and self._accepting() and self._peer is not None:
            self._peer._schedule()

    def _release(self) -> None:
        self._released = True
        if self._ended:
            self._report()
        elif self._peer is not None:
            self._peer._schedule()

    def _schedule(self) -> None:
        if not self._pump_scheduled and self._outbox and not self._ended:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Deliver up to one turn's budget to the other end, as far as it accepts."""
        self._pump_scheduled = False
        reader = self._peer
        if reader is None or self._ended:
            return
        capped = self._over_cap()
        budget = TURN_BUDGET
        while self._outbox and budget > 0 and reader._accepting() and not self._ended:
            chunk = self._outbox.popleft()
            if chunk is _EOF:
                self._end(None)
                reader._end(None)
                break
            if len(chunk) > DELIVERY_SLICE:
                self._outbox.appendleft(chunk[DELIVERY_SLICE:])
                chunk = chunk[:DELIVERY_SLICE]
            self._out_bytes -= len(chunk)
            budget -= len(chunk)
            assert reader._on_data is not None  # _accepting() checked it
            reader._on_data(chunk)
        if budget <= 0 and reader._accepting():
            self._schedule()  # more next turn: other work runs in between
        if capped and not self._over_cap() and self._accepting():
            reader._schedule()  # our backlog shrank below the cap: read from it again
        self._notify()

    def _end(self, reason: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._closing = True
        self._end_reason = reason
        self._outbox.clear()
        self._out_bytes = 0
        if self._released:
            self._report()
        self._notify()

    def _report(self) -> None:
        if self._reported or self._on_close is None:
            return
        self._reported = True
        self._on_close(self._end_reason)

    def _notify(self) -> None:
        if self._on_activity is not None:
            self._on_activity()


def memory_pipe(
    *,
    client_chain: Sequence[bytes] = (),
    server_chain: Sequence[bytes] = (),
    client_addr: Peername = ("192.0.2.10", 40000),
    server_addr: Peername = ("192.0.2.1", 443),
    server_max_backlog: int | None = None,
    client_max_backlog: int | None = None,
    on_activity: Callable[[], None] | None = None,
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends, ``(client, server)``. Each end reports the chain and the
    address of the *other* side, as a TLS connection reports its peer's. ``on_activity``
    is called after each delivery turn and each end, so a test can wait for an effect
    without polling."""
    client = MemoryStream(
        server_chain, server_addr, max_backlog=client_max_backlog, on_activity=on_activity
    )
    server = MemoryStream(
        client_chain, client_addr, max_backlog=server_max_backlog, on_activity=on_activity
    )
    client._peer = server
    server._peer = client
    return client, server


def _implements_stream(end: MemoryStream) -> Stream:
    return end  # mypy checks that MemoryStream satisfies the Stream protocol
