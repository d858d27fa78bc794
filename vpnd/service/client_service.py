"""The client's lifecycle: start-up, serving, reload and shutdown, state as attributes.

The client keeps retrying the gateway on its own; this class owns what is around it:
the TLS context it dials with (replaced when the certificate is renewed), the control
socket, SIGHUP, the certificate file watch and the expiry reminders.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vpnd.client.control import ClientControl
from vpnd.client.renewal import Renewer
from vpnd.client.runner import Client, ClientSettings, settings_changes
from vpnd.config import ClientConfig, ConfigError, load_config
from vpnd.control.messages import ReloadReport
from vpnd.control.server import ControlServer, ControlServerError
from vpnd.files.watch import FileWatch, poll
from vpnd.net.netlink import NetConfigurator
from vpnd.pki import TrustStore, load_trust_store
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.keys import load_certificate
from vpnd.pki.profile import peer_attributes_of
from vpnd.service import sdnotify
from vpnd.service.reload_plan import plan_reload
from vpnd.service.runstate import InstanceLock
from vpnd.service.startup import (
    Edges,
    StartupError,
    apply_log_settings,
    check_ssl_context,
    claim_tun,
    expiry_warnings,
    key_passphrase,
    log_own_certificate,
    reload_on_sighup,
    reload_passphrase,
    validity_problem,
)
from vpnd.transport.connection import TlsConnection
from vpnd.transport.tlsctx import TlsConfigError, client_context

log = logging.getLogger("vpnd")

CERT_WATCH_INTERVAL = 2.0
"""Seconds between looks at the certificate, key and CA files (renewals by deploy)."""
STOP_TIMEOUT = 5.0
"""Seconds the client gets to close its session at stop before it is cancelled."""

FORWARDING_SYSCTLS = (
    (4, Path("/proc/sys/net/ipv4/ip_forward")),
    (6, Path("/proc/sys/net/ipv6/conf/all/forwarding")),
)


def client_settings(cfg: ClientConfig, offload_ok: bool) -> ClientSettings:
    try:
        routes = peer_attributes_of(load_certificate(cfg.pki.cert)).routes
    except PkiError as err:
        raise PkiError(f"pki.cert: {err}") from None
    return ClientSettings(
        server=f"{cfg.server.host}:{cfg.server.port}",
        server_name=cfg.server_name,
        tun_name=cfg.tun.name,
        handshake_timeout=cfg.handshake_timeout,
        max_frame=cfg.limits.max_frame,
        initial_delay=cfg.reconnect.initial_delay,
        max_delay=cfg.reconnect.max_delay,
        offload=cfg.tun.offload and offload_ok,
        own_routes=routes,
    )


def warn_if_not_forwarding(
    routes: tuple[IPNetwork, ...], sysctls: tuple[tuple[int, Path], ...] = FORWARDING_SYSCTLS
) -> None:
    """A site router (certificate routes) needs the kernel to forward its LAN's packets."""
    for version, path in sysctls:
        nets = [str(n) for n in routes if n.version == version]
        if not nets:
            continue
        try:
            on = path.read_text().strip() == "1"
        except OSError:
            continue
        if not on:
            log.warning(
                "this certificate routes %s (site-to-site) but %s is 0: hosts behind "
                "this machine cannot use the tunnel until forwarding is enabled",
                ", ".join(nets),
                str(path).removeprefix("/proc/sys/").replace("/", "."),
            )


class ClientService:
    def __init__(
        self,
        cfg: ClientConfig,
        *,
        config_path: str,
        lock: InstanceLock,
        edges: Edges | None = None,
        watch_interval: float = CERT_WATCH_INTERVAL,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.config = cfg
        """The running config; replaced by each successful reload (SIGHUP, `vpnctl reload`)."""
        self.config_path = config_path
        """Empty: a reload re-reads only the certificate, key and CA files."""
        self.lock = lock
        self.edges = edges or Edges()
        self.watch_interval = watch_interval
        self.stop_timeout = stop_timeout
        self.should_exit = asyncio.Event()
        self.started = False
        self.passphrase: bytes | None = None
        self.context: ssl.SSLContext | None = None
        """The last TLS context that loaded; replaced on renewal."""
        self.own: x509.Certificate | None = None
        self.offload_ok = False
        self.net: NetConfigurator | None = None
        self.client: Client | None = None
        self.control: ClientControl | None = None
        self.renewer: Renewer | None = None
        self.moved = False
        """Whether the last refresh moved the live tunnel onto new certificate files."""
        self.files = FileWatch(
            lambda: (self.config.pki.cert, self.config.pki.key, self.config.pki.ca)
        )
        self._task: asyncio.Task[None] | None = None
        self._undo = contextlib.AsyncExitStack()
        self._stopped = False

    @property
    def exit_code(self) -> int:
        return 1 if self.client is not None and self.client.fatal else 0

    def stop(self) -> None:
        self.should_exit.set()

    async def run(self) -> int:
        try:
            await self.startup()
            await self.serve()
        finally:
            await self.shutdown()
        return self.exit_code

    # --- start-up -------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.config
        self.own = log_own_certificate(cfg, self.edges.now())
        try:
            # A client checks the gateway against its CA; a CRL is optional on clients.
            trust = load_trust_store(cfg.pki.ca, cfg.pki.crl, crl_required=False)
        except PkiError as err:
            raise StartupError(str(err)) from None
        self.passphrase = key_passphrase(cfg.pki.key_passphrase_file)
        self.context = check_ssl_context(self._make_context)
        self.offload_ok = cfg.tun.offload and self.edges.probe_offload()
        try:
            settings = client_settings(cfg, self.offload_ok)
        except PkiError as err:
            raise StartupError(str(err)) from None
        warn_if_not_forwarding(settings.own_routes)
        self.files.mark()
        self.net = net = self.edges.net()
        self._undo.push_async_callback(self._close_net, net)
        await claim_tun(cfg.tun.name, net, self.lock)
        self.client = Client(
            settings,
            connect=self._dial,
            tun_factory=self.edges.open_tun,
            tun_writer=self.edges.tun_writer,
            net=net,
            trust=trust,
            clock=self.edges.wall,
            mono=self.edges.mono,
            local_check=self._local_check,
        )
        self.renewer = Renewer(
            self.client,
            config=lambda: self.config,
            own=self._own_cert,
            trust=lambda: self.client.trust if self.client is not None else trust,
            passphrase=lambda: self.passphrase,
            adopt=self.adopt_renewed,
            wall=self.edges.wall,
        )
        await self._start_control(trust)
        self._start_background()
        # Ready once running, not once connected: a gateway that is down must not hold
        # up the boot; the client keeps retrying on its own.
        sdnotify.ready(f"connecting to {cfg.server}")
        self.started = True

    def _make_context(self) -> ssl.SSLContext:
        pki = self.config.pki
        return client_context(ca=pki.ca, cert=pki.cert, key=pki.key, key_passphrase=self.passphrase)

    async def _dial(self) -> TlsConnection:
        cfg = self.config
        assert self.context is not None
        return await self.edges.dial(
            cfg.server.host,
            cfg.server.port,
            self.context,
            server_hostname=cfg.server_name,
            timeout=cfg.handshake_timeout,
        )

    def _local_check(self) -> str | None:
        assert self.own is not None
        now = self.edges.now()
        if self.config.renewal.enabled and now > self.own.not_valid_after_utc:
            # Expired, but renewal is on: the gateway may admit us to renew (quarantine)
            # or refuse with certificate_expired; either way it decides, not us.
            return None
        return validity_problem(self.config.pki.cert, self.own, now)

    def _own_cert(self) -> x509.Certificate:
        assert self.own is not None
        return self.own

    async def _close_net(self, net: NetConfigurator) -> None:
        with contextlib.suppress(Exception):
            await net.close()

    async def _start_control(self, trust: TrustStore) -> None:
        cfg = self.config
        assert self.client is not None
        self.control = ClientControl(
            self.client,
            started_at=self.edges.wall(),
            server=str(cfg.server),
            tun=cfg.tun.name,
            own_cert=self._own_cert,
            ca_cert=trust.roots[0],
            reload=self.reload,
            clock=self.edges.wall,
            renewer=self.renewer,
        )
        server = ControlServer(cfg.control_socket, self.control)
        try:
            await server.start()
        except ControlServerError as err:
            raise StartupError(f"control_socket: {err}") from None
        self._undo.push_async_callback(server.close)

    def _start_background(self) -> None:
        assert self.client is not None and self.control is not None
        self._task = asyncio.create_task(self.client.run())
        if self.edges.signals:
            reload_on_sighup(self.control.reload, self._undo)
        expiry = asyncio.create_task(expiry_warnings(lambda: self.config, self.edges))
        self._undo.callback(expiry.cancel)
        renewals = asyncio.create_task(
            poll(self.watch_interval, self.check_certificate_files, sleep=self.edges.sleep)
        )
        self._undo.callback(renewals.cancel)
        if self.renewer is not None:
            renewer = asyncio.create_task(self.renewer.run())
            self._undo.callback(renewer.cancel)

    # --- serving and shutdown ----------------------------------------------------------

    async def serve(self) -> None:
        """Until SIGTERM/SIGINT (``stop``) or the client gives up (a local error)."""
        assert self._task is not None
        stopper = asyncio.create_task(self.should_exit.wait())
        try:
            await asyncio.wait({self._task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()

    async def shutdown(self) -> None:
        """Stop the client (its session closes), then undo the start-up. Idempotent;
        re-raises the client's ``LocalError`` once everything is undone."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.started:
                sdnotify.stopping()
            if self.client is not None:
                self.client.stop()
            if self._task is not None:
                await self._wait_client(self._task)
        finally:
            await self._undo.aclose()

    async def _wait_client(self, task: asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(task, self.stop_timeout)
        except TimeoutError:
            log.warning("client did not stop within %g s; cancelling", self.stop_timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- certificate renewal and reload -------------------------------------------------

    async def check_certificate_files(self) -> None:
        """One look at the certificate files: a renewed certificate (e.g. from `vpnctl
        deploy`) is picked up on its own, the live tunnel moving onto it."""
        if not self.files.changed():
            return
        try:
            report = await self.refresh()
        except PkiError as err:
            log.error("new certificate files cannot be used (%s); keeping the current", err)
            return
        for line in report.changed:
            log.info("certificate files changed: %s", line)

    async def adopt_renewed(self, rotate: bool) -> bool:
        """The renewer wrote a new key and certificate: load them (the file watch is
        told, so it does not do it again) and, with ``rotate``, move the live tunnel.
        True if the live tunnel moved onto them."""
        self.files.mark()
        try:
            report = await self.refresh(rotate=rotate)
        except PkiError as err:
            log.error("the renewed certificate files cannot be loaded: %s", err)
            return False
        if report.errors:
            log.warning("after renewal: %s", "; ".join(report.errors))
        return self.moved

    async def refresh(self, *, rotate: bool = True) -> ReloadReport:
        """Adopt changed certificate/key/CA files and move the live tunnel onto them."""
        client = self.client
        assert client is not None and self.own is not None
        pki = self.config.pki
        try:
            ctx = self._make_context()
            new_trust = load_trust_store(pki.ca, pki.crl, crl_required=False)
            cert = load_certificate(pki.cert)
            routes = peer_attributes_of(cert).routes
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        report = ReloadReport()
        if routes != client.settings.own_routes:
            report.changed.extend(
                client.reconfigure(dataclasses.replace(client.settings, own_routes=routes))
            )
            warn_if_not_forwarding(routes)
        if cert.fingerprint(hashes.SHA256()) != self.own.fingerprint(hashes.SHA256()):
            report.changed.append(
                f"certificate: now serial {cert.serial_number:x}, valid until "
                f"{cert.not_valid_after_utc.isoformat()}"
            )
        self.context, self.own = ctx, cert
        client.trust = new_trust
        log_own_certificate(self.config, self.edges.now())
        self.moved = False
        if rotate and report.changed and client.connected.is_set():
            self.moved = await client.rotate()
            if self.moved:
                report.changed.append("the live tunnel moved onto it without going down")
            else:
                report.errors.append("the live tunnel could not move onto it (see the log)")
        return report

    async def reload(self) -> ReloadReport:
        """Re-read the config, certificate, key and CA; keep the tunnel unless something
        it was built with changed. Validated first: on error nothing changes."""
        client = self.client
        assert client is not None
        if not self.config_path:
            return await self.refresh()
        new = load_config(self.config_path)  # ConfigError: refused, the running config kept
        plan = plan_reload(self.config, new)
        if plan.errors:
            raise ConfigError(self.config_path, plan.errors[0].key, plan.errors[0].message)
        assert isinstance(new, ClientConfig)
        passphrase = reload_passphrase(new.pki.key_passphrase_file)
        try:
            client_context(ca=new.pki.ca, cert=new.pki.cert, key=new.pki.key,
                           key_passphrase=passphrase)  # fmt: skip
            load_trust_store(new.pki.ca, new.pki.crl, crl_required=False)
            new_settings = client_settings(new, self.offload_ok)
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        old = self.config
        self.config, self.passphrase = new, passphrase
        _, reconnect = settings_changes(client.settings, new_settings)
        # A new session is coming anyway: no make-before-break rotation onto the old server.
        report = await self.refresh(rotate=not reconnect)
        report.changed.extend(client.reconfigure(new_settings))
        if reconnect and client.connected.is_set():
            report.changed.append("the tunnel reconnects to apply it")
        report.errors.extend(plan.notes)
        apply_log_settings(old, new, report)
        return report
