"""Start-up steps both modes share, and the edges a service is built on.

``Edges`` names every piece of I/O a service uses (netlink, TUN, nftables, the TLS
listener and dialer, clocks); the defaults are the real ones, tests pass fakes.
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
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509

from vpnd.config import ClientConfig, GatewayConfig
from vpnd.control.messages import ControlError, ReloadReport
from vpnd.files.passphrase import PassphraseError, read_passphrase
from vpnd.net.errors import NetError, TunError
from vpnd.net.netlink import NetConfigurator, PyRoute2Configurator, forwarding_key
from vpnd.net.nftables import NftablesRuleset
from vpnd.net.ownership import LinkOwner, classify_link
from vpnd.net.tun import LinuxTun, TunDevice, probe_offload
from vpnd.net.tun_writer import ThreadedTunWriter
from vpnd.pki import TrustStore
from vpnd.pki.authority import ca_networks
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.keys import fingerprint, load_certificate
from vpnd.service import sdnotify
from vpnd.service.cleanup import safe_undo
from vpnd.service.runstate import InstanceLock, InstanceState, RuntimeDirError, SysctlLedger
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.tlsctx import TlsConfigError

log = logging.getLogger("vpnd")
T = TypeVar("T")

EXPIRY_CHECK_INTERVAL = 6 * 3600.0
"""Seconds between re-checks of our own certificate's expiry."""


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


class Listener(Protocol):
    """What the service keeps of the TLS listener: a way to stop accepting."""

    def close(self) -> None: ...


def open_tun(name: str, offload: bool = False) -> LinuxTun:
    """The real TUN; offload falls back to none if the kernel refuses it."""
    if offload:
        try:
            return LinuxTun.open(name, offload=True)
        except TunError as err:
            log.warning("TUN offload unavailable (%s): continuing without it", err)
    try:
        return LinuxTun.open(name)
    except TunError as err:
        raise StartupError(str(err)) from None


@dataclasses.dataclass
class Edges:
    """The I/O a service runs on. ``wall`` is for certificate validity and timestamps
    people read; ``sleep`` paces the periodic checks (file watch, expiry)."""

    net: Callable[[], NetConfigurator] = PyRoute2Configurator
    open_tun: Callable[[str, bool], TunDevice] = open_tun
    tun_writer: Callable[[TunDevice], ThreadedTunWriter] = ThreadedTunWriter
    probe_offload: Callable[[], bool] = probe_offload
    firewall: Callable[[str], NftablesRuleset] = NftablesRuleset
    listen: Callable[..., Awaitable[Any]] = serve
    """``vpnd.transport.connection.serve``'s signature; returns a ``Listener``."""
    dial: Callable[..., Awaitable[TlsConnection]] = connect
    """``vpnd.transport.connection.connect``'s signature."""
    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    signals: bool = True
    """Install the SIGHUP reload handler (off where a test owns the signals)."""

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.wall(), dt.UTC)


async def guard(aw: Awaitable[T]) -> T:
    """Kernel set-up failures (netlink, nft) stop start-up with a clear message."""
    try:
        return await aw
    except NetError as err:
        raise StartupError(str(err)) from None


async def claim_tun(name: str, net: NetConfigurator, lock: InstanceLock) -> InstanceState:
    """Undo what a dead vpnd left; refuse a TUN name vpnd does not own; record the TUN."""
    ledger = SysctlLedger(lock.dir, netns=lock.netns)
    for line in await guard(safe_undo(lock, net, ledger)):
        log.warning("cleaned up after a previous vpnd: %s", line)
    exists, alias = await guard(net.link_alias(name))
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
        await guard(net.delete_link(name))
    state = InstanceState(pid=os.getpid(), tun=name, links=[name])
    state.save(lock.state_path)  # before the TUN exists: a crash from here on is recorded
    return state


def forwarding_families(
    overlays: tuple[IPNetwork, ...], push_routes: tuple[IPNetwork, ...]
) -> list[bool]:
    """[ipv6?] for each forwarding sysctl the gateway needs: IPv4 always; IPv6 when the
    overlay or a pushed route is IPv6 (a peer's routed IPv6 subnet needs an IPv6 overlay:
    the TUN has IPv6 disabled otherwise)."""
    v6 = any(n.version == 6 for n in (*overlays, *push_routes))
    return [False, True] if v6 else [False]


def hold_forwarding(
    lock: InstanceLock,
    net: NetConfigurator,
    families: list[bool],
    undo: contextlib.AsyncExitStack,
) -> None:
    """Turn forwarding on; restored at stop. The value before vpnd FIRST changed it is
    kept under the runtime dir, so a restart after a crash never takes vpnd's own "1"
    for the original."""
    ledger = SysctlLedger(lock.dir, netns=lock.netns)
    for v6 in families:
        key = forwarding_key(ipv6=v6)
        try:
            ledger.hold(net, key, "1", os.getpid())
        except (NetError, RuntimeDirError, OSError) as err:
            raise StartupError(f"forwarding: {err}") from None
        undo.callback(release_sysctl, ledger, net, key)


def release_sysctl(ledger: SysctlLedger, net: NetConfigurator, key: str) -> None:
    try:
        restored = ledger.release(net, key, os.getpid())
    except (NetError, OSError) as err:
        log.error("could not restore %s: %s (run 'vpnd cleanup')", key.replace("/", "."), err)
        return
    if restored:
        log.info("%s", restored)


def key_passphrase(path: Path | None) -> bytes | None:
    """The private key's passphrase, if the config names a file (StartupError if bad)."""
    if path is None:
        return None
    try:
        return read_passphrase(path)
    except PassphraseError as err:
        raise StartupError(f"pki.key_passphrase_file: {err}") from None


def reload_passphrase(path: Path | None) -> bytes | None:
    """As ``key_passphrase``, for a reload: refused as a PKI problem."""
    try:
        return key_passphrase(path)
    except StartupError as err:
        raise PkiError(str(err)) from None


def log_own_certificate(cfg: GatewayConfig | ClientConfig, now: dt.datetime) -> x509.Certificate:
    """Load and describe our certificate; an expired or expiring one is said loudly."""
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
    if isinstance(cfg, ClientConfig) and cfg.renewal.enabled:
        _renewal_expiry_warning(cfg, cert, now)
    elif left.total_seconds() <= 0:
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
    return cert


RENEWAL_OVERDUE = 0.1
"""Fraction of the lifetime past ``renewal.at`` after which a client that renews on its
own warns that it has not managed to (short-lived certificates are always "expiring")."""


def _renewal_expiry_warning(cfg: ClientConfig, cert: x509.Certificate, now: dt.datetime) -> None:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > na:
        log.error(
            "own certificate EXPIRED at %s; renewal is on: connecting so the gateway can "
            "admit us to renew (if its grace period allows), else ask your admin",
            na.isoformat(),
        )
        return
    lifetime = (na - nb).total_seconds()
    elapsed = (now - nb).total_seconds()
    if lifetime > 0 and elapsed / lifetime >= min(0.99, cfg.renewal.at + RENEWAL_OVERDUE):
        left = na - now
        log.warning(
            "own certificate expires in %s (%s) and automatic renewal has not succeeded "
            "yet: see vpnctl status",
            f"{left.days} days" if left.days else f"{int(left.total_seconds() // 3600)} hours",
            na.isoformat(),
        )


async def expiry_warnings(config: Callable[[], GatewayConfig | ClientConfig], edges: Edges) -> None:
    """Re-check our own certificate's expiry every 6 hours: expiry is never a surprise."""
    while True:
        await edges.sleep(EXPIRY_CHECK_INTERVAL)
        with contextlib.suppress(StartupError):  # a missing file is reported by reload
            log_own_certificate(config(), edges.now())


def validity_problem(path: Path, cert: x509.Certificate, now: dt.datetime) -> str | None:
    """Our own certificate outside its validity period (wall time): a permanent local error."""
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


def overlay_networks(trust: TrustStore) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for root in trust.roots:
        nets.extend(n for n in ca_networks(root) if n not in nets)
    if not nets:
        raise StartupError("the CA certificate has no permitted IP subtrees (overlay networks)")
    return tuple(nets)


def san_addresses(cert: x509.Certificate) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.IPAddress))  # type: ignore[arg-type]


def apply_log_settings(
    old: GatewayConfig | ClientConfig, new: GatewayConfig | ClientConfig, report: ReloadReport
) -> None:
    """The log level changes live (the format needs a restart: the plan reports it)."""
    if new.log.level != old.log.level:
        logging.getLogger().setLevel(new.log.level.value.upper())
        report.changed.append(f"log level: {old.log.level.value} -> {new.log.level.value}")


def reload_on_sighup(
    reload: Callable[[], Awaitable[ReloadReport]], undo: contextlib.AsyncExitStack
) -> None:
    """SIGHUP (``systemctl reload``) runs the same reload as ``vpnctl reload``, logged."""
    tasks: set[asyncio.Task[None]] = set()

    def sighup() -> None:
        task = asyncio.create_task(logged_reload(reload, "SIGHUP"))
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, sighup)
    undo.callback(loop.remove_signal_handler, signal.SIGHUP)


async def logged_reload(reload: Callable[[], Awaitable[ReloadReport]], why: str) -> None:
    sdnotify.reloading()
    try:
        report = await reload()
        log.info("%s reload: %s", why, "; ".join(report.changed) or "no change")
        for line in report.errors:
            log.warning("%s reload: %s", why, line)
    except ControlError as err:
        log.error("%s reload refused: %s", why, err.message)
    finally:
        sdnotify.ready()


def check_ssl_context(build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """Build a TLS context at start: a bad file stops start-up with its one line."""
    try:
        return build()
    except TlsConfigError as err:
        raise StartupError(str(err)) from None
