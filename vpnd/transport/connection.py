"""The asyncio edge of TLS: a plain TCP ``asyncio.Protocol`` driving a ``TlsEngine``.

``connect()`` and ``serve()`` are the only entry points. On a refused handshake the
alert record is written before the transport is closed, so the other side learns why
(asyncio's own TLS transport drops it).

What a client sees for each server-side refusal (TLS 1.3: ``connect()`` has already
returned, the alert arrives on the first read, i.e. ``on_close(TlsAlertReceived)``):

==================================  ===================================================
server refuses because              client gets
==================================  ===================================================
cert from an untrusted CA           TlsAlertReceived("unknown_ca")
no CRL loaded for the issuing CA    TlsAlertReceived("unknown_ca")
revoked (CRL)                       TlsAlertReceived("certificate_revoked")
expired                             TlsAlertReceived("certificate_expired")
not yet valid                       TlsAlertReceived("bad_certificate")
no client certificate               TlsAlertReceived("certificate_required")
serverAuth-only cert (wrong EKU)    TlsAlertReceived("unsupported_certificate")
IP outside CA name constraints      TlsAlertReceived("certificate_unknown")
TLS 1.2-only client                 raised by connect(): TlsAlertReceived("protocol_version")
no / wrong ALPN                     close_notify right after the handshake: TlsClosed
                                    (CPython cannot send no_application_protocol)
==================================  ===================================================

The client's own refusals of the gateway (untrusted CA, pinned DNS name mismatch, no
vpnd/1 ALPN) are raised by ``connect()`` as ``TlsHandshakeError``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from vpnd.transport.slots import HandshakeSlots
from vpnd.transport.stream import Stream
from vpnd.transport.tlsengine import (
    TlsAlertReceived,
    TlsClosed,
    TlsEngine,
    TlsError,
    TlsHandshakeError,
    TlsProtocolError,
)

log = logging.getLogger(__name__)

Peername = tuple[str, int]
HandshakeCallback = Callable[["TlsConnection", Exception | None], None]


READ_SLICE = 8192
"""Decrypted bytes delivered per step: ~270 tiny packets, or an eighth of a 64 KB frame."""


class TlsConnection(asyncio.Protocol):
    """One TCP connection carrying one TLS session.

    Built only by ``connect()`` / ``serve()``; the ``asyncio.Protocol`` methods are for
    the event loop. ``on_close`` passed to ``set_receiver`` is called exactly once:
    with None for an orderly end (either side's close_notify, ``close()``, ``abort()``),
    else with the reason (``TlsAlertReceived``, ``TlsProtocolError``,
    ``ConnectionResetError`` for a TCP reset or an EOF without close_notify).
    """

    peername: Peername | None
    engine: TlsEngine

    def __init__(
        self,
        engine: TlsEngine,
        on_handshake: HandshakeCallback,
        *,
        handshake_timeout: float | None = None,
        admit: Callable[[TlsConnection], bool] | None = None,
        max_write_backlog: int | None = None,
    ) -> None:
        self.engine = engine
        self._admit = admit
        # A peer that does not read what we send (e.g. floods PINGs and never reads
        # the PONGs) stops being read once this much is queued for it: memory stays
        # bounded, and its session times out for lack of keepalives.
        self._max_backlog = max_write_backlog
        self._backlog_paused = False
        self.peername = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._on_handshake: HandshakeCallback | None = on_handshake
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._on_data: Callable[[bytes], None] | None = None
        self._on_close: Callable[[Exception | None], None] | None = None
        # Decrypted data and the end reason, held until set_receiver() is called.
        self._backlog: list[bytes] | None = []
        self._ended = False
        self._end_reason: Exception | None = None
        self._close_reported = False
        self._closing = False
        self._lost = False
        self._user_paused = False
        self._held = False  # reading paused until a receiver is set
        self._yielding = False  # pause_delivery(): the rest waits for resume_delivery()
        self.handshake_bytes = 0
        """Bytes received before the handshake completed (0: a silent connection)."""
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- public API --------------------------------------------------------------

    def set_receiver(
        self, on_data: Callable[[bytes], None], on_close: Callable[[Exception | None], None]
    ) -> None:
        """Deliver decrypted bytes to ``on_data`` and the end to ``on_close``.

        Bytes (or an end) that arrived before this call are delivered on the next loop
        iteration; after that, ``on_data`` is called synchronously from the socket read.
        """
        self._on_data = on_data
        self._on_close = on_close
        self._loop.call_soon(self._release_backlog)

    def write(self, data: bytes | memoryview) -> None:
        """Encrypt and send now. Dropped silently once the connection is closing."""
        if self._closing or self._lost or self._ended or self._transport is None:
            return
        try:
            self.engine.write(data)
        except TlsError:
            return  # the session already failed; on_close reports it
        self._flush()
        cap = self._max_backlog
        if cap is not None and not self._backlog_paused and self.write_buffer_size > cap:
            self._backlog_paused = True
            self._update_reading()

    @property
    def write_buffer_size(self) -> int:
        """Bytes queued in the transport; callers apply backpressure on it."""
        if self._transport is None or self._lost:
            return 0
        return self._transport.get_write_buffer_size()

    @property
    def backlog_bytes(self) -> int:
        """``Stream.backlog_bytes``: the same as ``write_buffer_size``."""
        return self.write_buffer_size

    def peer_chain(self) -> tuple[bytes, ...]:
        """``Stream.peer_chain``: the DER chain the peer presented, leaf first."""
        return tuple(self.engine.peer_chain_der())

    def pause_reading(self) -> None:
        self._user_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._user_paused = False
        self._update_reading()

    def pause_delivery(self) -> None:
        """Deliver nothing more until ``resume_delivery()`` (the owner's per-peer budget
        for this loop turn is spent). Takes effect after the slice being delivered; the
        rest stays in the TLS buffers, undecrypted, and the socket is not read meanwhile,
        so TCP pushes back on the sender and memory stays bounded."""
        if self._yielding:
            return
        self._yielding = True
        self._update_reading()

    def resume_delivery(self) -> None:
        """Go on delivering: what is buffered now, then the socket again."""
        if not self._yielding:
            return
        self._yielding = False
        if not self._ended and not self._closing and self._backlog is None:
            self._read_app()
        self._update_reading()

    async def wait_writable(self) -> None:
        """Return once the transport's buffer is below its low-water mark.

        Raises ``ConnectionResetError`` if the connection is, or becomes, closed.
        """
        if self._lost or self._closing:
            raise ConnectionResetError("the TLS connection is closed")
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)

    def close(self) -> None:
        """Send close_notify, flush, close the transport. Idempotent."""
        if self._closing or self._transport is None:
            return
        self._closing = True
        if self.engine.established:
            self.engine.close()
            self._flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding anything unsent."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peername = (str(peer[0]), int(peer[1]))
        if self._admit is not None and not self._admit(self):
            # Over a pending-handshake limit: drop before spending any crypto on it.
            self._closing = True
            transport.abort()
            self._handshake_done(
                TlsHandshakeError(
                    "too_many_pending",
                    "too many unauthenticated connections (in total or from this address)",
                    sent_alert=False,
                )
            )
            return
        if self._handshake_timeout is not None:
            self._timer = self._loop.call_later(self._handshake_timeout, self._timed_out)
        if not self.engine.server_side:
            self._step_handshake()  # send the ClientHello

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.engine.receive(data)
        if self.engine.established:
            self._read_app()
        else:
            self.handshake_bytes += len(data)
            self._step_handshake()

    def eof_received(self) -> bool | None:
        return False  # let the transport close; connection_lost reports the end

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timer()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the TLS connection was closed"))
        self._drain_waiters.clear()
        if not self.engine.established:
            detail = "the peer closed the connection during the TLS handshake"
            self._handshake_done(exc or ConnectionResetError(detail))
        elif not self._ended:
            if exc is None and not self._closing:
                exc = ConnectionResetError("the peer closed TCP without a TLS close_notify")
            self._end(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._backlog_paused:
            self._backlog_paused = False
            self._update_reading()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- internals ---------------------------------------------------------------

    def _flush(self) -> None:
        out = self.engine.outgoing()
        if out and self._transport is not None and not self._lost:
            self._transport.write(out)

    def _step_handshake(self) -> None:
        try:
            done = self.engine.handshake()
        except TlsError as err:
            self._flush()  # the alert record, if OpenSSL produced one
            self._closing = True
            if self._transport is not None:
                self._transport.close()  # close() still sends buffered bytes first
            self._handshake_done(err)
            return
        self._flush()
        if not done:
            return
        self._cancel_timer()
        # Hold reading until the owner sets a receiver: bounds what we buffer.
        self._held = True
        self._update_reading()
        self._handshake_done(None)
        if not self._closing:
            self._read_app()  # app data (or an alert) may have come with the Finished

    def evict(self) -> None:
        """Drop a pending handshake to make room for a newer one (the table is full)."""
        if self.engine.established or self._transport is None or self._closing:
            return
        self._cancel_timer()
        self._closing = True
        self._transport.abort()
        self._handshake_done(
            TlsHandshakeError(
                "handshake_evicted",
                "the oldest stalled handshake was dropped: too many unauthenticated connections",
                sent_alert=False,
            )
        )

    def _timed_out(self) -> None:
        self._timer = None
        if self.engine.established or self._transport is None:
            return
        self._closing = True
        self._transport.abort()
        err = TlsHandshakeError(
            "handshake_timeout",
            f"no complete TLS handshake within {self._handshake_timeout:g}s",
            sent_alert=False,
        )
        self._handshake_done(err)

    def _handshake_done(self, err: Exception | None) -> None:
        callback, self._on_handshake = self._on_handshake, None
        if callback is not None:
            callback(self, _detached(err))

    def _read_app(self) -> None:
        # In slices, so that an owner's yield_turn() takes effect within one slice.
        while not self._ended and not self._yielding:
            try:
                data = self.engine.read(READ_SLICE)
            except TlsClosed:
                self.engine.close()  # answer with our close_notify
                self._shutdown(None)
                return
            except (TlsAlertReceived, TlsProtocolError) as err:
                self._shutdown(err)
                return
            if not data:
                return
            self._deliver(data)

    def _shutdown(self, reason: Exception | None) -> None:
        self._flush()
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        self._end(reason)

    def _deliver(self, data: bytes) -> None:
        if self._backlog is not None:
            self._backlog.append(data)
        elif self._on_data is not None:
            self._on_data(data)

    def _end(self, reason: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_reason = _detached(reason)
        if self._backlog is None:
            self._report_close()

    def _report_close(self) -> None:
        if self._close_reported or self._on_close is None:
            return
        self._close_reported = True
        self._on_close(self._end_reason)

    def _release_backlog(self) -> None:
        backlog, self._backlog = self._backlog, None
        if self._on_data is not None:
            for chunk in backlog or ():
                self._on_data(chunk)
        self._held = False
        self._update_reading()
        if self._ended:
            self._report_close()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            return
        paused = self._user_paused or self._held or self._backlog_paused or self._yielding
        if paused and transport.is_reading():
            transport.pause_reading()
        elif not paused and not transport.is_reading():
            transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _detached(err: Exception | None) -> Exception | None:
    """Drop traceback and chained context: they pin this connection's frames (and the
    whole connection) for as long as a caller keeps the error, e.g. in a log buffer."""
    if err is not None:
        err.__traceback__ = None
        err.__context__ = None
        err.__cause__ = None
    return err


async def connect(
    host: str, port: int, ctx: ssl.SSLContext, *, server_hostname: str, timeout: float
) -> TlsConnection:
    """Open a TCP connection and complete the TLS handshake as a client.

    Raises ``TlsHandshakeError`` when we refuse the gateway (wrong CA, pinned name
    mismatch, no vpnd/1), ``TlsAlertReceived`` when the gateway aborts the handshake
    (e.g. protocol_version), ``OSError`` for TCP failures and ``TimeoutError`` when
    TCP + handshake take longer than ``timeout``. Returns as soon as *our* side of the
    handshake is done: in TLS 1.3 a refusal of our certificate arrives afterwards, as
    ``on_close(TlsAlertReceived(...))``.
    """
    loop = asyncio.get_running_loop()
    engine = TlsEngine(ctx, server_side=False, server_hostname=server_hostname)
    done: asyncio.Future[None] = loop.create_future()

    def on_handshake(_conn: TlsConnection, err: Exception | None) -> None:
        if done.done():
            return
        if err is None:
            done.set_result(None)
        else:
            done.set_exception(err)

    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, conn = await loop.create_connection(
                lambda: TlsConnection(engine, on_handshake), host, port
            )
            await done
    except TlsError:
        raise  # the connection already sent its alert and closed itself
    except TimeoutError:
        done.cancel()
        if transport is not None:
            transport.abort()
        raise TimeoutError(f"no TLS session with {host}:{port} within {timeout:g}s") from None
    except BaseException:
        done.cancel()
        if transport is not None:
            transport.abort()
        raise
    return conn


OnConnection = Callable[[TlsConnection], Awaitable[None] | None]
OnRefused = Callable[[Peername | None, TlsHandshakeError], None]


async def serve(
    host: str,
    port: int,
    ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],
    on_connection: OnConnection,
    *,
    handshake_timeout: float = 10.0,
    on_refused: OnRefused | None = None,
    max_pending: int | None = None,
    max_pending_per_source: int | None = None,
    max_write_backlog: int | None = None,
    max_pending_per_subnet: int | None = None,
    min_evict_age: float = 1.0,
) -> asyncio.Server:
    """Listen for TLS clients; call ``on_connection`` for each completed handshake.

    A failed handshake gets its alert sent, the TCP connection closed, and
    ``on_refused(peername, err)`` called; nothing else is kept. Besides alert codes,
    ``err.reason`` can be "handshake_timeout" (nothing, or too little, within
    ``handshake_timeout``: slowloris) or "connection_lost" (the client hung up);
    ``err.by_peer`` marks a handshake the *client* aborted with an alert.
    """
    listener = _Listener(
        ctx,
        on_connection,
        on_refused,
        HandshakeSlots(
            max_total=max_pending,
            max_per_source=max_pending_per_source,
            max_per_subnet=max_pending_per_subnet,
            min_age=min_evict_age,
        ),
        handshake_timeout=handshake_timeout,
        max_write_backlog=max_write_backlog,
    )
    return await asyncio.get_running_loop().create_server(listener.factory, host, port)


class _Listener:
    """What ``serve()`` keeps for one listening socket: the pending handshakes and the
    ``on_connection`` tasks."""

    def __init__(
        self,
        ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],
        on_connection: OnConnection,
        on_refused: OnRefused | None,
        slots: HandshakeSlots[int],
        *,
        handshake_timeout: float,
        max_write_backlog: int | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctx = ctx
        self._on_connection = on_connection
        self._on_refused = on_refused
        # Unauthenticated connections are bounded in total, per source address and per
        # /24 (/64), so a handshake flood cannot exhaust memory, descriptors or CPU for
        # the peers we trust; when the table is full the oldest silent one makes room.
        self._slots = slots
        self._waiting: dict[int, TlsConnection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handshake_timeout = handshake_timeout
        self._max_write_backlog = max_write_backlog

    def factory(self) -> TlsConnection:
        # A callable context lets the gateway swap in a new CRL for new handshakes.
        ctx = self._ctx
        engine = TlsEngine(ctx() if callable(ctx) else ctx, server_side=True)
        return TlsConnection(
            engine,
            self._on_handshake,
            handshake_timeout=self._handshake_timeout,
            max_write_backlog=self._max_write_backlog,
            admit=self._admit,
        )

    def _admit(self, conn: TlsConnection) -> bool:
        source = conn.peername[0] if conn.peername else "?"
        waiting = self._waiting
        verdict = self._slots.admit(
            id(conn), source, self._loop.time(), heard=lambda k: waiting[k].handshake_bytes > 0
        )
        for key in verdict.evict:
            victim = waiting.pop(key, None)
            if victim is not None:
                victim.evict()
        if not verdict.admitted:
            return False
        waiting[id(conn)] = conn
        return True

    def _release(self, conn: TlsConnection) -> None:
        if self._waiting.get(id(conn)) is conn:
            del self._waiting[id(conn)]
            self._slots.release(id(conn))

    def _refused(self, peer: Peername | None, err: TlsHandshakeError) -> None:
        log.debug("TLS handshake from %s refused: %s", peer, err)
        if self._on_refused is not None:
            try:
                self._on_refused(peer, err)
            except Exception:
                log.exception("on_refused callback failed")

    def _on_handshake(self, conn: TlsConnection, err: Exception | None) -> None:
        self._release(conn)
        if err is not None:
            refusal = _as_refusal(err)
            if refusal.presented is None:
                refusal.presented = conn.engine.presented_leaf_der()  # name + serial for audit
            self._refused(conn.peername, refusal)
            return
        try:
            result = self._on_connection(conn)
        except Exception:
            log.exception("on_connection failed for %s", conn.peername)
            conn.abort()
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            tasks = self._tasks
            tasks.add(task)
            task.add_done_callback(lambda t: _task_done(t, tasks, conn))


def _task_done(task: asyncio.Task[Any], tasks: set[asyncio.Task[Any]], conn: TlsConnection) -> None:
    tasks.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("on_connection task for %s failed: %r", conn.peername, exc)
        conn.abort()


def _as_refusal(err: Exception) -> TlsHandshakeError:
    if isinstance(err, TlsHandshakeError):
        return err
    if isinstance(err, TlsAlertReceived):
        return TlsHandshakeError(
            err.alert, f"the client aborted the handshake: {err}", sent_alert=False, by_peer=True
        )
    return TlsHandshakeError("connection_lost", str(err) or repr(err), sent_alert=False)


def _implements_stream(conn: TlsConnection) -> Stream:
    return conn  # mypy checks that TlsConnection satisfies the Stream protocol
