"""The bridge from a running client to the control API (`vpnctl status` on a laptop)."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from cryptography import x509

from vpnd import __version__
from vpnd.config import ConfigError
from vpnd.control.messages import (
    ControlError,
    ErrorCode,
    KickResult,
    PeerInfo,
    ReloadReport,
    RenewalStatus,
    RenewHintResult,
    RenewResult,
    StatusInfo,
)
from vpnd.control.summaries import cert_summary, days_left, iso_utc
from vpnd.pki.identity import PeerIdentity, PkiError
from vpnd.proto import SessionCounters


class ClientView(Protocol):
    """What the client bridge reads of a ``vpnd.client.Client``."""

    @property
    def gateway(self) -> PeerIdentity | None: ...
    @property
    def connected_since(self) -> float | None: ...
    @property
    def drops(self) -> Mapping[str, int]: ...
    def counters(self) -> SessionCounters | None: ...


class RenewalView(Protocol):
    """What the client bridge uses of a ``vpnd.client.renewal.Renewer``."""

    def status(self) -> RenewalStatus: ...
    async def renew_now(self) -> object | None: ...
    @property
    def last_error(self) -> str | None: ...


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
        renewer: RenewalView | None = None,
    ) -> None:
        self.client = client
        self.started_at = started_at
        self.server = server
        self.tun = tun
        self._own_cert = own_cert
        self.ca_cert = ca_cert
        self._reload = reload
        self._clock = clock
        self.renewer = renewer

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
            renewal=self.renewer.status() if self.renewer is not None else None,
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
                connected_since=iso_utc(dt.datetime.fromtimestamp(since, dt.UTC)),
                bytes_in=counters.bytes_in,
                bytes_out=counters.bytes_out,
                packets_in=counters.packets_in,
                packets_out=counters.packets_out,
                drops=dict(counters.drops),
                cert_not_after=iso_utc(gw.not_after),
                cert_days_left=days_left(gw.not_after, now),
            )
        ]

    async def kick(self, name: str, reason: str) -> KickResult:
        raise ControlError(ErrorCode.BAD_REQUEST, "kick is a gateway command; this is a client")

    async def renew_hint(self, name: str, reason: str) -> RenewHintResult:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            "renew-hint is a gateway command; on this client use: vpnctl renew",
        )

    async def renew(self) -> RenewResult:
        """Renew our certificate over the tunnel now; the answer names the certificate
        in use afterwards. A failure is an error reply with the one-line reason."""
        if self.renewer is None:
            raise ControlError(ErrorCode.BAD_REQUEST, "this client has no renewer")
        renewed = await self.renewer.renew_now()
        if renewed is None:
            why = self.renewer.last_error or "see the log"
            raise ControlError(ErrorCode.BUSY, f"renewal failed: {why} (retried with backoff)")
        cert = cert_summary(self._own_cert(), self._clock())
        return RenewResult(
            renewed=True,
            serial=cert.serial,
            fingerprint=cert.fingerprint,
            not_after=cert.not_after,
            message="renewed; the tunnel moved onto the new certificate",
        )

    async def reload(self) -> ReloadReport:
        try:
            return await self._reload()
        except (ConfigError, PkiError) as err:
            raise ControlError(
                ErrorCode.INVALID_CONFIG, f"{err} (the running config is unchanged)"
            ) from None
