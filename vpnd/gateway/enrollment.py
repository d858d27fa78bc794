"""The gateway's enrollment path: what a TLS connection *without* a client certificate gets.

Only with ``enrollment.enabled`` (the TLS context then makes the client certificate
optional; one that is sent is still verified in the handshake). Such a connection never
reaches admission, CONFIG or the TUN: ``Gateway.on_connection`` hands it here, and all
it can do is read the CA bundle and redeem one invite.

Bounded on every side: a token bucket of its own (``enrollment.rate``/``burst``, all
sources together) charged per connection, a cap on connections in progress, per-frame
size limits (``vpnd.proto.enrollment``), one request per connection and a timeout.
The redeeming itself (SQLite + signing) runs in an executor, off the event loop.

Audit: one line per redeem attempt, ``event`` ``enroll_issued`` or ``enroll_refused``,
with the invite id, the name, the reason code, the serial; never the secret, the CSR
or the certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from vpnd.gateway.audit import fmt_remote
from vpnd.pki.enrollment import (
    CA_FILE,
    CERT_FILE,
    CODE_BAD_CSR,
    CODE_EXPIRED,
    CODE_INVALID,
    CODE_USED,
    KEY_FILE,
    Enrolled,
    EnrollmentRefused,
)
from vpnd.proto.enrollment import (
    BUNDLE_MAX,
    EnrollClosed,
    EnrollIssued,
    EnrollmentReader,
    EnrollMessage,
    EnrollRefusal,
    EnrollRequest,
    encode_ca,
    encode_issued,
    encode_refused,
)
from vpnd.proto.errors import ProtocolError
from vpnd.transport.stream import Stream

log = logging.getLogger("vpnd.gateway.enrollment")
audit = logging.getLogger("vpnd.audit")

Redeem = Callable[[EnrollRequest, dt.datetime], Enrolled]
"""Blocking: redeem the invite and sign (``vpnd.pki.enrollment.redeem_invite`` over a
freshly opened inventory); raises ``EnrollmentRefused``."""

_CODES = {
    CODE_INVALID: EnrollRefusal.INVALID,
    CODE_USED: EnrollRefusal.USED,
    CODE_EXPIRED: EnrollRefusal.EXPIRED,
    CODE_BAD_CSR: EnrollRefusal.BAD_CSR,
}


ANSWER_ROOM = 16 * 1024
"""Bytes of an ENROLL_ISSUED kept for the certificate chain and client.yaml."""


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; time is passed in."""

    rate: float
    burst: int
    _tokens: float = field(init=False)
    _at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class EnrollmentSettings:
    rate: float = 5.0
    burst: int = 10
    timeout: float = 10.0
    """Seconds a connection may take to send its request once TLS is up."""
    max_active: int = 32
    """Enrollment connections in progress at once; more are refused as busy."""
    server_name: str = ""
    """The DNS name clients pin (the gateway certificate's), for client.yaml."""


def client_yaml(enrolled: Enrolled, server_name: str) -> str:
    """The ready client.yaml; file names relative to it (it sits next to them)."""
    data = {
        "mode": "client",
        "server": enrolled.server,
        "server_name": server_name,
        "pki": {"ca": CA_FILE, "cert": CERT_FILE, "key": KEY_FILE},
    }
    head = (
        f"# Written by vpnd enroll for {enrolled.name} (serial {enrolled.serial_hex}); "
        "relative paths are next to this file.\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)


class EnrollmentHandler:
    def __init__(
        self,
        settings: EnrollmentSettings,
        *,
        ca_pem: Callable[[], bytes],
        redeem: Redeem,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._ca_pem = ca_pem
        self._redeem = redeem
        self._mono = mono
        self._wall = wall
        self._bucket = TokenBucket(settings.rate, settings.burst)
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts: dict[str, int] = {}
        """Outcomes: issued, refused_<code>, rate_limited, busy, timeout, bad_request."""

    @property
    def active(self) -> int:
        return len(self._tasks)

    def accept(self, stream: Stream) -> None:
        """A certless TLS connection: serve it, or refuse it at once when over a limit."""
        if self.active >= self.settings.max_active:
            self._turn_away(stream, "busy")
            return
        if not self._bucket.take(self._mono()):
            self._turn_away(stream, "rate_limited")
            return
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _turn_away(self, stream: Stream, why: str) -> None:
        self._count(why)
        log.debug("enrollment from %s turned away: %s", fmt_remote(stream.peername), why)
        stream.write(encode_refused(EnrollRefusal.RATE_LIMITED, why))
        stream.close()

    async def _serve(self, stream: Stream) -> None:
        remote = fmt_remote(stream.peername)
        inbox = _Inbox(stream)
        try:
            bundle = self._bundle()
            if bundle is None:
                stream.write(encode_refused(EnrollRefusal.UNAVAILABLE, "unavailable"))
                return
            stream.write(encode_ca(bundle))
            try:
                async with asyncio.timeout(self.settings.timeout):
                    msg = await inbox.next()
            except TimeoutError:
                self._count("timeout")
                log.debug("enrollment from %s timed out", remote)
                return
            except ProtocolError as err:
                self._count("bad_request")
                log.info("enrollment from %s: bad request: %s", remote, err)
                stream.write(encode_refused(EnrollRefusal.BAD_REQUEST, "bad request"))
                return
            if isinstance(msg, EnrollRequest):
                await self._answer(stream, msg, remote, bundle)
        except _Ended:
            pass  # the client hung up (after fetching the CA bundle, as it does)
        finally:
            stream.close()

    def _bundle(self) -> bytes | None:
        """The CA bundle, if it can be read and leaves room for the certificate and
        client.yaml in the answer (checked before an invite is spent, not after)."""
        try:
            bundle = self._ca_pem()
        except OSError as err:
            log.error("enrollment: cannot read the CA bundle: %s", err.strerror or err)
            return None
        if len(bundle) > BUNDLE_MAX - ANSWER_ROOM:
            log.error("enrollment: the CA bundle (%d bytes) is too large to send", len(bundle))
            return None
        return bundle

    async def _answer(self, stream: Stream, req: EnrollRequest, remote: str, bundle: bytes) -> None:
        now = dt.datetime.fromtimestamp(self._wall(), dt.UTC).replace(microsecond=0)
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(None, self._redeem, req, now)
        except EnrollmentRefused as err:
            self._refused(stream, req, remote, err)
            return
        except Exception as err:  # a signing bug must not take the gateway down
            log.error("enrollment of invite %s failed: %s", req.invite_id, err)
            self._refused(
                stream, req, remote, EnrollmentRefused("unavailable", f"internal error: {err}")
            )
            return
        self._count("issued")
        audit.info(
            "enrolled %s from %s: invite %s, serial %s, valid until %s",
            done.name,
            remote,
            req.invite_id,
            done.serial_hex,
            done.not_after.isoformat(),
            extra={
                "event": "enroll_issued",
                "remote": remote,
                "invite": req.invite_id,
                "peer": done.name,
                "serial": done.serial_hex,
            },
        )
        issued = EnrollIssued(
            name=done.name,
            serial=done.serial_hex,
            cert_pem=done.cert_pem,
            ca_pem=bundle,
            client_yaml=client_yaml(done, self.settings.server_name),
        )
        stream.write(encode_issued(issued))

    def _refused(
        self, stream: Stream, req: EnrollRequest, remote: str, err: EnrollmentRefused
    ) -> None:
        self._count(f"refused_{err.code}")
        who = f" ({err.name})" if err.name else ""
        audit.warning(
            "enrollment refused from %s: invite %s%s: %s",
            remote,
            req.invite_id,
            who,
            err.detail,
            extra={
                "event": "enroll_refused",
                "remote": remote,
                "invite": req.invite_id,
                "peer": err.name or "",
                "reason": err.code,
            },
        )
        code = _CODES.get(err.code, EnrollRefusal.UNAVAILABLE)
        stream.write(encode_refused(code, err.code))


class _Ended(Exception):
    """The client closed the connection."""


class _Inbox:
    """Messages from the client, in order; one request at most is expected."""

    def __init__(self, stream: Stream) -> None:
        self._reader = EnrollmentReader("gateway")
        self._queue: asyncio.Queue[EnrollMessage | BaseException] = asyncio.Queue()
        stream.set_receiver(self._on_data, self._on_close)

    def _on_data(self, data: bytes) -> None:
        try:
            msgs = self._reader.feed(data)
        except ProtocolError as err:
            self._queue.put_nowait(err)
            return
        for msg in msgs:
            self._queue.put_nowait(msg)

    def _on_close(self, reason: Exception | None) -> None:
        self._queue.put_nowait(_Ended())

    async def next(self) -> EnrollMessage:
        got = await self._queue.get()
        if isinstance(got, BaseException):
            raise got
        if isinstance(got, EnrollClosed):
            raise _Ended()
        return got
