"""Control-API shapes built from certificates, CRLs and peers (pure: no I/O)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from vpnd.control.messages import (
    CertSummary,
    CrlSummary,
    PeerInfo,
)
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import PeerIdentity
from vpnd.pki.keys import fingerprint

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


def iso_utc(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def days_left(not_after: dt.datetime, now: float) -> int:
    return math.floor((not_after.timestamp() - now) / DAY)


def cert_summary(cert: x509.Certificate, now: float) -> CertSummary:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    return CertSummary(
        name=name,
        serial=f"{cert.serial_number:x}",
        fingerprint=fingerprint(cert),
        not_after=iso_utc(cert.not_valid_after_utc),
        days_left=days_left(cert.not_valid_after_utc, now),
    )


def crl_summary(crl: x509.CertificateRevocationList, now: float) -> CrlSummary:
    """For ``GatewayControl(crl_info=...)``: the loaded CRL's number and freshness."""
    next_update = crl.next_update_utc
    if next_update is None:  # no promise of freshness: treat as stale
        return CrlSummary(crl_number(crl), "", 0.0, stale=True)
    left = next_update.timestamp() - now
    return CrlSummary(crl_number(crl), iso_utc(next_update), left, stale=left < 0)


def peer_info(peer: PeerView, now: float) -> PeerInfo:
    ident = peer.identity
    # What the firewall applies: the certificate's groups capped by the inventory.
    view = getattr(peer, "view", None)
    groups = getattr(view, "groups", None)
    effective = groups if isinstance(groups, frozenset) else ident.groups
    return PeerInfo(
        name=ident.name,
        serial=ident.serial_hex,
        fingerprint=ident.fingerprint,
        addresses=[str(a) for a in ident.addresses],
        groups=sorted(effective),
        remote=peer.remote,
        connected_since=iso_utc(dt.datetime.fromtimestamp(peer.connected_at, dt.UTC)),
        bytes_in=peer.bytes_in,
        bytes_out=peer.bytes_out,
        packets_in=peer.packets_in,
        packets_out=peer.packets_out,
        drops={k: v for k, v in peer.drops.items() if v},
        cert_not_after=iso_utc(ident.not_after),
        cert_days_left=days_left(ident.not_after, now),
        generation=ident.generation,
    )


def seconds_left(cert: x509.Certificate, now: float) -> float:
    return cert.not_valid_after_utc.timestamp() - now
