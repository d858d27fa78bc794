"""The gateway's certificate lifecycle: renewal signing, supersede, the issuer's CRL, and
watching the inventory.

Signing and SQLite are blocking, so they run on one worker thread (serialised: the
inventory has one writer per gateway, and a renewal storm queues instead of piling up
threads); results come back to the event loop, which answers the session. The
inventory is polled by its change stamp (one cheap query per ``pki.inventory_poll``) and
re-read only when something changed; the view goes to the core, which cuts revoked
and superseded sessions and re-caps groups at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from vpnd.gateway.effects import Supersede
from vpnd.gateway.inventory_view import InventoryView, Standing
from vpnd.gateway.shell import Peer
from vpnd.pki.identity import PkiError, Role
from vpnd.pki.inventory import STATE_ACTIVE, CertRecord, Inventory
from vpnd.pki.issuer import Issuer, expiry_forecast
from vpnd.pki.renewal_signing import (
    NOT_CURRENT,
    PENDING_IDENTITY,
    REVOKED,
    SUPERSEDED,
    UNKNOWN_CERTIFICATE,
    UNKNOWN_IDENTITY,
    Signed,
    SigningRefused,
    sign_renewal,
    supersede,
    write_issuer_crl,
)
from vpnd.proto import LocalProtocolError
from vpnd.proto.renewal_frames import RefusalCode

log = logging.getLogger("vpnd.renewal")
audit = logging.getLogger("vpnd.audit")

RENEWAL_BURST = 30.0
RENEWAL_REFILL_S = 120.0
"""Per name: 30 renewals at once, then one every 2 minutes (a laptop needs one a week)."""

ISSUER_CRL_DAYS = 7
REFRESH_BEFORE = dt.timedelta(days=ISSUER_CRL_DAYS / 2)
"""The issuer CRL is re-signed when less than this is left before its nextUpdate."""

_CODES = {
    UNKNOWN_IDENTITY: RefusalCode.UNKNOWN_IDENTITY,
    PENDING_IDENTITY: RefusalCode.UNKNOWN_IDENTITY,
    UNKNOWN_CERTIFICATE: RefusalCode.UNKNOWN_IDENTITY,
    REVOKED: RefusalCode.REVOKED,
    SUPERSEDED: RefusalCode.REVOKED,
    NOT_CURRENT: RefusalCode.REVOKED,
}


def read_view(path: Path, now: dt.datetime, online_issuer: str | None = None) -> InventoryView:
    """The inventory as the gateway judges by it (blocking: run it off the loop)."""
    with Inventory.open(path) as inv:
        stamp = inv.change_stamp()
        certs = inv.all_certificates()
        identities = inv.identities()
    by_name: dict[str, list[CertRecord]] = {}
    for cert in certs:
        by_name.setdefault(cert.name, []).append(cert)
    by_serial = {c.serial: c for c in certs}
    names: dict[str, Standing] = {}
    for ident in identities:
        if ident.role is not Role.PEER or ident.state != STATE_ACTIVE:
            continue
        current = by_serial.get(ident.current_serial) if ident.current_serial else None
        valid = current is not None and current.status(now) == "valid"
        older = frozenset(
            c.serial
            for c in by_name.get(ident.name, ())
            if c.serial != ident.current_serial and c.status(now) == "valid"
        )
        names[ident.name] = Standing(
            groups=frozenset(ident.groups),
            generation=ident.generation,
            current_serial=ident.current_serial,
            current_not_after=current.not_after if valid and current is not None else None,
            older_valid=older,
        )
    return InventoryView(
        names=names,
        superseded=frozenset(c.serial for c in certs if c.superseded_at is not None),
        revoked=frozenset(c.serial for c in certs if c.revoked_at is not None),
        stamp=stamp,
        superseded_fingerprints=frozenset(
            c.fingerprint for c in certs if c.superseded_at is not None
        ),
        online_issuer=online_issuer,
    )


def _stamp(path: Path) -> int:
    with Inventory.open(path) as inv:
        return inv.change_stamp()


class GatewayLifecycle:
    """Renewals, supersede and the issuer CRL for one gateway (``Gateway.lifecycle``)."""

    def __init__(
        self,
        *,
        issuer: Issuer | None,
        inventory: Path,
        issuer_crl: Path | None,
        lifetime: float,
        renewal: bool = True,
        poll: float,
        apply_view: Callable[[InventoryView], None],
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        warn_days: int = 14,
    ) -> None:
        self.issuer = issuer
        self.renewal = renewal and issuer is not None
        """Sign renewals (else they are refused as not enabled; the view still applies)."""
        self.inventory = inventory
        self.issuer_crl = issuer_crl
        self.lifetime = lifetime
        self.poll = poll
        self._apply_view = apply_view
        self._wall = wall
        self._mono = mono
        self._warn_days = warn_days
        self._issuer_name = issuer.name if issuer is not None else None
        self.counts: Counter[str] = Counter()
        """renewals_<result> and supersedes: exported as metrics."""
        self.view: InventoryView | None = None
        self.read_error: str | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vpnd-issuer")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._crl_next_update: dt.datetime | None = None
        self._renewal_budget: dict[str, tuple[float, float]] = {}
        self._listed: frozenset[int] | None = None

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._wall(), dt.UTC)

    # ---- start and stop ------------------------------------------------------------

    def prepare(self) -> InventoryView:
        """At start, before the TLS context exists: the first view, and an issuer CRL on
        disk (OpenSSL needs one for every CA level). PkiError: the gateway does not start."""
        now = self._now()
        view = read_view(self.inventory, now, self._issuer_name)
        self._write_crl(now, view)
        self.view = view
        if self.issuer is None:
            return view
        warning = self.issuer_warning(now)
        if warning:
            log.warning("%s", warning)
        log.info(
            "online issuer %s (sha256 %s...) expires %s; renewed certificates live %gs",
            self.issuer.name,
            self.issuer.fingerprint[:16],
            self.issuer.not_after.isoformat(),
            self.lifetime,
        )
        return view

    def issuer_cert(self) -> x509.Certificate | None:
        return self.issuer.cert if self.issuer is not None else None

    def issuer_warning(self, now: dt.datetime) -> str | None:
        if self.issuer is None:
            return None
        return expiry_forecast(
            self.issuer.cert, now=now, lifetime_s=self.lifetime, warn_days=self._warn_days
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- the inventory watch -------------------------------------------------------

    def poke(self) -> None:
        """Re-read the inventory now (after our own write, or a `vpnctl update --now`)."""
        self._wake.set()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()
            try:
                await self._check(loop)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the watch must survive a locked or broken file
                self._read_failed(err)

    async def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        stamp = await loop.run_in_executor(self._pool, _stamp, self.inventory)
        now = self._now()
        stale_crl = self._crl_next_update is None or self._crl_next_update - now < REFRESH_BEFORE
        if self.view is not None and stamp == self.view.stamp and not stale_crl:
            return
        view = await loop.run_in_executor(self._pool, self._refresh, now)
        if self.read_error is not None:
            log.info("inventory %s readable again", self.inventory)
            self.read_error = None
        self.view = view
        self._apply_view(view)

    def _refresh(self, now: dt.datetime) -> InventoryView:
        view = read_view(self.inventory, now, self._issuer_name)
        self._write_crl(now, view)
        return view

    def _write_crl(self, now: dt.datetime, view: InventoryView) -> None:
        """Re-sign the issuer CRL when what it must list changed, or before it goes stale."""
        if self.issuer is None or self.issuer_crl is None:
            return
        listed = view.superseded | view.revoked
        fresh = self._crl_next_update is not None and self._crl_next_update - now >= REFRESH_BEFORE
        if fresh and listed == self._listed and self.issuer_crl.exists():
            return
        with Inventory.open(self.inventory) as inv:
            write_issuer_crl(inv, self.issuer, self.issuer_crl, now=now, days=ISSUER_CRL_DAYS)
        self._listed = listed
        self._crl_next_update = now + dt.timedelta(days=ISSUER_CRL_DAYS)

    def _read_failed(self, err: Exception) -> None:
        text = str(err) if isinstance(err, PkiError) else f"{type(err).__name__}: {err}"
        if text != self.read_error:
            log.error(
                "cannot read the inventory %s (%s): keeping the last view; group changes "
                "and supersedes wait until it is readable",
                self.inventory,
                text,
            )
        self.read_error = text

    # ---- renewals ------------------------------------------------------------------

    def _allow_renewal(self, name: str, now: float) -> float:
        """0 when ``name`` may renew now, else the seconds until it may: a peer looping
        renew/reconnect must not keep the issuer, the inventory and the CRL busy."""
        tokens, last = self._renewal_budget.get(name, (RENEWAL_BURST, now))
        tokens = min(RENEWAL_BURST, tokens + (now - last) / RENEWAL_REFILL_S)
        if tokens < 1:
            self._renewal_budget[name] = (tokens, now)
            return (1 - tokens) * RENEWAL_REFILL_S
        self._renewal_budget[name] = (tokens - 1, now)
        return 0.0

    def renew(self, peer: Peer, request_id: int, csr_der: bytes) -> None:
        """A live session asks for a renewal: sign off the loop, answer on it."""
        loop = asyncio.get_running_loop()
        started = self._mono()
        wait = self._allow_renewal(peer.identity.name, started)
        if wait:
            self.counts["renewals_refused"] += 1
            msg = f"too many renewals of this certificate: try again in {wait:.0f} s"
            audit.warning(
                "renewal of %s refused: %s",
                peer.identity.name,
                msg,
                extra={"event": "renewal", "result": "rate_limited", "peer": peer.identity.name},
            )
            with contextlib.suppress(LocalProtocolError):
                peer.driver.session.refuse_renewal(request_id, RefusalCode.BUSY, msg, started)
                peer.driver.flush()
            return
        future = loop.run_in_executor(self._pool, self._sign, peer, csr_der)
        future.add_done_callback(lambda f: self._answer(peer, request_id, f, started))

    def _sign(self, peer: Peer, csr_der: bytes) -> Signed:
        if self.issuer is None:
            raise PkiError("renewal is not enabled on this gateway")
        with Inventory.open(self.inventory) as inv:
            return sign_renewal(
                inv,
                self.issuer,
                presented=peer.identity,
                csr_der=csr_der,
                lifetime_s=self.lifetime,
                now=self._now(),
            )

    def _answer(
        self, peer: Peer, request_id: int, future: asyncio.Future[Signed], started: float
    ) -> None:
        if future.cancelled():
            return
        session = peer.driver.session
        now = self._mono()
        ident = peer.identity
        fields: dict[str, object] = {
            "event": "renewal",
            "peer": ident.name,
            "serial": ident.serial_hex,
            "remote": peer.remote,
        }
        err = future.exception()
        try:
            if err is None:
                signed = future.result()
                session.send_renewed(request_id, signed.cert_pem + signed.chain_pem, now)
                self.counts["renewals_issued"] += 1
                fields.update(
                    result="issued", new_serial=f"{signed.serial:x}", generation=signed.generation
                )
                audit.info(
                    "renewed %s: serial %s -> %x (generation %d, until %s) in %.0f ms",
                    ident.name,
                    ident.serial_hex,
                    signed.serial,
                    signed.generation,
                    signed.not_after.isoformat(),
                    (now - started) * 1000,
                    extra=fields,
                )
                self.poke()
            else:
                code, message = self._refusal(err)
                session.refuse_renewal(request_id, code, message, now)
                self.counts["renewals_refused"] += 1
                fields.update(result="refused", detail=message)
                audit.warning("renewal of %s refused: %s", ident.name, message, extra=fields)
        except LocalProtocolError:
            return  # the session ended while we signed: nothing to answer
        peer.driver.flush()

    def _refusal(self, err: BaseException) -> tuple[int, str]:
        if isinstance(err, SigningRefused):
            return _CODES.get(err.reason, RefusalCode.REFUSED), str(err)
        if isinstance(err, PkiError):
            return RefusalCode.REFUSED, str(err)
        self.counts["renewals_failed"] += 1
        log.error("renewal signing failed: %s: %s", type(err).__name__, err)
        return RefusalCode.INTERNAL, "the gateway could not sign; try again later"

    # ---- supersede -----------------------------------------------------------------

    def supersede(self, effect: Supersede) -> None:
        """The renewed certificate was used: its predecessors are superseded."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._supersede, effect)
        future.add_done_callback(lambda f: self._superseded(effect, f))

    def _supersede(self, effect: Supersede) -> int:
        now = self._now()
        marked = 0
        with Inventory.open(self.inventory) as inv:
            for old in sorted(effect.older):
                marked += supersede(inv, old_serial=old, new_serial=effect.serial, now=now)
        view = read_view(self.inventory, now, self._issuer_name)
        self._write_crl(now, view)
        return marked

    def _superseded(self, effect: Supersede, future: asyncio.Future[int]) -> None:
        if future.cancelled():
            return
        err = future.exception()
        olds = ", ".join(f"{s:x}" for s in sorted(effect.older))
        if err is not None:
            log.error("could not mark %s superseded for %s: %s", olds, effect.name, err)
            return
        self.counts["supersedes"] += future.result()
        audit.info(
            "%s: serial %s superseded by %x (published in the issuer CRL)",
            effect.name,
            olds,
            effect.serial,
            extra={"event": "superseded", "peer": effect.name, "old_serials": olds},
        )
        self.poke()
