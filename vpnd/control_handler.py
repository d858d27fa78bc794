"""The bridge from a running gateway to the control API and the metrics snapshot.

Reads the gateway's state (peers, counters) and turns it into the control message
shapes; the only thing it changes is through ``gateway.kick`` and the daemon's reload.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from vpnd import __version__
from vpnd.config import ConfigError
from vpnd.control.messages import (
    CertSummary,
    ControlError,
    CrlSummary,
    ErrorCode,
    KickResult,
    PeerInfo,
    ReloadReport,
    StatusInfo,
)
from vpnd.metrics import CertExpiry, MetricsSnapshot
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import PeerIdentity, PkiError
from vpnd.pki.keys import fingerprint
from vpnd.proto import SessionCounters

audit = logging.getLogger("vpnd.audit")

DAY = 86400.0


class PeerView(Protocol):
    """What the bridge reads of a ``vpnd.gateway.Peer``."""

    @property
    def identity(self) -> PeerIdentity: ...
    @property
    def remote(self) -> str: ...
    @property
    def connected_at(self) -> float: ...
    @property
    def admitted(self) -> bool: ...
    @property
    def drops(self) -> Mapping[str, int]: ...
    @property
    def packets_in(self) -> int: ...
    @property
    def packets_out(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...


class SettingsView(Protocol):
    @property
    def tun_name(self) -> str: ...


class GatewayView(Protocol):
    """What the bridge needs of a ``vpnd.gateway.Gateway``."""

    @property
    def peers(self) -> Mapping[int, PeerView]: ...
    @property
    def handshakes(self) -> Mapping[str, int]: ...
    @property
    def drops(self) -> Mapping[str, int]: ...
    @property
    def settings(self) -> SettingsView: ...
    @property
    def totals(self) -> Mapping[str, int]: ...
    def kick(self, name: str, reason: str) -> int: ...


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _days_left(not_after: dt.datetime, now: float) -> int:
    return math.floor((not_after.timestamp() - now) / DAY)


def cert_summary(cert: x509.Certificate, now: float) -> CertSummary:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    return CertSummary(
        name=name,
        serial=f"{cert.serial_number:x}",
        fingerprint=fingerprint(cert),
        not_after=_iso(cert.not_valid_after_utc),
        days_left=_days_left(cert.not_valid_after_utc, now),
    )


def crl_summary(crl: x509.CertificateRevocationList, now: float) -> CrlSummary:
    """For ``GatewayControl(crl_info=...)``: the loaded CRL's number and freshness."""
    next_update = crl.next_update_utc
    if next_update is None:  # no promise of freshness: treat as stale
        return CrlSummary(crl_number(crl), "", 0.0, stale=True)
    left = next_update.timestamp() - now
    return CrlSummary(crl_number(crl), _iso(next_update), left, stale=left < 0)


def peer_info(peer: PeerView, now: float) -> PeerInfo:
    ident = peer.identity
    return PeerInfo(
        name=ident.name,
        serial=ident.serial_hex,
        fingerprint=ident.fingerprint,
        addresses=[str(a) for a in ident.addresses],
        groups=sorted(ident.groups),
        remote=peer.remote,
        connected_since=_iso(dt.datetime.fromtimestamp(peer.connected_at, dt.UTC)),
        bytes_in=peer.bytes_in,
        bytes_out=peer.bytes_out,
        packets_in=peer.packets_in,
        packets_out=peer.packets_out,
        drops={k: v for k, v in peer.drops.items() if v},
        cert_not_after=_iso(ident.not_after),
        cert_days_left=_days_left(ident.not_after, now),
    )


class GatewayControl:
    """Implements ``vpnd.control.server.ControlHandler`` for a running gateway."""

    def __init__(
        self,
        gateway: GatewayView,
        *,
        started_at: float,
        listen: str,
        reload: Callable[[], Awaitable[ReloadReport]],
        own_cert: x509.Certificate,
        ca_cert: x509.Certificate,
        crl_info: Callable[[], CrlSummary | None],
        policy_rules: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway = gateway
        self.started_at = started_at
        self.listen = listen
        self._reload = reload
        self.own_cert = own_cert
        self.ca_cert = ca_cert
        self._crl_info = crl_info
        self._policy_rules = policy_rules
        self._clock = clock
        self.kernel_drops: dict[str, int] = {}
        """vpnd's nftables drop counters by name (``forward_dropped``...), kept fresh by the
        daemon; shown as ``vpnd_drops{reason="nft_<name>"}``."""

    def _admitted(self) -> list[PeerView]:
        # A copy: the caller may yield to the loop while the gateway changes the dict.
        return [p for p in list(self.gateway.peers.values()) if p.admitted]

    def _drops(self, peers: list[PeerView]) -> dict[str, int]:
        # Gateway-level drops plus those of the peers still connected.
        total: dict[str, int] = {k: v for k, v in self.gateway.drops.items() if v}
        for peer in peers:
            for reason, count in peer.drops.items():
                if count:
                    total[reason] = total.get(reason, 0) + count
        for name, count in self.kernel_drops.items():
            total[f"nft_{name}"] = count
        return total

    async def status(self) -> StatusInfo:
        now = self._clock()
        peers = self._admitted()
        return StatusInfo(
            role="gateway",
            version=__version__,
            pid=os.getpid(),
            uptime_s=max(0.0, now - self.started_at),
            listen=self.listen,
            tun=self.gateway.settings.tun_name,
            sessions=len(peers),
            handshakes={k: v for k, v in self.gateway.handshakes.items() if v},
            drops=self._drops(peers),
            cert=cert_summary(self.own_cert, now),
            ca=cert_summary(self.ca_cert, now),
            crl=self._crl_info(),
            policy_rules=self._policy_rules(),
        )

    async def peers(self) -> list[PeerInfo]:
        now = self._clock()
        infos = [peer_info(p, now) for p in self._admitted()]
        return sorted(infos, key=lambda p: (p.name, p.connected_since, p.serial))

    async def kick(self, name: str, reason: str) -> KickResult:
        # gateway.kick audits each closed session with its serial and fingerprint.
        closed = self.gateway.kick(name, reason or "kicked by an administrator")
        if closed == 0:
            raise ControlError(ErrorCode.NOT_FOUND, f"no connected peer named {name!r}")
        return KickResult(name, closed)

    async def reload(self) -> ReloadReport:
        try:
            report = await self._reload()
        except (ConfigError, PkiError) as err:
            audit.warning(
                "reload refused, old config kept: %s",
                err,
                extra={"event": "reload_refused", "error": str(err)},
            )
            raise ControlError(
                ErrorCode.INVALID_CONFIG, f"{err} (the running config is unchanged)"
            ) from None
        audit.info(
            "reload: %d change(s), %d peer(s) closed",
            len(report.changed),
            len(report.closed),
            extra={"event": "reload", "changed": report.changed, "closed": report.closed},
        )
        return report

    def metrics_snapshot(self) -> MetricsSnapshot:
        """For ``MetricsExporter(snapshot=...)``."""
        now = self._clock()
        peers = self._admitted()
        soonest: dict[str, float] = {}
        for p in peers:
            left = p.identity.not_after.timestamp() - now
            # One series per name: with two certificates connected, the sooner one matters.
            soonest[p.identity.name] = min(left, soonest.get(p.identity.name, left))
        expiry = [
            CertExpiry("own", cert_summary(self.own_cert, now).name, _seconds(self.own_cert, now)),
            CertExpiry("ca", cert_summary(self.ca_cert, now).name, _seconds(self.ca_cert, now)),
            *(CertExpiry("peer", name, left) for name, left in sorted(soonest.items())),
        ]
        crl = self._crl_info()
        totals = self.gateway.totals
        return MetricsSnapshot(
            sessions=len(peers),
            handshakes=dict(self.gateway.handshakes),
            # Departed peers' counters are folded into gateway totals: never decreasing.
            bytes_in=totals.get("bytes_in", 0) + sum(p.bytes_in for p in peers),
            bytes_out=totals.get("bytes_out", 0) + sum(p.bytes_out for p in peers),
            packets_in=totals.get("packets_in", 0) + sum(p.packets_in for p in peers),
            packets_out=totals.get("packets_out", 0) + sum(p.packets_out for p in peers),
            drops=self._drops(peers),
            cert_expiry=tuple(expiry),
            crl_next_update_seconds=None if crl is None else crl.seconds_left,
            clone_holddowns=totals.get("clone_holddowns", 0),
        )


def _seconds(cert: x509.Certificate, now: float) -> float:
    return cert.not_valid_after_utc.timestamp() - now


class ClientView(Protocol):
    """What the client bridge reads of a ``vpnd.client.Client``."""

    @property
    def gateway(self) -> PeerIdentity | None: ...
    @property
    def connected_since(self) -> float | None: ...
    @property
    def drops(self) -> Mapping[str, int]: ...
    def counters(self) -> SessionCounters | None: ...


class ClientControl:
    """``vpnctl status`` / ``peers`` / ``reload`` on a laptop running the client.

    ``peers`` lists the one peer a client has: its gateway. ``kick`` is a gateway
    command. ``reload`` re-reads the certificate files and moves the live tunnel onto a
    renewed certificate (the same thing the file watcher does on its own).
    """

    def __init__(
        self,
        client: ClientView,
        *,
        started_at: float,
        server: str,
        tun: str,
        own_cert: Callable[[], x509.Certificate],
        ca_cert: x509.Certificate,
        reload: Callable[[], Awaitable[ReloadReport]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.started_at = started_at
        self.server = server
        self.tun = tun
        self._own_cert = own_cert
        self.ca_cert = ca_cert
        self._reload = reload
        self._clock = clock

    async def status(self) -> StatusInfo:
        now = self._clock()
        counters = self.client.counters()
        drops = {k: v for k, v in self.client.drops.items() if v}
        if counters is not None:
            for reason, count in counters.drops.items():
                drops[reason] = drops.get(reason, 0) + count
        return StatusInfo(
            role="client",
            version=__version__,
            pid=os.getpid(),
            uptime_s=max(0.0, now - self.started_at),
            listen=self.server,
            tun=self.tun,
            sessions=1 if self.client.gateway is not None else 0,
            handshakes={},
            drops=drops,
            cert=cert_summary(self._own_cert(), now),
            ca=cert_summary(self.ca_cert, now),
            crl=None,
            policy_rules=0,
        )

    async def peers(self) -> list[PeerInfo]:
        gw = self.client.gateway
        since = self.client.connected_since
        counters = self.client.counters()
        if gw is None or since is None or counters is None:
            return []
        now = self._clock()
        return [
            PeerInfo(
                name=gw.name,
                serial=gw.serial_hex,
                fingerprint=gw.fingerprint,
                addresses=[str(a) for a in gw.addresses],
                groups=sorted(gw.groups),
                remote=self.server,
                connected_since=_iso(dt.datetime.fromtimestamp(since, dt.UTC)),
                bytes_in=counters.bytes_in,
                bytes_out=counters.bytes_out,
                packets_in=counters.packets_in,
                packets_out=counters.packets_out,
                drops=dict(counters.drops),
                cert_not_after=_iso(gw.not_after),
                cert_days_left=_days_left(gw.not_after, now),
            )
        ]

    async def kick(self, name: str, reason: str) -> KickResult:
        raise ControlError(ErrorCode.BAD_REQUEST, "kick is a gateway command; this is a client")

    async def reload(self) -> ReloadReport:
        try:
            return await self._reload()
        except (ConfigError, PkiError) as err:
            raise ControlError(
                ErrorCode.INVALID_CONFIG, f"{err} (the running config is unchanged)"
            ) from None
