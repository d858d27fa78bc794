"""The client: connects to the gateway, brings up its TUN from the pushed CONFIG,
reconnects with backoff. Kernel and network objects are injected; see vpnd.daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import random
import ssl
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vpnd.net.errors import TunError
from vpnd.net.netlink import NetConfigurator
from vpnd.net.ownership import format_alias
from vpnd.net.tun import TunDevice
from vpnd.net.tun_writer import ThreadedTunWriter
from vpnd.net.vnet import VNET_HDR_LEN, ip_src_dst, validate_vnet_packet
from vpnd.pki import TrustStore, verify_peer
from vpnd.pki.identity import IPNetwork, PeerIdentity, PkiError, Role, VerifyError
from vpnd.policy.addresses import AddressTable
from vpnd.proto import (
    CloseCode,
    ConfigReceived,
    Event,
    LocalProtocolError,
    PacketsReceived,
    RenewalIssued,
    RenewalRefused,
    RenewHint,
    Session,
    SessionConfig,
    SessionCounters,
    SessionState,
    TunnelConfig,
    describe_close,
)
from vpnd.transport.alerts import describe_alert
from vpnd.transport.driver import SessionDriver
from vpnd.transport.stream import Stream
from vpnd.transport.tlsctx import TlsConfigError
from vpnd.transport.tlsengine import TlsAlertReceived, TlsHandshakeError

log = logging.getLogger("vpnd.client")

# Close codes after which retrying soon cannot help: back off to the maximum delay.
_PERMANENT = {
    CloseCode.AUTH_FAILED,
    CloseCode.REVOKED,
    CloseCode.CERT_EXPIRED,
    CloseCode.ADDRESS_CONFLICT,
    CloseCode.POLICY,
    # Two machines sharing one certificate would otherwise evict each other forever.
    CloseCode.REPLACED,
}
_PERMANENT_ALERTS = {
    "unknown_ca",
    "certificate_revoked",
    "certificate_expired",
    "bad_certificate",
    "unsupported_certificate",
    "certificate_required",
    "access_denied",
}

RenewalAnswer = RenewalIssued | RenewalRefused

RETIRE_TIMEOUT = 10.0
"""Seconds a superseded session is kept receive-only after a make-before-break switch,
waiting for the gateway to close it (it does at takeover); then we close it."""

Connector = Callable[[], Awaitable[Stream]]
"""Opens a stream to the gateway: ``connect()`` over TLS, or an in-memory pipe in tests."""


class RenewalUnavailable(Exception):
    """No session can carry a renewal request now (none live, one switching, or one
    already outstanding), or it ended before the gateway answered. One line."""


class LocalError(Exception):
    """A permanent problem on this host: no CAP_NET_ADMIN for the TUN, an unusable own
    key or certificate, our certificate outside its validity period. Reconnecting cannot
    help (and would make the gateway admit us again and again), so ``Client.run`` raises
    this instead of retrying; ``str(err)`` is one line. Network and gateway errors are
    retried, never raised.
    """


@dataclass(frozen=True)
class ClientSettings:
    server: str
    """host:port, for logs."""
    server_name: str
    tun_name: str
    handshake_timeout: float = 10.0
    max_frame: int = 262144
    initial_delay: float = 1.0
    max_delay: float = 30.0
    offload: bool = False
    """Offer TUN offload (virtio headers, GSO super-packets) to the gateway."""
    own_routes: tuple[IPNetwork, ...] = ()
    """The subnets our certificate may route (a site router): their hosts' packets go
    into the tunnel as well as our own addresses'."""


# Settings a live session was built with: changing one needs a new session.
_RECONNECT_FIELDS = frozenset({"server", "server_name", "tun_name", "max_frame", "offload"})


def settings_changes(old: ClientSettings, new: ClientSettings) -> tuple[list[str], bool]:
    """What a reload changes: a line per changed setting, and whether the live tunnel
    must be re-established for them (the others apply at once or at the next connect)."""
    changed: list[str] = []
    reconnect = False
    for fld in dataclasses.fields(ClientSettings):
        a, b = getattr(old, fld.name), getattr(new, fld.name)
        if a != b:
            if isinstance(a, tuple):
                a, b = ", ".join(map(str, a)) or "none", ", ".join(map(str, b)) or "none"
            changed.append(f"{fld.name}: {a} -> {b}")
            reconnect = reconnect or fld.name in _RECONNECT_FIELDS
    return changed, reconnect


@dataclass
class Outcome:
    """How one connection attempt ended: what to log and how long to wait."""

    established: bool
    permanent: bool
    message: str
    superseded: bool = False
    """This session was replaced by a newer one on the same TUN (certificate rotation)."""
    fatal: bool = False
    """A permanent local problem (see ``LocalError``): the client stops, it does not retry."""
    retry_now: bool = False
    """We closed the session to reconnect at once (e.g. after renewing in quarantine)."""


class Client:
    def __init__(
        self,
        settings: ClientSettings,
        *,
        connect: Connector,
        tun_factory: Callable[[str, bool], TunDevice],
        tun_writer: Callable[[TunDevice], ThreadedTunWriter] | None = None,
        net: NetConfigurator,
        trust: TrustStore,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        local_check: Callable[[], str | None] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        """``clock`` is wall time (certificate validity, timestamps for people); ``mono``
        drives the session's timers, so a stepped wall clock cannot end the tunnel.
        ``local_check`` runs before every connection attempt; a line it returns is a
        permanent local problem (e.g. our certificate expired) and stops the client.
        ``on_outcome`` is told how each connection attempt ended, as ``last_outcome``
        is set (so a caller waits on it instead of polling)."""
        self.settings = settings
        self._on_outcome = on_outcome
        self._local_check = local_check
        self._fatal: str | None = None
        self._connect = connect
        self._tun_factory = tun_factory
        self._tun_writer_factory = tun_writer
        self._writer: ThreadedTunWriter | None = None
        self.net = net
        self.trust = trust
        self._clock = clock
        self._mono = mono
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self.tun: TunDevice | None = None
        self.config: TunnelConfig | None = None
        self.connected = asyncio.Event()
        self.last_outcome: Outcome | None = None
        self._driver: SessionDriver | None = None
        self._stop = asyncio.Event()
        # Resolved when the latest rotation onto a renewed certificate has finished
        # (either way); pending while one runs.
        self._rotation: asyncio.Future[None] | None = None
        # How the live session (``_driver``) ends; a rotation replaces both.
        self._current_done: asyncio.Future[Outcome] | None = None
        self._superseded: weakref.WeakSet[SessionDriver] = weakref.WeakSet()
        self._bringup: asyncio.Task[None] | None = None
        self._pending_gateway: PeerIdentity | None = None
        self.gateway: PeerIdentity | None = None
        """The verified gateway of the live session (for status)."""
        self.connected_since: float | None = None
        self.drops: Counter[str] = Counter()
        """Packets the client refused to send or deliver, by reason."""
        self._routed: tuple[tuple[IPNetwork, ...], AddressTable[bool]] | None = None
        self.fatal: str | None = None
        """Why the client cannot go on (its TUN vanished): the daemon exits non-zero."""
        self.on_renew_hint: Callable[[RenewHint], None] | None = None
        """Told of every RENEW_HINT (the renewer starts a renewal)."""
        self.quarantined = False
        """The live session was admitted only to renew (our certificate expired)."""
        self._renew_waiter: tuple[SessionDriver, int, asyncio.Future[RenewalAnswer]] | None = None
        self._reconnect_now = False
        self._retiring: set[SessionDriver] = set()
        self._tun_paused = False

    def stop(self) -> None:
        """Stop now: an in-flight connect or TLS handshake is cancelled, a backoff wait
        ends, a live session gets a CLOSE; ``run()`` returns once the TUN is down."""
        if not self._stop.is_set():
            log.info("stopping: closing the connection to the gateway %s", self.settings.server)
        self._stop.set()
        if self._driver is not None:
            self._driver.close(CloseCode.SHUTDOWN, "client stopping")
        for old in list(self._retiring):
            old.close(CloseCode.SHUTDOWN, "client stopping")

    def reconfigure(self, settings: ClientSettings) -> list[str]:
        """Adopt new settings (reload); the live tunnel is re-established only when a
        setting it was built with changed. Returns what changed."""
        changed, reconnect = settings_changes(self.settings, settings)
        self.settings = settings
        if reconnect and self._driver is not None and not self._stop.is_set():
            log.info("reconnecting to apply the new configuration")
            self._driver.close(CloseCode.NORMAL, "client reconnecting with a new configuration")
        return changed

    async def run(self) -> None:
        """Connect, serve, reconnect with exponential backoff and jitter until stopped."""
        delay = self.settings.initial_delay
        while not self._stop.is_set():
            outcome = await self._attempt()
            self.last_outcome = outcome
            if self._on_outcome is not None:
                self._on_outcome(outcome)
            if outcome.fatal:
                raise LocalError(outcome.message)
            if self._stop.is_set():
                break
            if outcome.established:
                delay = self.settings.initial_delay
            wait = self.settings.max_delay if outcome.permanent else delay
            wait *= 0.5 + self._rng.random() / 2
            if outcome.retry_now:
                wait = 0.0
            log.info("reconnecting in %.1f s", wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)
            delay = min(delay * 2, self.settings.max_delay)

    async def _attempt(self) -> Outcome:
        problem = self._local_check() if self._local_check is not None else None
        if problem is not None:
            return Outcome(False, True, problem, fatal=True)
        opened = await self._open()
        if isinstance(opened, Outcome):
            return opened
        outcome = await self._serve(opened)
        fatal, self._fatal = self._fatal, None
        if fatal is not None:
            return Outcome(outcome.established, True, fatal, fatal=True)
        if self._reconnect_now:
            self._reconnect_now = False
            outcome.retry_now = True
            outcome.permanent = False
        return outcome

    async def _open(self) -> Stream | Outcome:
        """A stream to a verified gateway, or why there is none."""
        s = self.settings
        try:
            conn = await self._unless_stopped(self._connect())
            if conn is None:
                return Outcome(False, False, "stopped while connecting")
        except (TlsConfigError, PkiError) as err:
            # Our own certificate, key or CA file cannot be used: not the network's fault.
            return Outcome(False, True, f"cannot use our own TLS files: {err}", fatal=True)
        except TlsHandshakeError as err:
            msg = f"refused the gateway {s.server}: {err.reason}: {err.detail}"
            log.error("%s", msg)
            return Outcome(False, True, msg)
        except TlsAlertReceived as err:
            return self._alert_outcome(err.alert)
        except (OSError, TimeoutError, ssl.SSLError) as err:
            msg = f"cannot reach the gateway {s.server}: {err or type(err).__name__}"
            log.warning("%s", msg)
            return Outcome(False, False, msg)
        try:
            identity = verify_peer(
                conn.peer_chain(),
                now=dt.datetime.fromtimestamp(self._clock(), dt.UTC),
                role=Role.GATEWAY,
                trust=self.trust,
                server_name=s.server_name,
            )
        except VerifyError as err:
            conn.abort()
            msg = f"refused the gateway {s.server}: {err}"
            log.error("%s", msg)
            return Outcome(False, True, msg)
        self._pending_gateway = identity
        log.info(
            "connected to gateway %s (%s, serial %s, fingerprint %s)",
            s.server,
            identity.name,
            identity.serial_hex,
            identity.fingerprint[:16],
        )
        return conn

    async def _unless_stopped(self, aw: Awaitable[Stream]) -> Stream | None:
        """``await aw``, or None as soon as ``stop()`` is called (``aw`` is cancelled and
        a connection it produced anyway is closed)."""
        work = asyncio.ensure_future(aw)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not work.done():
                work.cancel()
        if not self._stop.is_set():
            return work.result()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            (await work).abort()  # connected just as stop() came: do not leave it open
        return None

    def _start_session(
        self, conn: Stream, on_config: Callable[[TunnelConfig], None]
    ) -> tuple[SessionDriver, asyncio.Future[Outcome]]:
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        state = {"established": False}
        session = Session(
            SessionConfig(
                role="client",
                max_frame=self.settings.max_frame,
                config_timeout=self.settings.handshake_timeout,
            ),
            self._mono(),
            offload=self.settings.offload,
        )
        driver: SessionDriver | None = None

        def on_event(event: Event) -> None:
            match event:
                case ConfigReceived(config=cfg):
                    state["established"] = True
                    on_config(cfg)
                case PacketsReceived(packets=packets, vnet=vnet):
                    self._to_tun(packets, vnet)
                case RenewalIssued() | RenewalRefused():
                    assert driver is not None
                    self._renewal_answer(driver, event)
                case RenewHint():
                    self._renew_hint(event)

        def on_lost(code: int, message: str, exc: BaseException | None) -> None:
            if driver is not None:
                self._session_gone(driver)
            if done.done():
                return
            if driver is not None and (
                driver in self._superseded or (self._rotating() and self._driver is driver)
            ):
                # The live session ended while a renewed one takes over: keep the TUN.
                done.set_result(Outcome(True, False, message, superseded=True))
                return
            assert driver is not None
            done.set_result(self._lost_outcome(driver, state["established"], code, message, exc))

        driver = SessionDriver(
            conn, session, on_event=on_event, on_lost=on_lost, mono=self._mono, wall=self._clock
        )
        return driver, done

    def _lost_outcome(
        self,
        driver: SessionDriver,
        established: bool,
        code: int,
        message: str,
        exc: BaseException | None,
    ) -> Outcome:
        """How a session that ended (not superseded) is reported and retried."""
        if self._fatal is not None:  # we closed it: the caller reports why, once
            return Outcome(established, True, self._fatal, fatal=True)
        ended = driver.session.close_event
        if self._stop.is_set() and ended is not None and not ended.by_peer:
            # Our own stop (SIGTERM): not "the gateway is shutting down".
            text = f"stopped: closed the session to the gateway {self.settings.server}"
            log.info("%s", text)
            return Outcome(established, False, text)
        if self._reconnect_now and ended is not None and not ended.by_peer:
            text = f"reconnecting to the gateway {self.settings.server}: {ended.message}"
            log.info("%s", text)
            return Outcome(established, False, text, retry_now=True)
        if isinstance(exc, TlsAlertReceived):
            out = self._alert_outcome(exc.alert)
            return Outcome(established, out.permanent, out.message)
        if code >= 0:
            text = describe_close(code, message)
            permanent = code in _PERMANENT
        else:
            text = f"lost the connection to the gateway: {message}"
            permanent = False
        (log.error if permanent else log.warning)("%s", text)
        return Outcome(established, permanent, text)

    # ---- in-tunnel renewal ----------------------------------------------------------

    async def request_renewal(self, csr_der: bytes) -> RenewalAnswer:
        """Send a CSR over the live (or quarantined) session; the gateway's answer, or a
        local ``RenewalRefused`` (TIMEOUT) if it does not come in time. Raises
        ``RenewalUnavailable`` (one line) when no session can carry it."""
        driver = self._driver
        if driver is None:
            raise RenewalUnavailable("no live session to the gateway")
        if self._rotating():
            raise RenewalUnavailable("the tunnel is moving onto a renewed certificate")
        if driver.session.state not in (SessionState.ESTABLISHED, SessionState.QUARANTINED):
            raise RenewalUnavailable("the session to the gateway is not set up yet")
        if self._renew_waiter is not None:
            raise RenewalUnavailable("a renewal is already in progress")
        try:
            request_id = driver.session.request_renewal(csr_der, driver.now())
        except LocalProtocolError as err:
            raise RenewalUnavailable(str(err)) from None
        answer: asyncio.Future[RenewalAnswer] = asyncio.get_running_loop().create_future()
        self._renew_waiter = (driver, request_id, answer)
        driver.pump()
        try:
            return await answer
        finally:
            if self._renew_waiter is not None and self._renew_waiter[2] is answer:
                self._renew_waiter = None

    def _renewal_answer(self, driver: SessionDriver, event: RenewalAnswer) -> None:
        waiter = self._renew_waiter
        if waiter is None or waiter[0] is not driver or waiter[1] != event.request_id:
            return
        self._renew_waiter = None
        if not waiter[2].done():
            waiter[2].set_result(event)

    def _renew_hint(self, hint: RenewHint) -> None:
        if hint.quarantined and not self.quarantined:
            self.quarantined = True
            log.warning(
                "the gateway admitted us only to renew our expired certificate (%s): renewing",
                hint.reason or "no reason given",
            )
        else:
            log.info("the gateway asks us to renew: %s", hint.reason or "no reason given")
        if self.on_renew_hint is not None:
            self.on_renew_hint(hint)

    def _session_gone(self, driver: SessionDriver) -> None:
        self._retiring.discard(driver)
        waiter = self._renew_waiter
        if waiter is not None and waiter[0] is driver:
            self._renew_waiter = None
            if not waiter[2].done():
                waiter[2].set_exception(
                    RenewalUnavailable("the session ended before the gateway answered")
                )
        if driver is self._driver:
            self.quarantined = False

    def reconnect_now(self, reason: str) -> bool:
        """Close the live session and connect again at once (e.g. after renewing in
        quarantine, or when a renewed certificate could not be switched to live)."""
        driver = self._driver
        if driver is None or self._stop.is_set():
            return False
        self._reconnect_now = True
        driver.close(CloseCode.NORMAL, reason)
        return True

    async def _serve(self, conn: Stream) -> Outcome:
        def bring_up(cfg: TunnelConfig) -> None:
            self._bringup = asyncio.get_running_loop().create_task(self._bring_up(cfg))

        driver, done = self._start_session(conn, bring_up)
        self._driver, self._current_done = driver, done
        driver.start()
        try:
            while True:
                outcome = await done
                if outcome.superseded:
                    if self._rotation is not None and not self._rotation.done():
                        await asyncio.shield(self._rotation)
                    cur, cur_done = self._driver, self._current_done
                    if cur is not None and cur is not driver and cur_done is not None:
                        driver, done = cur, cur_done  # same TUN, same routes, new session
                        continue
                return outcome
        finally:
            self._driver = self._current_done = None
            task, self._bringup = self._bringup, None
            if task is not None and not task.done():
                # The session ended mid bring-up: stop it before tearing down.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._tear_down()

    async def rotate(self) -> bool:
        """Move the live tunnel onto a renewed certificate without taking the TUN down.

        Make-before-break: a second TLS session with the new certificate; the gateway
        hands it the addresses atomically (same peer name, newer certificate) and
        closes the old one. If the new session's CONFIG matches, packets flow through
        it on the same TUN and routes; otherwise the client reconnects cleanly.
        """
        old = self._driver
        if old is None or self.config is None or self._rotating():
            return False
        loop = asyncio.get_running_loop()
        rotation: asyncio.Future[None] = loop.create_future()
        self._rotation = rotation
        result: tuple[SessionDriver, asyncio.Future[Outcome]] | None = None
        driver: SessionDriver | None = None
        try:
            opened = await self._open()
            if isinstance(opened, Outcome):
                log.error("certificate rotation failed, keeping the current session: %s",
                          opened.message)  # fmt: skip
                return False
            got: asyncio.Future[TunnelConfig] = loop.create_future()
            driver, done = self._start_session(
                opened, lambda cfg: None if got.done() else got.set_result(cfg)
            )
            # From our HELLO on the new session until its CONFIG the gateway may move our
            # addresses at any moment: hold outgoing packets in the kernel's TUN queue
            # rather than send them on a session that is being replaced.
            self._pause_tun()
            driver.start()
            waiting: set[asyncio.Future[Any]] = {got, done}
            finished, _ = await asyncio.wait(
                waiting, timeout=self.settings.handshake_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            if got not in finished:
                driver.close(CloseCode.NORMAL, "rotation abandoned")
                why = done.result().message if done in finished else "no CONFIG in time"
                log.error("certificate rotation failed, keeping the current session: %s", why)
                return False
            cfg = got.result()
            if self._stop.is_set() or self._driver is not old:
                driver.close(CloseCode.SHUTDOWN, "client shutting down")
                return False
            if not self._same_tunnel(cfg):
                log.warning("the renewed certificate changes the tunnel: reconnecting")
                driver.close(CloseCode.NORMAL, "reconnecting with a new tunnel configuration")
                if self._driver is not None:
                    self._driver.close(CloseCode.NORMAL, "reconnecting after renewal")
                return False
            result = (driver, done)
            self._superseded.add(old)
            self._driver, self._current_done = driver, done
            self.config = cfg
            self.gateway = self._pending_gateway
            self._retire(old)
            log.info("switched to the renewed certificate; the tunnel stayed up")
            return True
        finally:
            self._resume_tun()
            if result is None and driver is not None:
                driver.close(CloseCode.NORMAL, "rotation abandoned")  # idempotent
            if not rotation.done():
                rotation.set_result(None)

    def _rotating(self) -> bool:
        return self._rotation is not None and not self._rotation.done()

    def _retire(self, old: SessionDriver) -> None:
        """Keep a superseded session receive-only: what the gateway sent on it before
        the takeover still reaches the TUN. The gateway closes it at the takeover; if it
        does not within ``RETIRE_TIMEOUT``, we do."""
        if old.session.closed:
            return
        self._retiring.add(old)
        loop = asyncio.get_running_loop()
        loop.call_later(
            RETIRE_TIMEOUT, old.close, CloseCode.NORMAL, "switched to a renewed certificate"
        )

    def _pause_tun(self) -> None:
        tun = self.tun
        if tun is not None and not self._tun_paused:
            self._tun_paused = True
            asyncio.get_running_loop().remove_reader(tun.fileno())

    def _resume_tun(self) -> None:
        if not self._tun_paused:
            return
        self._tun_paused = False
        tun = self.tun
        if tun is not None and self.connected.is_set():
            asyncio.get_running_loop().add_reader(tun.fileno(), self._on_tun_readable)
            self._on_tun_readable()  # what queued up while paused

    def _same_tunnel(self, cfg: TunnelConfig) -> bool:
        cur = self.config
        return cur is not None and (
            cfg.address,
            cfg.extra_addresses,
            cfg.routes,
            cfg.mtu,
            cfg.offload,
        ) == (cur.address, cur.extra_addresses, cur.routes, cur.mtu, cur.offload)

    def _alert_outcome(self, alert: str) -> Outcome:
        msg = describe_alert(alert)
        log.error("%s", msg)
        return Outcome(False, alert in _PERMANENT_ALERTS, msg)

    async def _bring_up(self, cfg: TunnelConfig) -> None:
        driver = self._driver
        if driver is None:
            return
        try:
            tun = self._tun_factory(self.settings.tun_name, cfg.offload)
        except Exception as err:
            # No CAP_NET_ADMIN, no tun module, a name taken: the same next time. Stop
            # rather than have the gateway admit us once a second forever.
            name = self.settings.tun_name
            text = str(err) or type(err).__name__
            self._fatal = text if name in text else f"cannot open TUN {name}: {text}"
            driver.close(CloseCode.NORMAL, "client could not open its TUN")
            return
        self.tun = tun
        if self._tun_writer_factory is not None:
            self._writer = self._tun_writer_factory(tun)
        self.config = cfg
        try:
            await self.net.set_link_alias(tun.name, format_alias(os.getpid()))  # vpnd's mark
            await self.net.configure_link(
                tun.name, addresses=[cfg.address, *cfg.extra_addresses], mtu=cfg.mtu
            )
            for net in cfg.routes:
                await self.net.add_route(net, tun.name)
        except Exception as err:
            log.error("cannot configure %s: %s", tun.name, err)
            driver.close(CloseCode.NORMAL, "client could not configure its TUN")
            return
        if self._driver is not driver or self.tun is not tun:
            return  # the session ended while the kernel was being configured
        asyncio.get_running_loop().add_reader(tun.fileno(), self._on_tun_readable)
        log.info(
            "tunnel up: %s address %s, routes %s, mtu %d",
            tun.name,
            cfg.address,
            ", ".join(str(r) for r in cfg.routes) or "none",
            cfg.mtu,
        )
        self.gateway = self._pending_gateway
        self.connected_since = self._clock()
        self.connected.set()

    def _routed_sources(self) -> AddressTable[bool] | None:
        """Longest-prefix table of ``settings.own_routes`` (None: not a site router)."""
        routes = self.settings.own_routes
        if not routes:
            return None
        if self._routed is None or self._routed[0] != routes:
            table: AddressTable[bool] = AddressTable()
            table.add(True, routes)
            self._routed = (routes, table)
        return self._routed[1]

    def counters(self) -> SessionCounters | None:
        """Traffic counters of the live session, if any."""
        return self._driver.session.counters if self._driver is not None else None

    async def _tear_down(self) -> None:
        self.connected.clear()
        self.gateway = None
        self.connected_since = None
        self.quarantined = False
        self._tun_paused = False
        tun, self.tun = self.tun, None
        cfg, self.config = self.config, None
        if tun is None:
            return
        asyncio.get_running_loop().remove_reader(tun.fileno())
        if cfg is not None:
            for net in cfg.routes:
                try:
                    await self.net.del_route(net, tun.name)
                except Exception as err:
                    log.warning("could not remove route %s: %s", net, err)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # before the TUN: it may still be writing a batch
        # Closing the TUN fd deletes the device and every route through it.
        tun.close()
        log.info("tunnel down: %s removed", tun.name)

    def _to_tun(self, packets: list[bytes | memoryview], vnet: bool) -> None:
        tun = self.tun
        if tun is None:
            return
        if vnet:
            # Even from a verified gateway, a header the kernel would misread is dropped.
            good = [p for p in packets if validate_vnet_packet(p) is None]
            if len(good) != len(packets):
                self.drops["bad_vnet_from_gateway"] += len(packets) - len(good)
            packets = good
        (self._writer or tun).write_batch(packets)

    def _on_tun_readable(self) -> None:
        driver, tun, cfg = self._driver, self.tun, self.config
        if driver is None or tun is None or cfg is None:
            return
        own = {cfg.address.ip.packed, *(a.ip.packed for a in cfg.extra_addresses)}
        routed = self._routed_sources()
        off = VNET_HDR_LEN if tun.vnet_hdr else 0
        for _ in range(16):
            try:
                packets = tun.read_batch(64)
            except TunError as err:
                self._tun_lost(tun, str(err))
                return
            if not packets:
                return
            # Only our own sources go into the tunnel (no IPv6 chatter, no leaks): our
            # overlay addresses, and a site router's LAN (its certificate's routes).
            batch = [
                p
                for p in packets
                if (a := ip_src_dst(p, off)) is not None
                and (a[0] in own or (routed is not None and routed.lookup_raw(a[0]) is not None))
            ]
            if len(batch) != len(packets):
                self.drops["not_own_source"] += len(packets) - len(batch)
            if batch:
                driver.session.send_packets(batch, self._mono(), vnet=tun.vnet_hdr)
                driver.flush()

    def _tun_lost(self, tun: TunDevice, why: str) -> None:
        """The TUN vanished under a live tunnel: say so once and stop (the daemon exits
        non-zero, systemd restarts it); never spin on a dead fd."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(tun.fileno())
        if self.fatal is not None:
            return
        self.fatal = f"{why}; exiting non-zero so a supervisor restarts vpnd"
        log.error("%s", self.fatal)
        self.stop()
