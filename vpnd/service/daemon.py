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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vpnd.client.control import ClientControl
from vpnd.client.runner import Client, ClientSettings, LocalError, settings_changes
from vpnd.config import (
    ClientConfig,
    ConfigError,
    CrlRollback,
    CrlStale,
    GatewayConfig,
    NatMode,
    load_config,
)
from vpnd.control.messages import ControlError, CrlSummary, ReloadReport
from vpnd.control.server import ControlServer, ControlServerError
from vpnd.control.summaries import crl_summary
from vpnd.gateway.control import GatewayControl
from vpnd.gateway.shell import Gateway, GatewaySettings, IPInterface
from vpnd.gateway.trust_watch import TrustWatcher
from vpnd.net.errors import NetError, TunError
from vpnd.net.netlink import PyRoute2Configurator, forwarding_key
from vpnd.net.nftables import NftablesRuleset, policy_hosts, poll_counters
from vpnd.net.ownership import LinkOwner, classify_link, format_alias
from vpnd.net.tun import LinuxTun, probe_offload
from vpnd.net.tun_writer import ThreadedTunWriter
from vpnd.pki import TrustStore, load_trust_store
from vpnd.pki.authority import ca_networks
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.keys import fingerprint, load_certificate
from vpnd.pki.profile import peer_attributes_of
from vpnd.service import preflight, sdnotify
from vpnd.service.cleanup import safe_undo
from vpnd.service.runstate import (
    InstanceLock,
    InstanceState,
    RuntimeDirError,
    SysctlLedger,
    control_socket_in_use,
    resolve_runtime_dir,
)
from vpnd.telemetry.logsetup import setup_logging
from vpnd.telemetry.metrics import MetricsError, MetricsExporter
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.tlsctx import TlsConfigError, client_context, server_context

log = logging.getLogger("vpnd")
T = TypeVar("T")


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


class _Refused(Exception):
    """Start-up refused; every reason was already logged, one line each."""


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
    except _Refused:
        return 1
    except StartupError as err:
        log.error("cannot start: %s", err)
        return 1
    except LocalError as err:
        log.error("stopping: %s (a local problem: reconnecting cannot help)", err)
        return 1
    except KeyboardInterrupt:
        return 130


async def _main(cfg: GatewayConfig | ClientConfig, config_path: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Before anything touches the kernel: one vpnd per (network namespace, TUN name),
    # and never a second one on a live control socket.
    lock = InstanceLock(resolve_runtime_dir(), cfg.tun.name)
    try:
        lock.acquire()
    except RuntimeDirError as err:
        raise StartupError(str(err)) from None
    try:
        if control_socket_in_use(cfg.control_socket):
            raise StartupError(
                f"control_socket {cfg.control_socket}: another vpnd is listening there; "
                "stop it first or set another control_socket"
            )
        # The same checks as `vpnd --check`, once we know we are the only instance (a
        # second one must hear "another vpnd", not "port in use"), before any kernel work.
        report = preflight.check(cfg, now=dt.datetime.now(dt.UTC), privileged=True)
        for warning in report.warnings:
            if warning not in cfg.warnings:
                log.warning("%s", warning)
        for problem in report.problems:
            log.error("cannot start: %s", problem)
        if report.problems:
            raise _Refused
        if isinstance(cfg, GatewayConfig):
            return await _run_gateway(cfg, config_path, stop, lock)
        return await _run_client(cfg, stop, lock, config_path)
    finally:
        lock.release()


async def _claim_tun(name: str, net: PyRoute2Configurator, lock: InstanceLock) -> InstanceState:
    """Undo what a dead vpnd left; refuse a TUN name vpnd does not own; record the TUN."""
    ledger = SysctlLedger(lock.dir, netns=lock.netns)
    for line in await _guard(safe_undo(lock, net, ledger)):
        log.warning("cleaned up after a previous vpnd: %s", line)
    exists, alias = await _guard(net.link_alias(name))
    owner = classify_link(exists, alias)
    if owner == LinkOwner.FOREIGN:
        raise StartupError(
            f"tun.name {name}: an interface of that name exists and vpnd did not create it "
            f"(ifalias {alias!r}); choose another tun.name"
        )
    if owner == LinkOwner.OURS_LIVE:
        raise StartupError(f"tun.name {name}: in use by a running vpnd (ifalias {alias})")
    if owner == LinkOwner.OURS_STALE:
        log.warning("removing stale link %s (%s, that vpnd is gone)", name, alias)
        await _guard(net.delete_link(name))
    state = InstanceState(pid=os.getpid(), tun=name, links=[name])
    state.save(lock.state_path)  # before the TUN exists: a crash from here on is recorded
    return state


def _forwarding_families(
    overlays: tuple[IPNetwork, ...], push_routes: tuple[IPNetwork, ...]
) -> list[bool]:
    """[ipv6?] for each forwarding sysctl the gateway needs: IPv4 always; IPv6 when the
    overlay or a pushed route is IPv6 (a peer's routed IPv6 subnet needs an IPv6 overlay:
    the TUN has IPv6 disabled otherwise)."""
    v6 = any(n.version == 6 for n in (*overlays, *push_routes))
    return [False, True] if v6 else [False]


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
        peer_turn_packets=cfg.limits.peer_turn_packets,
        holddown_takeovers=cfg.duplicate_holddown.takeovers,
        holddown_window=cfg.duplicate_holddown.window,
        holddown_hold=cfg.duplicate_holddown.hold,
    )


# Keys a running gateway cannot change: they need a restart (reload reports them).
_RESTART_KEYS = (
    "listen",
    "tun",
    "nat",
    "forwarding",
    "nftables",
    "control_socket",
    "metrics",
    "state_dir",
)


async def _run_gateway(
    cfg: GatewayConfig, config_path: str, stop: asyncio.Event, lock: InstanceLock
) -> int:
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
        state_dir=cfg.state_dir,
        allow_rollback=cfg.pki.crl_rollback == CrlRollback.ALLOW,
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
            await gateway.refresh_host_addresses()
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
        for key in ("max_pending_handshakes", "max_pending_per_source", "max_pending_per_subnet"):
            if getattr(new.limits, key) != getattr(old.limits, key):
                report.errors.append(f"limits.{key}: changed, takes effect after a restart")
        if new.handshake_timeout != old.handshake_timeout:
            report.errors.append(
                "handshake_timeout: the TLS part takes effect after a restart "
                "(the tunnel-setup part applies to new sessions now)"
            )
        _reload_log(old, new, report)
        return report

    fatal: list[str] = []

    def on_fatal(why: str) -> None:
        fatal.append(why)
        stop.set()

    async with _netlink() as net, contextlib.AsyncExitStack() as undo:
        state = await _claim_tun(cfg.tun.name, net, lock)
        tun = _open_tun(cfg.tun.name, cfg.tun.offload and probe_offload())
        log.info("TUN %s offload %s", cfg.tun.name, "on" if tun.vnet_hdr else "off")
        undo.callback(tun.close)
        await _guard(net.set_link_alias(cfg.tun.name, format_alias(os.getpid())))
        writer = ThreadedTunWriter(tun)
        undo.callback(writer.close)  # runs before tun.close (LIFO)
        nft: NftablesRuleset | None = None
        guard = cfg.nftables.forward_filter
        if not guard:
            log.warning(
                "nftables.forward_filter is OFF: this gateway is an OPEN ROUTER (anyone on "
                "the underlay can route into the LAN and the overlay); turn it back on"
            )
        if cfg.nat == NatMode.MASQUERADE or cfg.nftables.anti_spoofing or guard:
            nft = NftablesRuleset(cfg.tun.name)
            state.nft_tables.append(nft.table)
            state.save(lock.state_path)
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
            on_fatal=on_fatal,
        )
        if not cfg.policy.rules:
            log.warning(
                "policy has no rules: verified peers can reach NOTHING (default deny); "
                "see config/policy.yaml"
            )
        await _guard(gateway.start())
        undo.push_async_callback(gateway.stop)
        if cfg.forwarding:
            # The value before vpnd FIRST changed it is kept under the runtime dir, so a
            # restart after a crash never takes vpnd's own "1" for the original.
            ledger = SysctlLedger(lock.dir, netns=lock.netns)
            for v6 in _forwarding_families(overlays, cfg.push_routes):
                key = forwarding_key(ipv6=v6)
                try:
                    ledger.hold(net, key, "1", os.getpid())
                except (NetError, RuntimeDirError, OSError) as err:
                    raise StartupError(f"forwarding: {err}") from None
                undo.callback(_release_sysctl, ledger, net, key)

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
                max_pending_per_subnet=cfg.limits.max_pending_per_subnet,
                max_write_backlog=cfg.limits.peer_queue_bytes + cfg.limits.max_frame,
            )
        except OSError as err:
            raise StartupError(f"listen {cfg.listen}: {err.strerror}") from None
        watcher.start()
        undo.push_async_callback(watcher.stop)
        expiry = asyncio.create_task(_expiry_warnings(cfg))
        undo.callback(expiry.cancel)

        _reload_on_sighup(control.reload, undo)
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
    return 1 if fatal else 0


def _release_sysctl(ledger: SysctlLedger, net: PyRoute2Configurator, key: str) -> None:
    try:
        restored = ledger.release(net, key, os.getpid())
    except (NetError, OSError) as err:
        log.error("could not restore %s: %s (run 'vpnd cleanup')", key.replace("/", "."), err)
        return
    if restored:
        log.info("%s", restored)


def _fmt(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


async def _expiry_warnings(cfg: GatewayConfig | ClientConfig) -> None:
    """Re-check our own certificate's expiry every 6 hours: expiry is never a surprise."""
    while True:
        await asyncio.sleep(6 * 3600)
        _own_certificate(cfg, dt.datetime.now(dt.UTC))


def _client_settings(cfg: ClientConfig, offload_ok: bool) -> ClientSettings:
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


def _warn_if_not_forwarding(routes: tuple[IPNetwork, ...]) -> None:
    """A site router (certificate routes) needs the kernel to forward its LAN's packets."""
    for version, path in ((4, "/proc/sys/net/ipv4/ip_forward"),
                          (6, "/proc/sys/net/ipv6/conf/all/forwarding")):  # fmt: skip
        nets = [str(n) for n in routes if n.version == version]
        if not nets:
            continue
        try:
            on = Path(path).read_text().strip() == "1"
        except OSError:
            continue
        if not on:
            log.warning(
                "this certificate routes %s (site-to-site) but %s is 0: hosts behind "
                "this machine cannot use the tunnel until forwarding is enabled",
                ", ".join(nets),
                path.removeprefix("/proc/sys/").replace("/", "."),
            )


# Client keys a running client cannot change: they need a restart (reload reports them).
_CLIENT_RESTART_KEYS = ("control_socket", "metrics")


async def _run_client(
    cfg: ClientConfig, stop: asyncio.Event, lock: InstanceLock, config_path: str = ""
) -> int:
    now = dt.datetime.now(dt.UTC)
    _own_certificate(cfg, now)
    current = cfg  # replaced by each successful reload (SIGHUP, `vpnctl reload`)
    try:
        # A client checks the gateway against its CA; a CRL is optional on clients.
        trust = load_trust_store(cfg.pki.ca, cfg.pki.crl, crl_required=False)
    except PkiError as err:
        raise StartupError(str(err)) from None
    passphrase = _passphrase(cfg.pki.key_passphrase_file)

    def make_context() -> ssl.SSLContext:
        return client_context(
            ca=current.pki.ca,
            cert=current.pki.cert,
            key=current.pki.key,
            key_passphrase=passphrase,
        )

    try:
        good = [make_context()]  # the last context that loaded; replaced on renewal
    except TlsConfigError as err:
        raise StartupError(str(err)) from None
    offload_ok = cfg.tun.offload and probe_offload()
    try:
        settings = _client_settings(cfg, offload_ok)
    except PkiError as err:
        raise StartupError(str(err)) from None
    _warn_if_not_forwarding(settings.own_routes)

    async def dial() -> TlsConnection:
        return await connect(
            current.server.host,
            current.server.port,
            good[0],
            server_hostname=current.server_name,
            timeout=current.handshake_timeout,
        )

    def files() -> tuple[tuple[int, int], ...]:
        out = []
        for path in (current.pki.cert, current.pki.key, current.pki.ca):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    async def refresh(client: Client, *, rotate: bool = True) -> ReloadReport:
        """Adopt changed certificate/key/CA files and move the live tunnel onto them."""
        try:
            ctx = make_context()
            new_trust = load_trust_store(current.pki.ca, current.pki.crl, crl_required=False)
            cert = load_certificate(current.pki.cert)
            routes = peer_attributes_of(cert).routes
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        report = ReloadReport()
        if routes != client.settings.own_routes:
            report.changed.extend(
                client.reconfigure(dataclasses.replace(client.settings, own_routes=routes))
            )
            _warn_if_not_forwarding(routes)
        if cert.fingerprint(hashes.SHA256()) != own[0].fingerprint(hashes.SHA256()):
            report.changed.append(
                f"certificate: now serial {cert.serial_number:x}, valid until "
                f"{cert.not_valid_after_utc.isoformat()}"
            )
        good[0], own[0] = ctx, cert
        client.trust = new_trust
        _own_certificate(current, dt.datetime.now(dt.UTC))
        if rotate and report.changed and client.connected.is_set():
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

    async def reload(client: Client) -> ReloadReport:
        """Re-read the config, certificate, key and CA; keep the tunnel unless something
        it was built with changed. Validated first: on error nothing changes."""
        nonlocal current, passphrase
        if not config_path:
            return await refresh(client)
        new = load_config(config_path)  # ConfigError: refused, the running config kept
        if not isinstance(new, ClientConfig):
            raise ConfigError(config_path, "mode", "changed to gateway: restart vpnd instead")
        try:
            new_passphrase = _passphrase(new.pki.key_passphrase_file)
        except StartupError as err:
            raise PkiError(str(err)) from None
        try:
            client_context(ca=new.pki.ca, cert=new.pki.cert, key=new.pki.key,
                           key_passphrase=new_passphrase)  # fmt: skip
            load_trust_store(new.pki.ca, new.pki.crl, crl_required=False)
            new_settings = _client_settings(new, offload_ok)
        except TlsConfigError as err:
            raise PkiError(str(err)) from None
        old = current
        current, passphrase = new, new_passphrase
        _, reconnect = settings_changes(client.settings, new_settings)
        # A new session is coming anyway: no make-before-break rotation onto the old server.
        report = await refresh(client, rotate=not reconnect)
        report.changed.extend(client.reconfigure(new_settings))
        if reconnect and client.connected.is_set():
            report.changed.append("the tunnel reconnects to apply it")
        for key in _CLIENT_RESTART_KEYS:
            if getattr(new, key) != getattr(old, key):
                report.errors.append(f"{key}: changed, takes effect after a restart")
        _reload_log(old, new, report)
        return report

    own = [load_certificate(cfg.pki.cert)]
    async with _netlink() as net, contextlib.AsyncExitStack() as undo:
        await _claim_tun(cfg.tun.name, net, lock)
        client = Client(
            settings,
            connect=dial,
            tun_factory=_open_tun,
            tun_writer=ThreadedTunWriter,
            net=net,
            trust=trust,
            local_check=lambda: _validity_problem(cfg.pki.cert, own[0]),
        )
        control = ClientControl(
            client,
            started_at=time.time(),
            server=str(cfg.server),
            tun=cfg.tun.name,
            own_cert=lambda: own[0],
            ca_cert=trust.roots[0],
            reload=lambda: reload(client),
        )
        server_ctl = ControlServer(cfg.control_socket, control)
        try:
            await server_ctl.start()
        except ControlServerError as err:
            raise StartupError(f"control_socket: {err}") from None
        undo.push_async_callback(server_ctl.close)
        task = asyncio.create_task(client.run())

        _reload_on_sighup(control.reload, undo)
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
    return 1 if client.fatal else 0


def _validity_problem(path: Path, cert: x509.Certificate) -> str | None:
    """Our own certificate outside its validity period (wall time): a permanent local error."""
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return (
            f"pki.cert: own certificate {path} expired at "
            f"{cert.not_valid_after_utc.isoformat()}; ask your admin for a new one"
        )
    if now < cert.not_valid_before_utc:
        return (
            f"pki.cert: own certificate {path} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}; check the clock"
        )
    return None


def _reload_log(
    old: GatewayConfig | ClientConfig, new: GatewayConfig | ClientConfig, report: ReloadReport
) -> None:
    """The log level changes live; the log format needs a restart (both modes)."""
    if new.log.level != old.log.level:
        logging.getLogger().setLevel(new.log.level.value.upper())
        report.changed.append(f"log level: {old.log.level.value} -> {new.log.level.value}")
    if new.log.format != old.log.format:
        report.errors.append("log.format: changed, takes effect after a restart")


def _reload_on_sighup(
    reload: Callable[[], Awaitable[ReloadReport]], undo: contextlib.AsyncExitStack
) -> None:
    """SIGHUP (``systemctl reload``) runs the same reload as ``vpnctl reload``, logged."""
    tasks: set[asyncio.Task[None]] = set()

    async def on_sighup() -> None:
        sdnotify.reloading()
        try:
            report = await reload()
            log.info("SIGHUP reload: %s", "; ".join(report.changed) or "no change")
            for line in report.errors:
                log.warning("SIGHUP reload: %s", line)
        except ControlError as err:
            log.error("SIGHUP reload refused: %s", err.message)
        finally:
            sdnotify.ready()

    def sighup() -> None:
        task = asyncio.create_task(on_sighup())
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, sighup)
    undo.callback(loop.remove_signal_handler, signal.SIGHUP)


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
