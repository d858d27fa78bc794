"""The bridge from a running gateway to the control API and the metrics snapshot.

Reads the gateway's state (peers, counters) and turns it into the control message
shapes; the only thing it changes is through ``gateway.kick`` and the daemon's reload.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from cryptography import x509

from vpnd import __version__
from vpnd.config import ConfigError
from vpnd.control.messages import (
    ControlError,
    CrlSummary,
    ErrorCode,
    KickResult,
    PeerInfo,
    ReloadReport,
    RenewHintResult,
    RenewResult,
    StatusInfo,
)
from vpnd.control.summaries import (
    PeerView,
    cert_summary,
    peer_info,
    seconds_left,
)
from vpnd.pki.identity import PkiError
from vpnd.telemetry.metrics import CertExpiry, MetricsSnapshot

audit = logging.getLogger("vpnd.audit")


class SettingsView(Protocol):
    @property
    def tun_name(self) -> str: ...


class FirewallView(Protocol):
    @property
    def stats(self) -> Mapping[str, int]: ...


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
    @property
    def firewall(self) -> FirewallView: ...
    def kick(self, name: str, reason: str) -> int: ...
    def renew_hint(self, name: str, reason: str) -> int: ...


class LifecycleView(Protocol):
    """What the bridge reads of ``vpnd.gateway.lifecycle.GatewayLifecycle``."""

    @property
    def counts(self) -> Mapping[str, int]: ...
    def issuer_cert(self) -> x509.Certificate | None: ...
    def issuer_warning(self, now: dt.datetime) -> str | None: ...


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
        poke_inventory: Callable[[], None] | None = None,
        enrollments: Callable[[], Mapping[str, int]] = dict,
        lifecycle: LifecycleView | None = None,
    ) -> None:
        """``enrollments``: the enrollment handler's outcome counts (metrics)."""
        self.gateway = gateway
        self._enrollments = enrollments
        self._lifecycle = lifecycle
        self.started_at = started_at
        self.listen = listen
        self._reload = reload
        self.own_cert = own_cert
        self.ca_cert = ca_cert
        self._crl_info = crl_info
        self._policy_rules = policy_rules
        self._clock = clock
        self._poke_inventory = poke_inventory
        self.kernel_drops: dict[str, int] = {}
        """vpnd's nftables drop counters by name (``forward_dropped``...), kept fresh by the
        daemon; shown as ``vpnd_drops{reason="nft_<name>"}``."""

    def _admitted(self) -> list[PeerView]:
        # A copy: the caller may yield to the loop while the gateway changes the dict.
        # A renewed peer's old session, draining for a second, is not a second peer.
        return [
            p
            for p in list(self.gateway.peers.values())
            if p.admitted and getattr(p, "successor", None) is None
        ]

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
            **self._lifecycle_status(now),
        )

    def _lifecycle_status(self, now: float) -> dict[str, Any]:
        life = self._lifecycle
        if life is None:
            return {}
        counts = dict(life.counts)
        counts["quarantines"] = self.gateway.totals.get("quarantines", 0)
        issuer = life.issuer_cert()
        return {
            "issuer": cert_summary(issuer, now) if issuer is not None else None,
            "issuer_warning": life.issuer_warning(dt.datetime.fromtimestamp(now, dt.UTC)),
            "lifecycle": counts,
        }

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

    async def renew_hint(self, name: str, reason: str) -> RenewHintResult:
        """``vpnctl update --now``: re-read the inventory, then ask the peer to renew."""
        if self._poke_inventory is not None:
            self._poke_inventory()
        asked = self.gateway.renew_hint(name, reason or "your certificate's terms changed")
        audit.info(
            "renew hint to %s: %d session(s)",
            name,
            asked,
            extra={"event": "renew_hint", "peer": name, "sessions": asked},
        )
        if asked == 0:
            raise ControlError(
                ErrorCode.NOT_FOUND,
                f"no connected peer named {name!r} (it gets the new terms when it next renews)",
            )
        return RenewHintResult(name, asked)

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

    async def renew(self) -> RenewResult:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            "renew is a client command; a gateway's certificate comes from vpnctl issue",
        )

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
            CertExpiry(
                "own", cert_summary(self.own_cert, now).name, seconds_left(self.own_cert, now)
            ),
            CertExpiry("ca", cert_summary(self.ca_cert, now).name, seconds_left(self.ca_cert, now)),
            *(CertExpiry("peer", name, left) for name, left in sorted(soonest.items())),
        ]
        issuer = self._lifecycle.issuer_cert() if self._lifecycle is not None else None
        if issuer is not None:
            summary = cert_summary(issuer, now)
            expiry.append(CertExpiry("issuer", summary.name, seconds_left(issuer, now)))
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
            firewall=dict(self.gateway.firewall.stats),
            enrollments=dict(self._enrollments()),
            renewals={
                k.removeprefix("renewals_"): v
                for k, v in (self._lifecycle.counts if self._lifecycle else {}).items()
                if k.startswith("renewals_")
            },
            quarantines=totals.get("quarantines", 0),
            supersedes=self._lifecycle.counts.get("supersedes", 0) if self._lifecycle else 0,
        )
