"""Keeps the gateway's CA bundle and CRL current: live revocation, fail-closed on bad data.

The CRL file is watched by polling ``stat()`` (inode, size, mtime, ctime) every 0.2 s rather
than with inotify: `vpnctl revoke` replaces it by rename, admins copy it in over NFS or
config management, and a poll catches every one of those within the 1 s guarantee
while costing one syscall per tick. A changed file is loaded and checked, and then:
- new handshakes use a fresh OpenSSL context carrying the new CRL;
- every live session is re-checked, and the revoked ones are closed at once;
- a missing, unreadable or badly signed CRL makes the gateway refuse every new peer
  (fail closed) until it is fixed; live sessions keep the last good verdict;
- a CRL whose CRLNumber is lower than the highest already seen for its CA (an older
  crl.pem put back, which would un-revoke peers) is refused and the newer one kept.
  The highest number per CA is persisted in ``<state_dir>/crl-numbers.json``, so a
  restart does not forget it: at start an older CRL on disk stops the gateway with one
  line, unless ``pki.crl_rollback: allow`` (then it warns loudly and uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from vpnd.files.atomic import atomic_write
from vpnd.files.watch import FileWatch, poll
from vpnd.pki import TrustStore, load_trust_store
from vpnd.pki.crl import CrlRollback, crl_number, crl_numbers, crl_rollbacks
from vpnd.pki.identity import PkiError

log = logging.getLogger("vpnd.trust")

POLL_INTERVAL = 0.2


@dataclasses.dataclass(frozen=True)
class CrlState:
    number: int
    next_update: dt.datetime | None
    revoked: int

    def stale(self, now: dt.datetime) -> bool:
        return self.next_update is not None and self.next_update < now


CRL_NUMBERS_FILE = "crl-numbers.json"
_MAX_STATE_BYTES = 1 << 20


class CrlNumberStore:
    """The highest CRL number seen per CA (keyed by ``vpnd.pki.crl.ca_key``), on disk.

    ``path`` None keeps it in memory only (tests, tools). Written atomically, so a crash
    leaves the old or the new file, never a torn one.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.highest: dict[str, int] = {}

    def load(self) -> None:
        """Raises PkiError with one line if the file exists but cannot be used."""
        if self.path is None:
            return
        try:
            raw = self.path.read_bytes()[:_MAX_STATE_BYTES]
        except FileNotFoundError:
            return
        except OSError as err:
            raise PkiError(
                f"{self.path}: cannot read the CRL numbers seen: {err.strerror}; check state_dir"
            ) from None
        try:
            data = json.loads(raw)
            numbers = data["highest_crl_number"]
            if not isinstance(numbers, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in numbers.items()
            ):
                raise ValueError("not a mapping of CA key to number")
        except (ValueError, KeyError, TypeError) as err:
            raise PkiError(
                f"{self.path}: corrupt CRL-number state ({err}); restore it, or remove it "
                "to forget which CRLs were seen"
            ) from None
        self.highest = dict(numbers)

    def record(self, numbers: dict[str, tuple[str, int]]) -> None:
        """Raise the remembered numbers to ``numbers`` (never lower one); save if changed."""
        changed = False
        for key, (_subject, number) in numbers.items():
            if number > self.highest.get(key, -1):
                self.highest[key] = number
                changed = True
        if changed and self.path is not None:
            doc = {"highest_crl_number": dict(sorted(self.highest.items()))}
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n")
            except OSError as err:
                raise PkiError(
                    f"{self.path}: cannot save the CRL numbers seen: {err.strerror or err}; "
                    "make state_dir writable by vpnd"
                ) from None


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
        state_dir: Path | None = None,
        allow_rollback: bool = False,
        extra_crls: tuple[Path, ...] = (),
    ) -> None:
        self.ca = ca
        self.crl = crl
        self.extra_crls = extra_crls
        """CRLs the gateway itself writes (the online issuer's), watched like crl."""
        self.allow_stale = allow_stale
        self._make_context = make_context
        self._on_trust = on_trust
        self._on_broken = on_broken
        self._clock = clock
        self.numbers = CrlNumberStore(None if state_dir is None else state_dir / CRL_NUMBERS_FILE)
        self.allow_rollback = allow_rollback
        self.rollback_refused: str | None = None
        """Why the CRL on disk was last refused as older than the one in use, or None."""
        self._files = FileWatch(lambda: (self.ca, self.crl, *self.extra_crls))
        self.trust: TrustStore | None = None
        self.context: ssl.SSLContext | None = None
        self.crl_state: CrlState | None = None
        self.broken: str | None = None
        self._stale_logged = False
        self._task: asyncio.Task[None] | None = None

    def load(self) -> TrustStore:
        """First load at start-up: raises PkiError (the daemon refuses to start)."""
        self._files.mark()
        trust = self._load()
        self.numbers.load()
        rollbacks = self._rollbacks(trust)
        if rollbacks and not self.allow_rollback:
            where = self.numbers.path or "memory"
            raise PkiError(
                f"{self.crl}: {rollbacks[0]} (recorded in {where}); deploy the newest "
                "crl.pem (`vpnctl crl`), or set pki.crl_rollback: allow to start with it"
            )
        self._warn_rollbacks(rollbacks)
        self.numbers.record(crl_numbers(trust.roots, trust.crls))  # PkiError: no start
        self._adopt(trust)
        return trust

    def _load(self) -> TrustStore:
        return load_trust_store(
            self.ca, self.crl, allow_stale_crl=self.allow_stale, extra_crls=self.extra_crls
        )

    def _rollbacks(self, trust: TrustStore) -> list[CrlRollback]:
        return crl_rollbacks(crl_numbers(trust.roots, trust.crls), self.numbers.highest)

    def _warn_rollbacks(self, rollbacks: list[CrlRollback]) -> None:
        for rb in rollbacks:
            log.warning(
                "%s: %s; pki.crl_rollback is 'allow', so it is USED: certificates revoked "
                "since may be accepted again",
                self.crl,
                rb,
                extra={"event": "crl_rollback", "ca": rb.ca, "number": rb.number},
            )

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
        await poll(POLL_INTERVAL, self._step)

    async def _step(self) -> None:
        try:
            self.check()
        except Exception:  # the watcher must survive anything a file can do
            log.exception("trust watcher failed; retrying")

    def check(self) -> None:
        """One poll: reload on change, and notice a CRL going stale."""
        if self._files.changed():
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
            trust = self._load()
        except PkiError as err:
            self.broken = str(err)
            log.error("revocation data unusable (%s): refusing new peers until fixed", err)
            self._on_broken(str(err))
            return []
        rollbacks = self._rollbacks(trust)
        if rollbacks and not self.allow_rollback:
            # Keep the newer CRL we hold: an older one would un-revoke peers.
            self.rollback_refused = f"{self.crl}: refused: {rollbacks[0]}"
            log.error(
                "%s: refused: %s; keeping the newer CRL (number %d)",
                self.crl,
                rollbacks[0],
                rollbacks[0].highest,
                extra={"event": "crl_rollback_refused", "ca": rollbacks[0].ca},
            )
            return []
        self._warn_rollbacks(rollbacks)
        self.rollback_refused = None
        try:
            self.numbers.record(crl_numbers(trust.roots, trust.crls))
        except PkiError as err:  # the newer CRL is still used; only its memory is at risk
            log.error("%s: a restart may accept an older CRL again", err)
        before = self.crl_state
        # Revoked sessions are cut first: nothing below may stand in the way of that.
        closed = self._on_trust(trust)
        try:
            self._adopt(trust)
        except Exception as err:  # e.g. the gateway's own cert and key mid-update
            self._files.forget()  # try again on the next poll
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
