"""The client renews its own certificate over the live session, on its own.

At about ``renewal.at`` of the certificate's lifetime (with jitter), or at once on a
RENEW_HINT or ``vpnctl renew``: a new key of the same type, a CSR over the tunnel,
the answer verified (our name, our new key, a chain to ``pki.ca``), key and
certificate written together (key 0600), then the live tunnel moves onto the new
certificate make-before-break (``Client.rotate``). A session the gateway admitted
only to renew (quarantine) is closed after the renewal, and the client connects again
at once with the new certificate. A failure is one log line and a bounded backoff;
nothing here ever stops the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from vpnd.client.runner import Client, RenewalUnavailable
from vpnd.config import ClientConfig
from vpnd.control.results import RenewalStatus
from vpnd.control.summaries import iso_utc
from vpnd.pki import TrustStore, verify_peer
from vpnd.pki.authority import csr_for
from vpnd.pki.file_set import write_together
from vpnd.pki.identity import PeerIdentity, PkiError, Role
from vpnd.pki.keys import PrivateKey, generate_key, key_type, private_key_pem
from vpnd.proto import RefusalCode, RenewalRefused
from vpnd.proto.renewal import RenewalSchedule

log = logging.getLogger("vpnd.client.renewal")

POLL = 60.0
"""Longest sleep between looks at the schedule: a stepped wall clock is seen by then."""
NOT_CONNECTED_POLL = 1.0
"""How often a due renewal looks for a live session."""
JITTER = 0.05
MIN_RENEWAL_GAP = 60.0
"""Seconds between two scheduled renewals at least (a tenth of the lifetime if shorter)."""
"""Spread of the renewal point, a fraction of the lifetime (less near the ends)."""
MAX_CHAIN = 4
"""Certificates accepted in a RENEW_ISSUED answer (leaf, issuer, and some slack)."""

_SHA256 = hashes.SHA256()


class RenewalError(Exception):
    """A renewal attempt failed; ``str()`` is one line (never key or certificate bytes)."""


@dataclass(frozen=True)
class Renewed:
    """A verified renewed certificate."""

    identity: PeerIdentity
    leaf: x509.Certificate
    pem: bytes
    """Leaf then chain, re-encoded from the parsed certificates (what we write)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise RenewalError("our certificate has no single common name to renew under")
    return cns[0].value


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:  # pragma: no cover - every vpnd key type has it
        raise RenewalError("unsupported public key")
    der: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def verify_renewed(
    pem: bytes, *, name: str, key: PrivateKey, trust: TrustStore, now: dt.datetime
) -> Renewed:
    """Check what the gateway sent: a leaf for ``name`` carrying ``key``'s public key,
    chaining to ``trust`` (via an intermediate sent after the leaf, if any)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise RenewalError(
            f"the gateway sent an unreadable certificate ({_first_line(err)})"
        ) from None
    if not 1 <= len(certs) <= MAX_CHAIN:
        raise RenewalError(f"the gateway sent {len(certs)} certificates (1..{MAX_CHAIN})")
    leaf = certs[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise RenewalError("the renewed certificate does not carry the key we generated")
    try:
        identity = verify_peer(certs, now=now, role=Role.PEER, trust=trust)
    except PkiError as err:
        raise RenewalError(f"the renewed certificate does not verify: {err}") from None
    if identity.name != name:
        raise RenewalError(f"the renewed certificate names {identity.name!r}, not us ({name!r})")
    out = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return Renewed(identity=identity, leaf=leaf, pem=out)


def refusal_line(event: RenewalRefused) -> str:
    try:
        code = RefusalCode(event.code).name.lower()
    except ValueError:
        code = f"code {event.code}"
    if event.local:
        return event.message
    return f"the gateway refused the renewal ({code}): {event.message or 'no reason given'}"


def generation_of(identity: PeerIdentity | None) -> int | None:
    """The certificate's generation counter (None while no identity is known)."""
    return identity.generation if identity is not None else None


Adopt = Callable[[bool], Awaitable[bool]]
"""Load the renewed files; ``True`` argument: also move the live tunnel onto them.
Returns whether the live tunnel moved (always False when not asked to)."""


class Renewer:
    """Renews the client's certificate; ``run()`` is a background task."""

    def __init__(
        self,
        client: Client,
        *,
        config: Callable[[], ClientConfig],
        own: Callable[[], x509.Certificate],
        trust: Callable[[], TrustStore],
        passphrase: Callable[[], bytes | None],
        adopt: Adopt,
        wall: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._own = own
        self._trust = trust
        self._passphrase = passphrase
        self._adopt = adopt
        self._wall = wall
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._schedule: tuple[bytes, float, RenewalSchedule] | None = None
        self._identity: tuple[bytes, PeerIdentity | None] | None = None
        self._hinted = False
        self.state = "scheduled"
        """For status: scheduled, renewing, backoff, waiting for the tunnel, disabled."""
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_renewed: float | None = None
        client.on_renew_hint = lambda hint: self.kick()

    # ---- schedule ------------------------------------------------------------------

    def schedule(self) -> RenewalSchedule:
        """The schedule of the certificate in use (a new one when it changed)."""
        cert = self._own()
        fp = cert.fingerprint(_SHA256)
        at = self._config().renewal.at
        cached = self._schedule
        if cached is None or cached[0] != fp or cached[1] != at:
            sched = RenewalSchedule(
                cert.not_valid_before_utc.timestamp(),
                cert.not_valid_after_utc.timestamp(),
                at=at,
                jitter=min(JITTER, at / 2, (1.0 - at) / 2),
                rng=self._rng,
            )
            if self.last_renewed is not None:
                gap = min(MIN_RENEWAL_GAP, sched.lifetime / 10)
                sched.defer_until(self.last_renewed + gap)
            if self._hinted:
                sched.hint()
            cached = (fp, at, sched)
            self._schedule = cached
        return cached[2]

    def kick(self) -> None:
        """Renew at once (a RENEW_HINT from the gateway, or an operator)."""
        self._hinted = True
        if self._schedule is not None:
            self._schedule[2].hint()  # a new schedule starts hinted (see schedule())
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        self._wake.clear()

    def _ready(self) -> bool:
        return self._client.connected.is_set() or self._client.quarantined

    # ---- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Look at the schedule, renew when due, forever (cancel to stop)."""
        while True:
            try:
                await self.look()
            except Exception as err:  # a bug here must not end renewal, nor the client
                log.error("renewal check failed: %s: %s", type(err).__name__, err)
                await self._sleep(POLL)

    async def look(self) -> None:
        """One look: renew if due and a session is up, else sleep until the next look."""
        if not self._config().renewal.enabled:
            self.state = "disabled"
            await self._sleep(POLL)
            return
        try:
            sched = self.schedule()
        except ValueError as err:  # a certificate with an unusable validity period
            self.state = "disabled"
            log.error("cannot schedule renewal of our certificate: %s", err)
            await self._sleep(POLL)
            return
        wall = self._wall()
        if not sched.due(wall):
            self.state = "backoff" if sched.failures else "scheduled"
            await self._sleep(min(sched.seconds_until(wall), POLL))
            return
        if not self._ready():
            self.state = "waiting for the tunnel"
            await self._sleep(NOT_CONNECTED_POLL)
            return
        await self.renew_now()

    async def renew_now(self) -> Renewed | None:
        """One renewal attempt now, whatever the schedule (``vpnctl renew``); None if
        it failed (logged, and the schedule backs off)."""
        async with self._lock:
            sched = self.schedule()
            started = self._wall()
            self.state = "renewing"
            try:
                renewed = await self._renew_once()
            except Exception as err:  # never let a renewal take the client down
                self._failed(sched, started, err)
                return None
            self._hinted = False
            self.renewals += 1
            self.failures = 0
            self.last_error = None
            self.last_renewed = self._wall()
            self.state = "scheduled"
            return renewed

    def _failed(self, sched: RenewalSchedule, started: float, err: Exception) -> None:
        known = (RenewalError, RenewalUnavailable, PkiError, OSError)
        text = _first_line(err) if isinstance(err, known) else f"{type(err).__name__}: {err}"
        self._hinted = False
        delay = sched.failed(started)
        self.failures += 1
        self.last_error = text
        self.state = "backoff"
        log.error("certificate renewal failed: %s; next try in %.0f s", text, delay)

    async def _renew_once(self) -> Renewed:
        own = self._own()
        name = common_name(own)
        key = generate_key(key_type(own.public_key()))
        csr = csr_for(name=name, key=key).public_bytes(serialization.Encoding.DER)
        answer = await self._client.request_renewal(csr)
        if isinstance(answer, RenewalRefused):
            raise RenewalError(refusal_line(answer))
        now = dt.datetime.fromtimestamp(self._wall(), dt.UTC)
        renewed = verify_renewed(answer.pem, name=name, key=key, trust=self._trust(), now=now)
        pki = self._config().pki
        write_together(
            [
                (pki.key, private_key_pem(key, self._passphrase()), 0o600),
                (pki.cert, renewed.pem, 0o644),
            ]
        )
        ident = renewed.identity
        gen = generation_of(ident)
        log.info(
            "renewed our certificate over the tunnel: serial %s, fingerprint %s, valid until %s%s",
            ident.serial_hex,
            ident.fingerprint[:16],
            iso_utc(ident.not_after),
            f", generation {gen}" if gen is not None else "",
        )
        self._identity = (renewed.leaf.fingerprint(_SHA256), ident)
        await self._switch()
        return renewed

    async def _switch(self) -> None:
        """Load the new files and move onto them: live (make-before-break), or by a new
        connection when the session was quarantined or the live move failed."""
        client = self._client
        if client.quarantined:
            await self._adopt(False)
            client.reconnect_now("renewed the expired certificate: reconnecting with it")
            return
        if await self._adopt(True):
            return
        if client.reconnect_now("moving onto the renewed certificate"):
            log.warning("the live tunnel could not move onto the renewed certificate: reconnecting")

    # ---- status --------------------------------------------------------------------

    def _own_identity(self, cert: x509.Certificate, wall: float) -> PeerIdentity | None:
        """Our certificate as the gateway sees it (for its generation), verified at a
        moment inside its validity so an expired one still shows."""
        fp = cert.fingerprint(_SHA256)
        if self._identity is None or self._identity[0] != fp:
            nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
            when = min(max(nb, dt.datetime.fromtimestamp(wall, dt.UTC)), na)
            try:
                ident: PeerIdentity | None = verify_peer(
                    [cert], now=when, role=Role.PEER, trust=self._trust()
                )
            except PkiError:
                ident = None
            self._identity = (fp, ident)
        return self._identity[1]

    def status(self) -> RenewalStatus:
        cert = self._own()
        wall = self._wall()
        enabled = self._config().renewal.enabled
        next_at = ""
        if enabled:
            with contextlib.suppress(ValueError):
                when = self.schedule().next_attempt_wall()
                next_at = (
                    "now" if when <= wall else iso_utc(dt.datetime.fromtimestamp(when, dt.UTC))
                )
        last = self.last_renewed
        return RenewalStatus(
            enabled=enabled,
            state=self.state if enabled else "disabled",
            cert_age_s=wall - cert.not_valid_before_utc.timestamp(),
            not_after=iso_utc(cert.not_valid_after_utc),
            generation=generation_of(self._own_identity(cert, wall)),
            next_renewal=next_at,
            renewals=self.renewals,
            failures=self.failures,
            last_error=self.last_error,
            last_renewed=iso_utc(dt.datetime.fromtimestamp(last, dt.UTC)) if last else None,
            quarantined=self._client.quarantined,
        )
