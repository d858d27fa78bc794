"""Keeps the gateway's CA bundle and CRL current: live revocation, fail-closed on bad data.

The CRL file is watched by polling ``stat()`` (inode, size, mtime) every 0.2 s rather
than with inotify: `vpnctl revoke` replaces it by rename, admins copy it in over NFS or
config management, and a poll catches every one of those within the 1 s guarantee
while costing one syscall per tick. A changed file is loaded and checked, and then:
- new handshakes use a fresh OpenSSL context carrying the new CRL;
- every live session is re-checked, and the revoked ones are closed at once;
- a missing, unreadable or badly signed CRL makes the gateway refuse every new peer
  (fail closed) until it is fixed; live sessions keep the last good verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from vpnd.pki import TrustStore, load_trust_store
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import PkiError

log = logging.getLogger("vpnd.trust")

POLL_INTERVAL = 0.2

Fingerprint = tuple[int, int, int, int] | None


def _stat(path: Path | None) -> Fingerprint:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclasses.dataclass(frozen=True)
class CrlState:
    number: int
    next_update: dt.datetime | None
    revoked: int

    def stale(self, now: dt.datetime) -> bool:
        return self.next_update is not None and self.next_update < now


class TrustWatcher:
    """Owns the current TrustStore and server SSLContext; tells the gateway of changes."""

    def __init__(
        self,
        *,
        ca: Path,
        crl: Path,
        allow_stale: bool,
        make_context: Callable[[Path | None], ssl.SSLContext],
        on_trust: Callable[[TrustStore], list[str]],
        on_broken: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self.crl = crl
        self.allow_stale = allow_stale
        self._make_context = make_context
        self._on_trust = on_trust
        self._on_broken = on_broken
        self._clock = clock
        self._seen: tuple[Fingerprint, Fingerprint] = (None, None)
        self.trust: TrustStore | None = None
        self.context: ssl.SSLContext | None = None
        self.crl_state: CrlState | None = None
        self.broken: str | None = None
        self._stale_logged = False
        self._task: asyncio.Task[None] | None = None

    def load(self) -> TrustStore:
        """First load at start-up: raises PkiError (the daemon refuses to start)."""
        self._seen = (_stat(self.ca), _stat(self.crl))
        trust = load_trust_store(self.ca, self.crl, allow_stale_crl=self.allow_stale)
        self._adopt(trust)
        return trust

    def server_context(self) -> ssl.SSLContext:
        assert self.context is not None
        return self.context

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def _adopt(self, trust: TrustStore) -> None:
        crls = list(trust.crls)
        newest = max(crls, key=crl_number) if crls else None
        self.crl_state = (
            CrlState(
                number=crl_number(newest),
                next_update=newest.next_update_utc,
                revoked=sum(1 for _ in newest),
            )
            if newest is not None
            else None
        )
        self.trust = trust
        self.broken = None
        self._stale_logged = False
        self._rebuild_context()

    def _rebuild_context(self) -> None:
        # A stale CRL in OpenSSL fails the handshake with a misleading "certificate
        # expired" alert; without it, vpnd's own verifier refuses (or, with
        # crl_stale: allow, accepts with a warning) and tells the peer the real reason.
        stale = self.crl_state is not None and self.crl_state.stale(self._now())
        self.context = self._make_context(None if stale else self.crl)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                self.check()
            except Exception:  # the watcher must survive anything a file can do
                log.exception("trust watcher failed; retrying")

    def check(self) -> None:
        """One poll: reload on change, and notice a CRL going stale."""
        seen = (_stat(self.ca), _stat(self.crl))
        if seen != self._seen:
            self._seen = seen
            self.reload()
            return
        state = self.crl_state
        if state is not None and state.stale(self._now()) and not self._stale_logged:
            self._stale_logged = True
            self._rebuild_context()
            self._report_stale(state)

    def reload(self) -> list[str]:
        """Re-read CA + CRL now (file change, `vpnctl reload`, SIGHUP)."""
        try:
            trust = load_trust_store(self.ca, self.crl, allow_stale_crl=self.allow_stale)
        except PkiError as err:
            self.broken = str(err)
            log.error("revocation data unusable (%s): refusing new peers until fixed", err)
            self._on_broken(str(err))
            return []
        before = self.crl_state
        # Revoked sessions are cut first: nothing below may stand in the way of that.
        closed = self._on_trust(trust)
        try:
            self._adopt(trust)
        except Exception as err:  # e.g. the gateway's own cert and key mid-update
            self._seen = (None, None)  # try again on the next poll
            self.broken = f"cannot build the TLS context: {err}"
            log.error("%s: refusing new peers until it can", self.broken)
            self._on_broken(self.broken)
            return closed
        state = self.crl_state
        log.info(
            "CRL reloaded: number %s -> %s, %s revoked; closed %s",
            before.number if before else "-",
            state.number if state else "-",
            state.revoked if state else 0,
            ", ".join(closed) or "no session",
        )
        if state is not None and state.stale(self._now()):
            self._report_stale(state)
        return closed

    def _report_stale(self, state: CrlState) -> None:
        when = state.next_update.isoformat() if state.next_update else "?"
        if self.allow_stale:
            log.warning(
                "the CRL is STALE (nextUpdate %s) and pki.crl_stale is 'allow': new peers "
                "are checked against it anyway; run `vpnctl crl` and deploy crl.pem",
                when,
            )
        else:
            log.error(
                "the CRL is STALE (nextUpdate %s): REFUSING ALL NEW PEERS (fail closed); "
                "run `vpnctl crl` and deploy crl.pem",
                when,
            )
