"""Drives one sans-I/O ``Session`` over one ``TlsConnection``: the only code that
reads the clock or arms timers for a session (aioquic's QuicConnectionProtocol role).

The session runs on the monotonic clock (``mono``, the event loop's time by default);
the wall clock (``wall``) is read only to re-anchor a certificate expiry at each
timer tick, so a stepped wall clock never ends a healthy tunnel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from vpnd.proto import CloseCode, Event, Session, SessionClosed
from vpnd.transport.stream import Stream

Clock = Callable[[], float]


class SessionDriver:
    """Feeds TLS bytes into the session, sends what it queues, fires its timers.

    ``on_event`` receives every protocol event; ``on_lost`` is called exactly once when
    the session is over, however it ended (CLOSE either way, timeout, TCP loss, alert).
    """

    def __init__(
        self,
        conn: Stream,
        session: Session,
        *,
        on_event: Callable[[Event], None],
        on_lost: Callable[[int, str, BaseException | None], None],
        mono: Clock | None = None,
        wall: Clock = time.time,
    ) -> None:
        self.conn = conn
        self.session = session
        self._on_event = on_event
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._clock: Clock = mono or self._loop.time
        self._wall = wall
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._done = False

    def start(self) -> None:
        self.conn.set_receiver(self._on_data, self._on_conn_closed)
        self.pump()

    def now(self) -> float:
        """Monotonic time, the session's timebase."""
        return self._clock()

    def set_expiry(self, not_after: float, code: CloseCode, message: str) -> None:
        """Close with ``code`` when the wall clock reaches ``not_after`` (Unix seconds)."""
        self.session.set_expiry(not_after, code, message, now=self._clock(), wall=self._wall())
        if self._timer is not None:
            self._rearm()

    def _on_data(self, data: bytes) -> None:
        if self._done:
            return
        self.session.receive_data(data, self._clock())
        self.pump()

    def pump(self) -> None:
        """Deliver events, flush output, re-arm the timer. Call after any session input."""
        closed: SessionClosed | None = None
        while (event := self.session.next_event()) is not None:
            if isinstance(event, SessionClosed):
                closed = event
            if not self._done:
                self._on_event(event)
        self.flush()
        if closed is not None:
            self._finish(closed.code, closed.message, None)
            return
        self._rearm()

    def flush(self) -> None:
        out = self.session.data_to_send()
        if out and not self._done:
            self.conn.write(out)

    def close(self, code: CloseCode, message: str) -> None:
        """Close with a CLOSE frame the peer will see, then close TLS."""
        if self._done:
            return
        self.session.close(code, message, self._clock())
        self.pump()

    def _rearm(self) -> None:
        when = self.session.get_timer()
        if when is None or self._done:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        # Every packet moves the keepalive deadlines later; a timer already set to fire
        # no later than needed is kept (it re-arms when it fires early), so the data
        # path does not allocate and cancel a timer per packet.
        if self._timer is not None and self._timer_when <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_later(max(0.0, when - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._done:
            return
        self.session.handle_timer(self._clock(), self._wall())
        self.pump()

    def _on_conn_closed(self, exc: Exception | None) -> None:
        if self._done:
            return
        reason = "connection closed by peer" if exc is None else str(exc) or type(exc).__name__
        self._finish(int(CloseCode.NORMAL) if exc is None else -1, reason, exc)

    def _finish(self, code: int, message: str, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.conn.close()
        self._on_lost(code, message, exc)
