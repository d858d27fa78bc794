"""Composition root: the only place concrete edges are built and wired together.

``run(config_path)`` loads and validates the config once, builds the real TUN,
netlink, nftables and TLS objects, runs a gateway or a client, and on SIGTERM/SIGINT
(or a crash of the session) removes everything it put into the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vpnd import sdnotify
from vpnd.client import Client, ClientSettings
from vpnd.config import ClientConfig, ConfigError, CrlStale, GatewayConfig, NatMode, load_config
from vpnd.control.messages import ControlError, CrlSummary, ReloadReport
from vpnd.control.server import ControlServer, ControlServerError
from vpnd.control_handler import ClientControl, GatewayControl, crl_summary
from vpnd.gateway import Gateway, GatewaySettings, IPInterface
from vpnd.logsetup import setup_logging
from vpnd.metrics import MetricsError, MetricsExporter
from vpnd.net.errors import NetError, TunError
from vpnd.net.netlink import PyRoute2Configurator
from vpnd.net.nftables import NftablesRuleset, policy_hosts, poll_counters
from vpnd.net.tun import LinuxTun, probe_offload
from vpnd.net.tun_writer import ThreadedTunWriter
from vpnd.pki import TrustStore, load_trust_store
from vpnd.pki.authority import ca_networks
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.keys import fingerprint, load_certificate
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.tlsctx import TlsConfigError, client_context, server_context
from vpnd.trust_watch import TrustWatcher

log = logging.getLogger("vpnd")
T = TypeVar("T")


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def run(config_path: str) -> int:
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        print(f"vpnd: {err}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level.value, cfg.log.format.value)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    try:
        return asyncio.run(_main(cfg, config_path))
    except StartupError as err:
        log.error("cannot start: %s", err)
        return 1
    except KeyboardInterrupt:
        return 130


async def _main(cfg: GatewayConfig | ClientConfig, config_path: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if isinstance(cfg, GatewayConfig):
        await _run_gateway(cfg, config_path, stop)
    else:
        await _run_client(cfg, stop)
    return 0


def _passphrase(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().splitlines()[0] if path.read_bytes() else b""
    except OSError as err:
        raise StartupError(f"pki.key_passphrase_file: cannot read {path}: {err.strerror}") from None


def _own_certificate(cfg: GatewayConfig | ClientConfig, now: dt.datetime) -> None:
    try:
        cert = load_certificate(cfg.pki.cert)
    except PkiError as err:
        raise StartupError(f"pki.cert: {err}") from None
    left = cert.not_valid_after_utc - now
    log.info(
        "own certificate %s, serial %x, fingerprint %s, valid until %s",
        cert.subject.rfc4514_string(),
        cert.serial_number,
        fingerprint(cert)[:16],
        cert.not_valid_after_utc.isoformat(),
    )
    if left.total_seconds() <= 0:
        log.error(
            "own certificate EXPIRED at %s; ask your admin for a new one",
            cert.not_valid_after_utc.isoformat(),
        )
    elif left <= dt.timedelta(days=cfg.pki.expiry_warning_days):
        log.warning(
            "own certificate expires in %d days (%s): renew it now",
            left.days,
            cert.not_valid_after_utc.isoformat(),
        )


@contextlib.asynccontextmanager
async def _netlink() -> AsyncIterator[PyRoute2Configurator]:
    net = PyRoute2Configurator()
    try:
        yield net
    finally:
        with contextlib.suppress(Exception):
            await net.close()


def _gateway_settings(
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
    )


# Keys a running gateway cannot change: they need a restart (reload reports them).
_RESTART_KEYS = ("listen", "tun", "nat", "forwarding", "nftables", "control_socket", "metrics")


async def _run_gateway(cfg: GatewayConfig, config_path: str, stop: asyncio.Event) -> None:
    _own_certificate(cfg, dt.datetime.now(dt.UTC))
    current = cfg  # replaced by each successful reload
    passphrase = _passphrase(cfg.pki.key_passphrase_file)
    allow_stale = cfg.pki.crl_stale == CrlStale.ALLOW
    if allow_stale:
        log.warning(
            "pki.crl_stale is 'allow': a CRL past its nextUpdate will be ACCEPTED; "
            "revocations issued since may be missed"
        )
    assert cfg.pki.crl is not None  # the schema requires a CRL on a gateway
    gateway: Gateway | None = None

    def make_context(crl: Path | None) -> ssl.SSLContext:
        # Reads the current cert and key each time: a renewed gateway certificate is
        # picked up by reload without dropping a single tunnel.
        try:
            return server_context(
                ca=current.pki.ca,
                cert=current.pki.cert,
                key=current.pki.key,
                crl=crl,
                key_passphrase=passphrase,
            )
        except TlsConfigError as err:
            raise StartupError(str(err)) from None

    def on_trust(trust: TrustStore) -> list[str]:
        return gateway.apply_trust(trust) if gateway is not None else []

    def on_broken(reason: str) -> None:
        if gateway is not None:
            gateway.refuse_new_peers(reason)

    watcher = TrustWatcher(
        ca=cfg.pki.ca,
        crl=cfg.pki.crl,
        allow_stale=allow_stale,
        make_context=make_context,
        on_trust=on_trust,
        on_broken=on_broken,
    )
    try:
        trust = watcher.load()
    except PkiError as err:
        raise StartupError(str(err)) from None
    own = load_certificate(cfg.pki.cert)
    overlays = _overlay_networks(trust)
    gw_ifaces: list[IPInterface] = []
    for addr in _san_addresses(own):
        prefix = next((n.prefixlen for n in overlays if addr in n), None)
        if prefix is None:
            raise StartupError(f"gateway address {addr} is outside the CA's networks")
        gw_ifaces.append(ipaddress.ip_interface(f"{addr}/{prefix}"))
    if not gw_ifaces:
        raise StartupError("the gateway certificate carries no overlay IP address")
    settings = _gateway_settings(cfg, overlays, tuple(gw_ifaces))

    control: GatewayControl | None = None

    async def reload() -> ReloadReport:
        """Validate everything first; apply only if all of it is good; report changes."""
        nonlocal current, passphrase, own
        assert gateway is not None
        new = load_config(config_path)  # ConfigError: refused, old config kept
        if not isinstance(new, GatewayConfig):
            raise ConfigError(config_path, "mode", "changed to client: restart vpnd instead")
        assert new.pki.crl is not None
        # Validation only (PkiError refuses the reload); the watcher adopts its own copy.
        load_trust_store(
            new.pki.ca, new.pki.crl, allow_stale_crl=new.pki.crl_stale == CrlStale.ALLOW
        )
        try:
            new_passphrase = _passphrase(new.pki.key_passphrase_file)
        except StartupError as err:
            raise PkiError(str(err)) from None
        try:
            server_context(
                ca=new.pki.ca,
                cert=new.pki.cert,
                key=new.pki.key,
                crl=new.pki.crl,
                key_passphrase=new_passphrase,
            )
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        new_own = load_certificate(new.pki.cert)
        if set(_san_addresses(new_own)) != set(_san_addresses(own)):
            raise PkiError("the new gateway certificate has other overlay addresses: restart")
        old = current
        report = ReloadReport()
        if new.policy != old.policy:
            cut = gateway.apply_policy(new.policy)
            if nft is not None and new.nftables.forward_filter == old.nftables.forward_filter:
                try:
                    await nft.set_hosts(policy_hosts(new.policy))
                except NetError as err:
                    report.errors.append(f"nftables: host addresses not updated: {err}")
            report.changed.append(
                f"policy: {len(old.policy.rules)} rules -> {len(new.policy.rules)} rules, "
                f"{cut} tracked flow(s) cut"
            )
        if new_own.fingerprint(hashes.SHA256()) != own.fingerprint(hashes.SHA256()):
            report.changed.append(
                f"gateway certificate: now serial {new_own.serial_number:x}, valid until "
                f"{new_own.not_valid_after_utc.isoformat()} (live tunnels kept)"
            )
        current, passphrase, own = new, new_passphrase, new_own
        if control is not None:
            control.own_cert = new_own  # status and metrics show the renewed certificate
        before = watcher.crl_state
        watcher.ca, watcher.crl = new.pki.ca, new.pki.crl
        watcher.allow_stale = new.pki.crl_stale == CrlStale.ALLOW
        report.closed.extend(watcher.reload())
        after = watcher.crl_state
        if before != after and after is not None:
            report.changed.append(
                f"crl: number {before.number if before else '-'} -> {after.number}, "
                f"{after.revoked} revoked"
            )
        new_settings = _gateway_settings(new, gateway.settings.overlay_networks,
                                         gateway.settings.gateway_addresses)  # fmt: skip
        if new_settings != gateway.settings:
            for fld in dataclasses.fields(GatewaySettings):
                a, b = getattr(gateway.settings, fld.name), getattr(new_settings, fld.name)
                if a != b and fld.name != "tun_name":
                    report.changed.append(f"{fld.name}: {_fmt(a)} -> {_fmt(b)}")
            gateway.settings = dataclasses.replace(new_settings, tun_name=gateway.settings.tun_name)
        for key in _RESTART_KEYS:
            if getattr(new, key) != getattr(old, key):
                report.errors.append(f"{key}: changed, takes effect after a restart")
        # Bound into the TLS listener at start: say so rather than pretend.
        for key in ("max_pending_handshakes", "max_pending_per_source"):
            if getattr(new.limits, key) != getattr(old.limits, key):
                report.errors.append(f"limits.{key}: changed, takes effect after a restart")
        if new.handshake_timeout != old.handshake_timeout:
            report.errors.append(
                "handshake_timeout: the TLS part takes effect after a restart "
                "(the tunnel-setup part applies to new sessions now)"
            )
        if new.log.level != old.log.level:
            logging.getLogger().setLevel(new.log.level.value.upper())
            report.changed.append(f"log level: {old.log.level.value} -> {new.log.level.value}")
        if new.log.format != old.log.format:
            report.errors.append("log.format: changed, takes effect after a restart")
        return report

    async with _netlink() as net, contextlib.AsyncExitStack() as undo:
        if await net.link_exists(cfg.tun.name):
            # A persistent device of that name (left by another tool or an old version)
            # would make TUNSETIFF attach to it; replace it rather than fail.
            log.warning("found a stale link %s: deleting it", cfg.tun.name)
            await _guard(net.delete_link(cfg.tun.name))
        tun = _open_tun(cfg.tun.name, cfg.tun.offload and probe_offload())
        log.info("TUN %s offload %s", cfg.tun.name, "on" if tun.vnet_hdr else "off")
        undo.callback(tun.close)
        writer = ThreadedTunWriter(tun)
        undo.callback(writer.close)  # runs before tun.close (LIFO)
        nft: NftablesRuleset | None = None
        guard = cfg.nftables.forward_filter
        if not guard:
            log.warning(
                "nftables.forward_filter is OFF: this gateway is an OPEN ROUTER (anyone on "
                "the underlay can route into the LAN and the overlay) and policy rules naming "
                "a LAN subnet also reach this host's own services; turn it back on"
            )
        if cfg.nat == NatMode.MASQUERADE or cfg.nftables.anti_spoofing or guard:
            nft = NftablesRuleset(cfg.tun.name)
            # Installed before the TUN carries traffic; removed last, after the sessions.
            await _guard(
                nft.install(
                    nft.render(
                        overlays=overlays,
                        masquerade=cfg.nat == NatMode.MASQUERADE,
                        anti_spoof=cfg.nftables.anti_spoofing,
                        forward_filter=guard and cfg.forwarding,
                        input_filter=guard,
                        pushed=cfg.push_routes,
                        gateway_addresses=[i.ip for i in gw_ifaces],
                        hosts=policy_hosts(cfg.policy),
                    )
                )
            )
            undo.push_async_callback(nft.remove)
        gateway = Gateway(
            settings,
            tun=tun,
            net=net,
            trust=trust,
            nft=nft if cfg.nftables.anti_spoofing else None,
            policy=cfg.policy,
            tun_writer=writer,
        )
        if not cfg.policy.rules:
            log.warning(
                "policy has no rules: verified peers can reach NOTHING (default deny); "
                "see config/policy.yaml"
            )
        await _guard(gateway.start())
        undo.push_async_callback(gateway.stop)
        if cfg.forwarding:
            previous = await _guard(net.set_ip_forwarding(True))
            if not previous:
                undo.push_async_callback(net.set_ip_forwarding, False)

        def crl_info() -> CrlSummary | None:
            t = watcher.trust
            if t is None or not t.crls:
                return None
            return crl_summary(max(t.crls, key=crl_number), time.time())

        control = GatewayControl(
            gateway,
            started_at=time.time(),
            listen=str(cfg.listen),
            reload=reload,
            own_cert=own,
            ca_cert=trust.roots[0],
            crl_info=crl_info,
            policy_rules=lambda: len(current.policy.rules),
        )
        if nft is not None and guard:
            # vpnd_drops{reason="nft_forward_dropped"|"nft_input_dropped"}, a few seconds stale.
            poll = asyncio.create_task(poll_counters(nft, control.kernel_drops.update))
            undo.callback(poll.cancel)
        server_ctl = ControlServer(cfg.control_socket, control)
        try:
            await server_ctl.start()
        except ControlServerError as err:
            raise StartupError(f"control_socket: {err}") from None
        undo.push_async_callback(server_ctl.close)
        if cfg.metrics.listen is not None:
            exporter = MetricsExporter(
                cfg.metrics.listen.host, cfg.metrics.listen.port, control.metrics_snapshot
            )
            try:
                await exporter.start()
            except MetricsError as err:
                raise StartupError(str(err)) from None
            undo.push_async_callback(exporter.close)
            log.info("metrics on http://%s/metrics", cfg.metrics.listen)
        try:
            server = await serve(
                cfg.listen.host,
                cfg.listen.port,
                watcher.server_context,
                gateway.on_connection,
                handshake_timeout=cfg.handshake_timeout,
                on_refused=gateway.on_refused,
                max_pending=cfg.limits.max_pending_handshakes,
                max_pending_per_source=cfg.limits.max_pending_per_source,
                max_write_backlog=cfg.limits.peer_queue_bytes + cfg.limits.max_frame,
            )
        except OSError as err:
            raise StartupError(f"listen {cfg.listen}: {err.strerror}") from None
        watcher.start()
        undo.push_async_callback(watcher.stop)
        expiry = asyncio.create_task(_expiry_warnings(cfg))
        undo.callback(expiry.cancel)

        async def on_sighup() -> None:
            sdnotify.reloading()
            try:
                report = await control.reload()
                log.info("SIGHUP reload: %s", "; ".join(report.changed) or "no change")
                for line in report.errors:
                    log.warning("SIGHUP reload: %s", line)
            except ControlError as err:
                log.error("SIGHUP reload refused: %s", err.message)
            finally:
                sdnotify.ready()

        hup_tasks: set[asyncio.Task[None]] = set()

        def sighup() -> None:
            task = asyncio.create_task(on_sighup())
            hup_tasks.add(task)
            task.add_done_callback(hup_tasks.discard)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, sighup)
        undo.callback(loop.remove_signal_handler, signal.SIGHUP)
        log.info("listening on %s (TLS 1.3, ALPN vpnd/1)", cfg.listen)
        sdnotify.ready(f"listening on {cfg.listen}")
        try:
            await stop.wait()
        finally:
            sdnotify.stopping()
            log.info("stopping: closing sessions and removing kernel state")
            server.close()
            await gateway.stop()
            await asyncio.sleep(0.05)  # let CLOSE frames reach the wire


def _fmt(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


async def _expiry_warnings(cfg: GatewayConfig | ClientConfig) -> None:
    """Re-check our own certificate's expiry every 6 hours: expiry is never a surprise."""
    while True:
        await asyncio.sleep(6 * 3600)
        _own_certificate(cfg, dt.datetime.now(dt.UTC))


async def _run_client(cfg: ClientConfig, stop: asyncio.Event) -> None:
    now = dt.datetime.now(dt.UTC)
    _own_certificate(cfg, now)
    try:
        # A client checks the gateway against its CA; a CRL is optional on clients.
        trust = load_trust_store(cfg.pki.ca, cfg.pki.crl, crl_required=False)
    except PkiError as err:
        raise StartupError(str(err)) from None
    passphrase = _passphrase(cfg.pki.key_passphrase_file)

    def make_context() -> ssl.SSLContext:
        return client_context(
            ca=cfg.pki.ca, cert=cfg.pki.cert, key=cfg.pki.key, key_passphrase=passphrase
        )

    try:
        good = [make_context()]  # the last context that loaded; replaced on renewal
    except TlsConfigError as err:
        raise StartupError(str(err)) from None
    settings = ClientSettings(
        server=f"{cfg.server.host}:{cfg.server.port}",
        server_name=cfg.server_name,
        tun_name=cfg.tun.name,
        handshake_timeout=cfg.handshake_timeout,
        max_frame=cfg.limits.max_frame,
        initial_delay=cfg.reconnect.initial_delay,
        max_delay=cfg.reconnect.max_delay,
        offload=cfg.tun.offload and probe_offload(),
    )

    async def dial() -> TlsConnection:
        return await connect(
            cfg.server.host,
            cfg.server.port,
            good[0],
            server_hostname=cfg.server_name,
            timeout=cfg.handshake_timeout,
        )

    def files() -> tuple[tuple[int, int], ...]:
        out = []
        for path in (cfg.pki.cert, cfg.pki.key, cfg.pki.ca):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    async def refresh(client: Client) -> ReloadReport:
        """Adopt changed certificate/key/CA files and move the live tunnel onto them."""
        try:
            ctx = make_context()
            new_trust = load_trust_store(cfg.pki.ca, cfg.pki.crl, crl_required=False)
            cert = load_certificate(cfg.pki.cert)
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        report = ReloadReport()
        if cert.fingerprint(hashes.SHA256()) != own[0].fingerprint(hashes.SHA256()):
            report.changed.append(
                f"certificate: now serial {cert.serial_number:x}, valid until "
                f"{cert.not_valid_after_utc.isoformat()}"
            )
        good[0], own[0] = ctx, cert
        client.trust = new_trust
        _own_certificate(cfg, dt.datetime.now(dt.UTC))
        if report.changed and client.connected.is_set():
            if await client.rotate():
                report.changed.append("the live tunnel moved onto it without going down")
            else:
                report.errors.append("the live tunnel could not move onto it (see the log)")
        return report

    async def watch_certificate(client: Client) -> None:
        """A renewed certificate (e.g. from `vpnctl deploy`) is picked up on its own: the
        live tunnel moves onto it without going down."""
        seen = files()
        while True:
            await asyncio.sleep(2)
            now_seen = files()
            if now_seen == seen:
                continue
            seen = now_seen
            try:
                report = await refresh(client)
            except PkiError as err:
                log.error("new certificate files cannot be used (%s); keeping the current", err)
                continue
            for line in report.changed:
                log.info("certificate files changed: %s", line)

    own = [load_certificate(cfg.pki.cert)]
    async with _netlink() as net, contextlib.AsyncExitStack() as undo:
        client = Client(
            settings,
            connect=dial,
            tun_factory=_open_tun,
            tun_writer=ThreadedTunWriter,
            net=net,
            trust=trust,
        )
        control = ClientControl(
            client,
            started_at=time.time(),
            server=str(cfg.server),
            tun=cfg.tun.name,
            own_cert=lambda: own[0],
            ca_cert=trust.roots[0],
            reload=lambda: refresh(client),
        )
        server_ctl = ControlServer(cfg.control_socket, control)
        try:
            await server_ctl.start()
        except ControlServerError as err:
            raise StartupError(f"control_socket: {err}") from None
        undo.push_async_callback(server_ctl.close)
        task = asyncio.create_task(client.run())
        expiry = asyncio.create_task(_expiry_warnings(cfg))
        renewals = asyncio.create_task(watch_certificate(client))
        # Ready once running, not once connected: a gateway that is down must not hold
        # up the boot; the client keeps retrying on its own.
        sdnotify.ready(f"connecting to {cfg.server}")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        sdnotify.stopping()
        client.stop()
        stopper.cancel()
        expiry.cancel()
        renewals.cancel()
        try:
            await asyncio.wait_for(task, 5)
        except TimeoutError:
            log.warning("client did not stop within 5 s; cancelling")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _open_tun(name: str, offload: bool = False) -> LinuxTun:
    if offload:
        try:
            return LinuxTun.open(name, offload=True)
        except TunError as err:
            log.warning("TUN offload unavailable (%s): continuing without it", err)
    try:
        return LinuxTun.open(name)
    except TunError as err:
        raise StartupError(str(err)) from None


async def _guard(aw: Awaitable[T]) -> T:
    """Kernel set-up failures (netlink, nft) stop start-up with a clear message."""
    try:
        return await aw
    except NetError as err:
        raise StartupError(str(err)) from None


def _overlay_networks(trust: TrustStore) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for root in trust.roots:
        nets.extend(n for n in ca_networks(root) if n not in nets)
    if not nets:
        raise StartupError("the CA certificate has no permitted IP subtrees (overlay networks)")
    return tuple(nets)


def _san_addresses(cert: x509.Certificate) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.IPAddress))  # type: ignore[arg-type]
