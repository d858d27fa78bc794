"""Sans-I/O TLS: an ``ssl.SSLObject`` over two ``ssl.MemoryBIO``s. No sockets, no asyncio.

Why not asyncio's TLS transport: on a failed handshake it closes without sending the
alert, so a refused client sees a bare EOF. Here the alert record stays in
``outgoing()`` after ``handshake()`` raises, and the caller sends it before closing.

TLS 1.3 note: a client's handshake completes *before* the server has judged the client
certificate. A refusal by the server therefore reaches the client on its first
``read()``, as ``TlsAlertReceived``.

ALPN: CPython's server-side ALPN callback answers "no overlap" by just not selecting a
protocol (it cannot send no_application_protocol). So each side checks the outcome once
the handshake completes, and refuses with reason "no_application_protocol"; the only
thing it can still send then is a close_notify, which is queued in ``outgoing()``.
"""

from __future__ import annotations

import ssl

from vpnd.transport.alerts import alert_from_ssl_error, describe_alert, is_peer_alert
from vpnd.transport.tlsctx import ALPN

# One TLS record carries at most 16 KiB of plaintext; read several per call.
_READ_SIZE = 256 * 1024


class TlsError(Exception):
    """Base class of the TLS edge's errors; ``str(err)`` is one line."""


class TlsHandshakeError(TlsError):
    """We refused the handshake (our verification failed, or the peer broke TLS).

    ``reason`` is a stable alert code (see ``vpnd.transport.alerts``); when
    ``sent_alert`` is true, ``TlsEngine.outgoing()`` holds the alert record to send.
    ``by_peer`` is true only for refusals reported by ``serve(on_refused=...)`` where it
    was the *peer* that aborted the handshake with an alert.
    """

    def __init__(self, reason: str, detail: str, *, sent_alert: bool, by_peer: bool = False):
        super().__init__(f"TLS handshake failed ({reason}): {detail}")
        self.reason = reason
        self.detail = detail
        self.sent_alert = sent_alert
        self.by_peer = by_peer
        self.presented: bytes | None = None
        """DER of the leaf certificate the peer presented, if it sent one (for the audit
        log's name and serial; never logged itself)."""


class TlsAlertReceived(TlsError):
    """The peer aborted the connection with a fatal alert; ``alert`` is its stable code."""

    def __init__(self, alert: str) -> None:
        super().__init__(f"peer sent TLS alert {alert}: {describe_alert(alert)}")
        self.alert = alert


class TlsClosed(TlsError):
    """The peer closed the TLS session cleanly (close_notify)."""

    def __init__(self) -> None:
        super().__init__("peer closed the TLS session (close_notify)")


class TlsProtocolError(TlsError):
    """After the handshake, the peer sent something that broke TLS (e.g. a bad record).

    OpenSSL has queued the matching alert in ``outgoing()``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"TLS protocol error ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class TlsStateError(TlsError):
    """The engine was used out of order (e.g. ``write()`` before the handshake): a bug."""


class TlsEngine:
    """One TLS session, driven by bytes in and bytes out.

    Typical loop: ``receive(ciphertext)``, then ``handshake()`` until it returns True,
    then ``read()``; after every call send ``outgoing()`` to the peer.
    """

    alpn: str | None
    """Negotiated ALPN protocol (always ``"vpnd/1"`` once the handshake succeeded)."""
    version: str | None
    """Negotiated TLS version (``"TLSv1.3"``), None before the handshake."""

    def __init__(
        self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        if not server_side and ctx.check_hostname and not server_hostname:
            raise ValueError("a client TlsEngine needs server_hostname (the pinned gateway name)")
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self._server_side = server_side
        self._established = False
        self._closing = False
        self._failure: TlsError | None = None
        self.alpn = None
        self.version = None

    @property
    def server_side(self) -> bool:
        return self._server_side

    @property
    def established(self) -> bool:
        """True once ``handshake()`` has returned True."""
        return self._established

    def receive(self, data: bytes | memoryview) -> None:
        """Feed ciphertext from the peer."""
        self._incoming.write(data)

    def outgoing(self) -> bytes:
        """Drain ciphertext to send to the peer (b"" when there is none)."""
        return self._outgoing.read()

    def handshake(self) -> bool:
        """Advance the handshake. True once done.

        Raises ``TlsHandshakeError`` when we refuse (alert, if any, left in
        ``outgoing()``) and ``TlsAlertReceived`` when the peer aborted with an alert.
        After a failure every further call raises the same error.
        """
        if self._established:
            return True
        if self._failure is not None:
            raise self._failure
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as err:
            self._failure = self._handshake_failure(err)
            raise self._failure from None
        alpn = self._obj.selected_alpn_protocol()
        if alpn != ALPN:
            self._queue_close_notify()
            offered = "the peer offered no ALPN or not vpnd/1"
            self._failure = TlsHandshakeError(
                "no_application_protocol",
                f"{offered}; expected {ALPN!r}, got {alpn!r}",
                sent_alert=False,
            )
            raise self._failure
        self.alpn = alpn
        self.version = self._obj.version()
        self._established = True
        return True

    def read(self, max_bytes: int | None = None) -> bytes:
        """All application data decrypted so far (b"" if none), or at most ``max_bytes``
        of it (the rest stays buffered for the next call).

        Raises ``TlsClosed`` on the peer's close_notify, ``TlsAlertReceived`` on a fatal
        alert, ``TlsProtocolError`` on a corrupt stream. Data that arrived before the
        close is returned first; the close is raised by the next call (and every later
        one).
        """
        self._require_established("read")
        if self._failure is not None:
            raise self._failure
        chunks: list[bytes] = []
        incoming, obj = self._incoming, self._obj
        left = _READ_SIZE if max_bytes is None else max_bytes
        while left > 0 or max_bytes is None:
            # Nothing buffered on either side of OpenSSL: skip the read that would only
            # raise SSLWantReadError (an exception per chunk on the per-packet path).
            if not incoming.pending and not obj.pending():
                break
            try:
                chunk = obj.read(_READ_SIZE if max_bytes is None else min(left, _READ_SIZE))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._failure = TlsClosed()
                break
            except ssl.SSLError as err:
                alert = alert_from_ssl_error(err)
                if is_peer_alert(err):
                    self._failure = TlsAlertReceived(alert)
                else:
                    self._failure = TlsProtocolError(alert, _detail(err))
                break
            if not chunk:
                # CPython returns b"" (not SSLZeroReturnError) for a close_notify when
                # we have not sent ours yet.
                self._failure = TlsClosed()
                break
            chunks.append(chunk)
            left -= len(chunk)
        if chunks:
            return b"".join(chunks)
        if self._failure is not None:
            raise self._failure
        return b""

    def write(self, data: bytes | memoryview) -> None:
        """Encrypt application data; the records appear in ``outgoing()``."""
        self._require_established("write")
        if self._closing:
            raise TlsStateError("write() after close(): the TLS session is closing")
        if self._failure is not None:
            raise self._failure
        if len(data) == 0:
            return
        # MemoryBIO never blocks and partial writes are off: one call writes it all.
        self._obj.write(data)

    def close(self) -> None:
        """Queue a close_notify (idempotent). Nothing is sent for an unfinished handshake."""
        if self._closing:
            return
        self._closing = True
        if self._established:
            self._queue_close_notify()

    def peer_chain_der(self) -> list[bytes]:
        """The peer's verified chain as DER, leaf first (root included)."""
        self._require_established("peer_chain_der")
        public = getattr(self._obj, "get_verified_chain", None)  # Python >= 3.13
        if public is not None:
            return [bytes(der) for der in public()]
        private = getattr(getattr(self._obj, "_sslobj", None), "get_verified_chain", None)
        if private is not None:
            chain = private()
            if chain:
                return [bytes(cert.public_bytes(ssl._ssl.ENCODING_DER)) for cert in chain]  # type: ignore[attr-defined]
        leaf = self._obj.getpeercert(binary_form=True)
        return [leaf] if leaf else []

    def presented_leaf_der(self) -> bytes | None:
        """The leaf certificate the peer sent, as DER, also after a *failed* handshake.

        OpenSSL keeps the chain it tried to verify even when verification fails (the
        leaf first); ``getpeercert()`` refuses before the handshake is complete.
        """
        for obj in (self._obj, getattr(self._obj, "_sslobj", None)):
            get = getattr(obj, "get_verified_chain", None)
            if get is None:
                continue
            try:
                chain = get()
            except (ssl.SSLError, ValueError):
                return None
            if not chain:
                return None
            first = chain[0]
            if isinstance(first, bytes | bytearray):
                return bytes(first)
            return bytes(first.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
        return None

    def _queue_close_notify(self) -> None:
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # expected: unwrap waits for the peer's close_notify, which we don't need
        except ssl.SSLError:
            pass  # the session is already broken; there is nothing more to say

    def _require_established(self, what: str) -> None:
        if not self._established:
            raise TlsStateError(f"{what}() before the TLS handshake completed")

    def _handshake_failure(self, err: ssl.SSLError) -> TlsError:
        alert = alert_from_ssl_error(err)
        if is_peer_alert(err):
            return TlsAlertReceived(alert)
        return TlsHandshakeError(alert, _detail(err), sent_alert=self._outgoing.pending > 0)


def _detail(err: ssl.SSLError) -> str:
    message = getattr(err, "verify_message", None)
    if isinstance(message, str) and message:
        return message
    reason = getattr(err, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return str(err)
