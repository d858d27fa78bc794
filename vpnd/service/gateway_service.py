"""The gateway's lifecycle: start-up, serving, reload and shutdown, state as attributes.

``startup`` builds the kernel state in order (TUN, nftables, routes, forwarding, the
control socket, metrics, the TLS listener) and registers each undo step as it goes;
``shutdown`` runs them in reverse, so a start-up that fails half-way leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vpnd.config import ConfigError, CrlRollback, CrlStale, GatewayConfig, NatMode, load_config
from vpnd.control.messages import CrlSummary, ReloadReport
from vpnd.control.server import ControlServer, ControlServerError
from vpnd.control.summaries import crl_summary
from vpnd.gateway.control import GatewayControl
from vpnd.gateway.inventory_view import InventoryView
from vpnd.gateway.lifecycle import GatewayLifecycle
from vpnd.gateway.shell import Gateway, GatewaySettings, IPInterface
from vpnd.gateway.trust_watch import TrustWatcher
from vpnd.net.errors import NetError
from vpnd.net.netlink import NetConfigurator
from vpnd.net.nftables import NftablesRuleset, policy_hosts, poll_counters
from vpnd.net.ownership import format_alias
from vpnd.net.tun import TunDevice
from vpnd.net.tun_writer import ThreadedTunWriter
from vpnd.pki import TrustStore, load_trust_store
from vpnd.pki.ca_forecast import CaExpiry, ExpiryWarner, ca_expiry
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.issuer import load_issuer
from vpnd.pki.keys import load_certificate, load_certificates
from vpnd.service import sdnotify
from vpnd.service.enrollment_setup import build_enrollment
from vpnd.service.reload_plan import ReloadPlan, plan_reload
from vpnd.service.runstate import InstanceLock, InstanceState
from vpnd.service.startup import (
    EXPIRY_CHECK_INTERVAL,
    Edges,
    Listener,
    StartupError,
    apply_log_settings,
    claim_tun,
    expiry_warnings,
    forwarding_families,
    guard,
    hold_forwarding,
    key_passphrase,
    log_own_certificate,
    overlay_networks,
    reload_on_sighup,
    reload_passphrase,
    san_addresses,
)
from vpnd.telemetry.metrics import MetricsError, MetricsExporter
from vpnd.transport.tlsctx import TlsConfigError, server_context

log = logging.getLogger("vpnd")

NO_CHECK_TIME = ssl.VerifyFlags(0x200000)
"""OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not exported by Python's ssl)."""

CLOSE_GRACE = 0.05
"""Seconds for the CLOSE frames to reach the wire before the sockets go."""


def gateway_settings(
    cfg: GatewayConfig, overlays: tuple[IPNetwork, ...], addrs: tuple[IPInterface, ...]
) -> GatewaySettings:
    return GatewaySettings(
        tun_name=cfg.tun.name,
        mtu=cfg.tun.mtu,
        overlay_networks=overlays,
        gateway_addresses=addrs,
        push_routes=cfg.push_routes,
        keepalive_interval=cfg.keepalive.interval,
        keepalive_timeout=cfg.keepalive.timeout,
        handshake_timeout=cfg.handshake_timeout,
        max_frame=cfg.limits.max_frame,
        max_sessions=cfg.limits.max_sessions,
        peer_queue_bytes=cfg.limits.peer_queue_bytes,
        max_unadmitted=cfg.limits.max_pending_handshakes,
        duplicate=cfg.duplicate.value,
        peer_turn_packets=cfg.limits.peer_turn_packets,
        holddown_takeovers=cfg.duplicate_holddown.takeovers,
        holddown_window=cfg.duplicate_holddown.window,
        holddown_hold=cfg.duplicate_holddown.hold,
        quarantine_grace=cfg.renewal.quarantine_grace if cfg.renewal.enabled else 0.0,
    )


def gateway_interfaces(
    own: x509.Certificate, overlays: tuple[IPNetwork, ...]
) -> tuple[IPInterface, ...]:
    """The TUN addresses: the certificate's IPs, with the prefix of their overlay."""
    found: list[IPInterface] = []
    for addr in san_addresses(own):
        prefix = next((n.prefixlen for n in overlays if addr in n), None)
        if prefix is None:
            raise StartupError(f"gateway address {addr} is outside the CA's networks")
        found.append(ipaddress.ip_interface(f"{addr}/{prefix}"))
    if not found:
        raise StartupError("the gateway certificate carries no overlay IP address")
    return tuple(found)


def _fmt(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def settings_lines(old: GatewaySettings, new: GatewaySettings) -> list[str]:
    """One line per setting a reload changes (the TUN name never changes live)."""
    lines = []
    for fld in dataclasses.fields(GatewaySettings):
        a, b = getattr(old, fld.name), getattr(new, fld.name)
        if a != b and fld.name != "tun_name":
            lines.append(f"{fld.name}: {_fmt(a)} -> {_fmt(b)}")
    return lines


class GatewayService:
    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        config_path: str,
        lock: InstanceLock,
        edges: Edges | None = None,
        close_grace: float = CLOSE_GRACE,
    ) -> None:
        self.config = cfg
        """The running config; replaced by each successful reload."""
        self.config_path = config_path
        self.lock = lock
        self.edges = edges or Edges()
        self.close_grace = close_grace
        self.should_exit = asyncio.Event()
        self.fatal: str | None = None
        self.started = False
        self.passphrase: bytes | None = None
        self.own: x509.Certificate | None = None
        self.trust: TrustStore | None = None
        self.watcher: TrustWatcher | None = None
        self.net: NetConfigurator | None = None
        self.state: InstanceState | None = None
        self.tun: TunDevice | None = None
        self.nft: NftablesRuleset | None = None
        self.gateway: Gateway | None = None
        self.control: GatewayControl | None = None
        self.listener: Listener | None = None
        self.lifecycle: GatewayLifecycle | None = None
        self._ca_warner = ExpiryWarner()
        self._undo = contextlib.AsyncExitStack()
        self._stopped = False

    @property
    def exit_code(self) -> int:
        return 1 if self.fatal else 0

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
        self.passphrase = key_passphrase(cfg.pki.key_passphrase_file)
        self.lifecycle = self._prepare_lifecycle()
        trust = self._load_trust()
        overlays = overlay_networks(trust)
        ifaces = gateway_interfaces(self.own, overlays)
        settings = gateway_settings(cfg, overlays, ifaces)
        self.net = net = self.edges.net()
        self._undo.push_async_callback(self._close_net, net)
        self.state = await claim_tun(cfg.tun.name, net, self.lock)
        tun, writer = await self._open_tun(net)
        nft = await self._install_firewall(overlays, ifaces)
        self.gateway = gateway = Gateway(
            settings,
            tun=tun,
            net=net,
            trust=trust,
            nft=nft if cfg.nftables.anti_spoofing else None,
            policy=cfg.policy,
            tun_writer=writer,
            clock=self.edges.wall,
            mono=self.edges.mono,
            on_fatal=self._on_fatal,
        )
        if self.lifecycle is not None:
            gateway.lifecycle = self.lifecycle
            gateway.core.inventory = self.lifecycle.view
        if cfg.enrollment.enabled:
            gateway.enrollment = build_enrollment(
                cfg,
                self.own,
                trust.roots,
                wall=self.edges.wall,
                mono=self.edges.mono,
                issuer=self.lifecycle.issuer if self.lifecycle is not None else None,
            )
            log.info("enrollment on: clients without a certificate may redeem invites")
        if not cfg.policy.rules:
            log.warning(
                "policy has no rules: verified peers can reach NOTHING (default deny); "
                "see config/policy.yaml"
            )
        await guard(gateway.start())
        self._undo.push_async_callback(gateway.stop)
        if cfg.forwarding:
            families = forwarding_families(overlays, cfg.push_routes)
            hold_forwarding(self.lock, net, families, self._undo)
        await self._start_control(trust)
        await self._start_metrics()
        await self._start_listener()
        self._start_background()
        log.info("listening on %s (TLS 1.3, ALPN vpnd/1)", cfg.listen)
        sdnotify.ready(f"listening on {cfg.listen}")
        self.started = True

    def _load_trust(self) -> TrustStore:
        cfg = self.config
        allow_stale = cfg.pki.crl_stale == CrlStale.ALLOW
        if allow_stale:
            log.warning(
                "pki.crl_stale is 'allow': a CRL past its nextUpdate will be ACCEPTED; "
                "revocations issued since may be missed"
            )
        assert cfg.pki.crl is not None  # the schema requires a CRL on a gateway
        self.watcher = TrustWatcher(
            ca=cfg.pki.ca,
            crl=cfg.pki.crl,
            allow_stale=allow_stale,
            make_context=self._make_context,
            on_trust=self._on_trust,
            on_broken=self._on_broken,
            clock=self.edges.wall,
            state_dir=cfg.state_dir,
            allow_rollback=cfg.pki.crl_rollback == CrlRollback.ALLOW,
            extra_crls=self._extra_crls(),
        )
        try:
            self.trust = self.watcher.load()
        except PkiError as err:
            raise StartupError(str(err)) from None
        return self.trust

    def _extra_crls(self) -> tuple[Path, ...]:
        issuer = self.config.pki.issuer
        return (issuer.crl,) if issuer is not None and self.lifecycle is not None else ()

    def _prepare_lifecycle(self) -> GatewayLifecycle | None:
        """The online issuer and the inventory watch, when configured: loaded and
        checked before anything else starts (PkiError: the gateway does not start)."""
        cfg = self.config
        pki = cfg.pki
        if pki.inventory is None:
            return None
        issuer = None
        try:
            # Loaded whenever configured: even with renewal and enrollment off, the
            # gateway keeps the issuer's CRL fresh for the peers it signed earlier.
            if pki.issuer is not None:
                issuer = load_issuer(
                    pki.issuer.cert,
                    pki.issuer.key,
                    passphrase_file=pki.issuer.key_passphrase_file,
                    roots=load_certificates(pki.ca),
                    now=self.edges.now(),
                )
            lifecycle = GatewayLifecycle(
                issuer=issuer,
                inventory=pki.inventory,
                issuer_crl=pki.issuer.crl if pki.issuer is not None and issuer else None,
                lifetime=cfg.renewal.lifetime,
                renewal=cfg.renewal.enabled,
                poll=pki.inventory_poll,
                apply_view=self._on_inventory,
                wall=self.edges.wall,
                mono=self.edges.mono,
                warn_days=pki.expiry_warning_days,
            )
            lifecycle.prepare()
        except PkiError as err:
            raise StartupError(str(err)) from None
        return lifecycle

    def ca_expiries(self) -> list[CaExpiry]:
        """The trusted roots and the online issuer, with how soon each expires."""
        now = self.edges.now()
        trust = self.watcher.trust if self.watcher is not None else None
        out = [ca_expiry("root", root, now) for root in (trust.roots if trust else ())]
        issuer = self.lifecycle.issuer if self.lifecycle is not None else None
        if issuer is not None:
            out.append(ca_expiry("issuer", issuer.cert, now))
        return out

    def warn_ca_expiry(self) -> None:
        """Warn at 90, 30 and 7 days before a CA or the issuer expires (once each)."""
        for exp in self._ca_warner.due(self.ca_expiries()):
            level = logging.ERROR if exp.days_left < 7 else logging.WARNING
            log.log(
                level,
                "%s",
                exp.line(),
                extra={"event": "ca_expiry", "ca": exp.name, "days_left": exp.days_left},
            )

    async def _ca_expiry_loop(self) -> None:
        while True:
            await self.edges.sleep(EXPIRY_CHECK_INTERVAL)
            self.warn_ca_expiry()

    def _on_inventory(self, view: InventoryView) -> None:
        if self.gateway is not None:
            self.gateway.apply_inventory(view)

    def _make_context(self, crl: Path | None) -> ssl.SSLContext:
        # Reads the current cert and key each time: a renewed gateway certificate is
        # picked up by reload without dropping a single tunnel.
        pki = self.config.pki
        try:
            ctx = server_context(
                ca=pki.ca,
                cert=pki.cert,
                key=pki.key,
                crl=crl,
                key_passphrase=self.passphrase,
                extra_crls=self._extra_crls() if crl is not None else (),
                # Certless clients only with enrollment on; routed to it and nowhere else.
                client_cert_optional=self.config.enrollment.enabled,
            )
            if self.config.renewal.quarantine_grace > 0:
                # OpenSSL would end an expired peer's handshake before vpnd could
                # quarantine it; vpnd's own verifier checks every time (and the grace).
                ctx.verify_flags |= NO_CHECK_TIME
            return ctx
        except TlsConfigError as err:
            raise StartupError(str(err)) from None

    def _on_trust(self, trust: TrustStore) -> list[str]:
        return self.gateway.apply_trust(trust) if self.gateway is not None else []

    def _on_broken(self, reason: str) -> None:
        if self.gateway is not None:
            self.gateway.refuse_new_peers(reason)

    def _enrollment_counts(self) -> dict[str, int]:
        handler = self.gateway.enrollment if self.gateway is not None else None
        return dict(handler.counts) if handler is not None else {}

    def _on_fatal(self, why: str) -> None:
        self.fatal = why
        self.should_exit.set()

    async def _close_net(self, net: NetConfigurator) -> None:
        with contextlib.suppress(Exception):
            await net.close()

    async def _open_tun(self, net: NetConfigurator) -> tuple[TunDevice, ThreadedTunWriter]:
        tun_cfg = self.config.tun
        self.tun = tun = self.edges.open_tun(
            tun_cfg.name, tun_cfg.offload and self.edges.probe_offload()
        )
        log.info("TUN %s offload %s", tun_cfg.name, "on" if tun.vnet_hdr else "off")
        self._undo.callback(tun.close)
        await guard(net.set_link_alias(tun_cfg.name, format_alias(os.getpid())))
        writer = self.edges.tun_writer(tun)
        self._undo.callback(writer.close)  # runs before tun.close (LIFO)
        return tun, writer

    async def _install_firewall(
        self, overlays: tuple[IPNetwork, ...], ifaces: tuple[IPInterface, ...]
    ) -> NftablesRuleset | None:
        cfg = self.config
        guarded = cfg.nftables.forward_filter
        if not guarded:
            log.warning(
                "nftables.forward_filter is OFF: this gateway is an OPEN ROUTER (anyone on "
                "the underlay can route into the LAN and the overlay); turn it back on"
            )
        masquerade = cfg.nat == NatMode.MASQUERADE
        if not (masquerade or cfg.nftables.anti_spoofing or guarded):
            return None
        assert self.state is not None
        self.nft = nft = self.edges.firewall(cfg.tun.name)
        self.state.nft_tables.append(nft.table)
        self.state.save(self.lock.state_path)
        # Installed before the TUN carries traffic; removed last, after the sessions.
        ruleset = nft.render(
            overlays=overlays,
            masquerade=masquerade,
            anti_spoof=cfg.nftables.anti_spoofing,
            forward_filter=guarded and cfg.forwarding,
            input_filter=guarded,
            pushed=cfg.push_routes,
            gateway_addresses=[i.ip for i in ifaces],
            hosts=policy_hosts(cfg.policy),
        )
        await guard(nft.install(ruleset))
        self._undo.push_async_callback(nft.remove)
        return nft

    def crl_info(self) -> CrlSummary | None:
        t = self.watcher.trust if self.watcher is not None else None
        if t is None or not t.crls:
            return None
        return crl_summary(max(t.crls, key=crl_number), self.edges.wall())

    async def _start_control(self, trust: TrustStore) -> None:
        cfg = self.config
        assert self.gateway is not None and self.own is not None
        self.control = control = GatewayControl(
            self.gateway,
            started_at=self.edges.wall(),
            listen=str(cfg.listen),
            reload=self.reload,
            own_cert=self.own,
            ca_cert=trust.roots[0],
            crl_info=self.crl_info,
            policy_rules=lambda: len(self.config.policy.rules),
            clock=self.edges.wall,
            poke_inventory=self.lifecycle.poke if self.lifecycle is not None else None,
            lifecycle=self.lifecycle,
            enrollments=self._enrollment_counts,
        )
        if self.nft is not None and cfg.nftables.forward_filter:
            # vpnd_drops{reason="nft_forward_dropped"|"nft_input_dropped"}, a few seconds stale.
            poll = asyncio.create_task(poll_counters(self.nft, control.kernel_drops.update))
            self._undo.callback(poll.cancel)
        server = ControlServer(cfg.control_socket, control)
        try:
            await server.start()
        except ControlServerError as err:
            raise StartupError(f"control_socket: {err}") from None
        self._undo.push_async_callback(server.close)

    async def _start_metrics(self) -> None:
        where = self.config.metrics.listen
        if where is None:
            return
        assert self.control is not None
        exporter = MetricsExporter(where.host, where.port, self.control.metrics_snapshot)
        try:
            await exporter.start()
        except MetricsError as err:
            raise StartupError(str(err)) from None
        self._undo.push_async_callback(exporter.close)
        log.info("metrics on http://%s/metrics", where)

    async def _start_listener(self) -> None:
        cfg = self.config
        assert self.gateway is not None and self.watcher is not None
        try:
            self.listener = await self.edges.listen(
                cfg.listen.host,
                cfg.listen.port,
                self.watcher.server_context,
                self.gateway.on_connection,
                handshake_timeout=cfg.handshake_timeout,
                on_refused=self.gateway.on_refused,
                max_pending=cfg.limits.max_pending_handshakes,
                max_pending_per_source=cfg.limits.max_pending_per_source,
                max_pending_per_subnet=cfg.limits.max_pending_per_subnet,
                max_write_backlog=cfg.limits.peer_queue_bytes + cfg.limits.max_frame,
            )
        except OSError as err:
            raise StartupError(f"listen {cfg.listen}: {err.strerror}") from None

    def _start_background(self) -> None:
        assert self.watcher is not None and self.control is not None
        self.watcher.start()
        self._undo.push_async_callback(self.watcher.stop)
        if self.lifecycle is not None:
            self.lifecycle.start()
            self._undo.push_async_callback(self.lifecycle.stop)
        expiry = asyncio.create_task(expiry_warnings(lambda: self.config, self.edges))
        self._undo.callback(expiry.cancel)
        self.warn_ca_expiry()
        cas = asyncio.create_task(self._ca_expiry_loop())
        self._undo.callback(cas.cancel)
        if self.edges.signals:
            reload_on_sighup(self.control.reload, self._undo)

    # --- serving and shutdown ----------------------------------------------------------

    async def serve(self) -> None:
        """Until SIGTERM/SIGINT (``stop``) or a fatal gateway error."""
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        """Close the sessions, then undo every start-up step in reverse. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.started:
            sdnotify.stopping()
            log.info("stopping: closing sessions and removing kernel state")
        if self.listener is not None:
            self.listener.close()
        if self.gateway is not None:
            await self.gateway.stop()
            await asyncio.sleep(self.close_grace)  # let CLOSE frames reach the wire
        await self._undo.aclose()

    # --- reload ----------------------------------------------------------------------------

    async def reload(self) -> ReloadReport:
        """Validate everything first; apply only if all of it is good; report changes.
        ConfigError or PkiError: refused, the running config kept."""
        assert self.gateway is not None and self.own is not None
        new = load_config(self.config_path)
        plan = plan_reload(self.config, new)
        if plan.errors:
            raise ConfigError(self.config_path, plan.errors[0].key, plan.errors[0].message)
        assert isinstance(new, GatewayConfig)
        passphrase, new_own = self._validate(new)
        old = self.config
        report = ReloadReport()
        if plan.touches("policy"):
            await self._apply_policy(old, new, plan, report)
        if new_own.fingerprint(hashes.SHA256()) != self.own.fingerprint(hashes.SHA256()):
            report.changed.append(
                f"gateway certificate: now serial {new_own.serial_number:x}, valid until "
                f"{new_own.not_valid_after_utc.isoformat()} (live tunnels kept)"
            )
        self.config, self.passphrase, self.own = new, passphrase, new_own
        if self.control is not None:
            self.control.own_cert = new_own  # status and metrics show the renewed certificate
        self._reload_trust(new, report)
        self._apply_settings(new, report)
        report.errors.extend(plan.notes)
        apply_log_settings(old, new, report)
        return report

    def _validate(self, new: GatewayConfig) -> tuple[bytes | None, x509.Certificate]:
        """PkiError if the new files cannot be used; nothing is changed here."""
        assert new.pki.crl is not None and self.own is not None
        # Validation only; the watcher adopts its own copy.
        load_trust_store(
            new.pki.ca, new.pki.crl, allow_stale_crl=new.pki.crl_stale == CrlStale.ALLOW
        )
        passphrase = reload_passphrase(new.pki.key_passphrase_file)
        try:
            server_context(
                ca=new.pki.ca,
                cert=new.pki.cert,
                key=new.pki.key,
                crl=new.pki.crl,
                key_passphrase=passphrase,
            )
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        new_own = load_certificate(new.pki.cert)
        if set(san_addresses(new_own)) != set(san_addresses(self.own)):
            raise PkiError("the new gateway certificate has other overlay addresses: restart")
        return passphrase, new_own

    async def _apply_policy(
        self, old: GatewayConfig, new: GatewayConfig, plan: ReloadPlan, report: ReloadReport
    ) -> None:
        assert self.gateway is not None
        await self.gateway.refresh_host_addresses()
        cut = self.gateway.apply_policy(new.policy)
        # A changed forward_filter needs a restart: the installed ruleset stays as it is.
        if self.nft is not None and not plan.touches("nftables.forward_filter"):
            try:
                await self.nft.set_hosts(policy_hosts(new.policy))
            except NetError as err:
                report.errors.append(f"nftables: host addresses not updated: {err}")
        report.changed.append(
            f"policy: {len(old.policy.rules)} rules -> {len(new.policy.rules)} rules, "
            f"{cut} tracked flow(s) cut"
        )

    def _reload_trust(self, new: GatewayConfig, report: ReloadReport) -> None:
        watcher = self.watcher
        assert watcher is not None and new.pki.crl is not None
        before = watcher.crl_state
        watcher.ca, watcher.crl = new.pki.ca, new.pki.crl
        watcher.allow_stale = new.pki.crl_stale == CrlStale.ALLOW
        watcher.allow_rollback = new.pki.crl_rollback == CrlRollback.ALLOW
        report.closed.extend(watcher.reload())
        if watcher.rollback_refused is not None:
            report.errors.append(f"{watcher.rollback_refused}; the newer CRL stays in use")
        after = watcher.crl_state
        if before != after and after is not None:
            report.changed.append(
                f"crl: number {before.number if before else '-'} -> {after.number}, "
                f"{after.revoked} revoked"
            )

    def _apply_settings(self, new: GatewayConfig, report: ReloadReport) -> None:
        gateway = self.gateway
        assert gateway is not None
        current = gateway.settings
        wanted = gateway_settings(new, current.overlay_networks, current.gateway_addresses)
        # The TUN's name and MTU are restart keys (plan_reload): the running TUN keeps
        # them, so CONFIG must keep promising the MTU the TUN really has.
        wanted = dataclasses.replace(wanted, tun_name=current.tun_name, mtu=current.mtu)
        if wanted != current:
            report.changed.extend(settings_lines(current, wanted))
            gateway.settings = wanted
