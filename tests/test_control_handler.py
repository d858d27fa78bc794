"""GatewayControl: a fake gateway's state becomes status, peers, kick, reload and metrics."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from cryptography import x509
from pki_fixtures import DAY, NOW, make_ca

from vpnd.config import ConfigError
from vpnd.control.messages import ControlError, CrlSummary, ErrorCode, ReloadReport
from vpnd.control.server import ControlHandler
from vpnd.control.summaries import cert_summary, crl_summary
from vpnd.gateway.control import GatewayControl, GatewayView
from vpnd.gateway.shell import Gateway
from vpnd.pki.identity import PeerIdentity, PkiError, Role
from vpnd.pki.keys import fingerprint
from vpnd.telemetry.metrics import CertExpiry

T = TypeVar("T")
CA = make_ca()
OWN = CA.issue("gw1", role=Role.GATEWAY, dns_names=["gw.example"], not_after=NOW + 90 * DAY).cert
T0 = NOW.timestamp()


@dataclass(frozen=True)
class Settings:
    tun_name: str = "vpn0"


@dataclass
class FakePeer:
    identity: PeerIdentity
    remote: str
    connected_at: float
    admitted: bool = True
    drops: Counter[str] = field(default_factory=Counter)
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class FakeFirewall:
    stats: dict[str, int]


@dataclass
class FakeGateway:
    peers: dict[int, FakePeer] = field(default_factory=dict)
    handshakes: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)
    settings: Settings = field(default_factory=Settings)
    totals: Counter[str] = field(default_factory=Counter)
    kicks: list[tuple[str, str]] = field(default_factory=list)
    hints: list[tuple[str, str]] = field(default_factory=list)
    firewall: FakeFirewall = field(default_factory=lambda: FakeFirewall({"entries": 4}))

    def kick(self, name: str, reason: str) -> int:
        self.kicks.append((name, reason))
        return sum(1 for p in self.peers.values() if p.identity.name == name)

    def renew_hint(self, name: str, reason: str) -> int:
        self.hints.append((name, reason))
        return sum(1 for p in self.peers.values() if p.identity.name == name)


def identity(
    name: str, address: str, serial: int, not_after: dt.datetime, *groups: str
) -> PeerIdentity:
    return PeerIdentity(
        name=name,
        role=Role.PEER,
        serial=serial,
        issuer="CN=test-ca",
        fingerprint=f"{serial:02x}" * 32,
        addresses=(ipaddress.ip_address(address),),
        groups=frozenset(groups),
        not_after=not_after,
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gateway() -> FakeGateway:
    gw = FakeGateway()
    bob = FakePeer(
        identity("bob", "10.77.0.3", 0xB0, NOW + 30 * DAY - dt.timedelta(seconds=1), "ops", "dev"),
        "192.0.2.2:4000",
        T0 - 60,
        drops=Counter({"spoofed_source": 2, "hairpin": 0}),
        packets_in=5,
        packets_out=6,
        bytes_in=500,
        bytes_out=600,
    )
    alice = FakePeer(
        identity("alice", "10.77.0.2", 0xA1, NOW + 10 * DAY),
        "192.0.2.1:5000",
        T0 - 3600,
        drops=Counter({"spoofed_source": 1}),
        packets_in=1,
        packets_out=2,
        bytes_in=100,
        bytes_out=200,
    )
    # Same name, second certificate, expiring sooner: both listed, metrics keep the sooner.
    alice2 = FakePeer(
        identity("alice", "10.77.0.4", 0xA2, NOW + 2 * DAY), "192.0.2.9:1", T0, bytes_in=7
    )
    pending = FakePeer(
        identity("carol", "10.77.0.5", 0xC0, NOW + DAY), "192.0.2.5:1", T0, admitted=False
    )
    gw.peers = {1: bob, 2: alice, 3: alice2, 4: pending}
    gw.handshakes.update({"accepted": 3, "refused_revoked": 2, "refused_expired": 0})
    gw.drops.update({"no_route": 4, "spoofed_source": 10})
    return gw


def control(
    gw: FakeGateway,
    clock: Clock | None = None,
    *,
    reload: Any = None,
    crl: CrlSummary | None = None,
) -> GatewayControl:
    async def default_reload() -> ReloadReport:
        return ReloadReport(["policy: 3 rules -> 2 rules"])

    return GatewayControl(
        gw,
        started_at=T0 - 7200,
        listen="0.0.0.0:4443",
        reload=reload or default_reload,
        own_cert=OWN,
        ca_cert=CA.cert,
        crl_info=lambda: crl,
        policy_rules=lambda: 7,
        clock=clock or Clock(),
    )


async def test_status(gateway: FakeGateway) -> None:
    crl = crl_summary(CA.crl(number=4, this_update=NOW - DAY, next_update=NOW + 7 * DAY), T0)
    info = await control(gateway, crl=crl).status()
    assert info.role == "gateway" and info.tun == "vpn0" and info.listen == "0.0.0.0:4443"
    assert info.uptime_s == 7200
    assert info.sessions == 3  # carol is not admitted yet
    assert info.handshakes == {"accepted": 3, "refused_revoked": 2}
    assert info.drops == {"no_route": 4, "spoofed_source": 13}  # gateway + admitted peers
    assert info.cert.name == "gw1" and info.cert.days_left == 90
    assert info.cert.serial == f"{OWN.serial_number:x}"
    assert info.cert.fingerprint == fingerprint(OWN)
    assert info.ca.name == "test-ca" and info.ca.days_left == 365
    assert info.crl == CrlSummary(4, "2026-06-08T12:00:00+00:00", 7 * 86400.0, stale=False)
    assert info.policy_rules == 7


def test_crl_summary_goes_stale() -> None:
    crl = CA.crl(number=9, this_update=NOW - 3 * DAY, next_update=NOW - DAY)
    summary = crl_summary(crl, T0)
    assert summary.stale and summary.seconds_left == -86400.0 and summary.number == 9


def test_cert_summary_counts_whole_days_down() -> None:
    cert = CA.issue("dora", not_after=NOW + 2 * DAY - dt.timedelta(seconds=1)).cert
    assert cert_summary(cert, T0).days_left == 1
    assert cert_summary(cert, T0 + 3 * 86400).days_left == -2


async def test_peers(gateway: FakeGateway) -> None:
    clock = Clock()
    peers = await control(gateway, clock).peers()
    assert [(p.name, p.serial) for p in peers] == [("alice", "a1"), ("alice", "a2"), ("bob", "b0")]
    bob = peers[2]
    assert bob.addresses == ["10.77.0.3"] and bob.groups == ["dev", "ops"]
    assert bob.remote == "192.0.2.2:4000"
    assert bob.connected_since == "2026-06-01T11:59:00+00:00"
    assert (bob.bytes_in, bob.bytes_out, bob.packets_in, bob.packets_out) == (500, 600, 5, 6)
    assert bob.drops == {"spoofed_source": 2}
    assert bob.cert_days_left == 29
    assert bob.fingerprint == "b0" * 32
    clock.now += 86400
    assert (await control(gateway, clock).peers())[2].cert_days_left == 28


async def test_kick(gateway: FakeGateway) -> None:
    ctl = control(gateway)
    assert (await ctl.kick("alice", "")).closed == 2
    assert gateway.kicks == [("alice", "kicked by an administrator")]
    with pytest.raises(ControlError) as info:
        await ctl.kick("mallory", "bye")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert info.value.message == "no connected peer named 'mallory'"


async def test_renew_hint_rereads_the_inventory_then_asks_the_peer(gateway: FakeGateway) -> None:
    ctl = control(gateway)
    pokes: list[int] = []
    ctl._poke_inventory = lambda: pokes.append(1)
    result = await ctl.renew_hint("alice", "")
    assert (result.name, result.sessions) == ("alice", 2)
    assert gateway.hints == [("alice", "your certificate's terms changed")]
    assert pokes == [1]
    with pytest.raises(ControlError) as info:
        await ctl.renew_hint("mallory", "")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert "when it next renews" in info.value.message


async def test_reload_maps_invalid_config(gateway: FakeGateway) -> None:
    async def bad_config() -> ReloadReport:
        raise ConfigError("gateway.yaml", "tun.mtu", "expected 576..65535, got 1")

    async def bad_crl() -> ReloadReport:
        raise PkiError("crl.pem: signature does not verify")

    async def bug() -> ReloadReport:
        raise RuntimeError("bug")

    with pytest.raises(ControlError) as info:
        await control(gateway, reload=bad_config).reload()
    assert info.value.code is ErrorCode.INVALID_CONFIG
    assert info.value.message == (
        "gateway.yaml: tun.mtu: expected 576..65535, got 1 (the running config is unchanged)"
    )
    with pytest.raises(ControlError) as info:
        await control(gateway, reload=bad_crl).reload()
    assert info.value.code is ErrorCode.INVALID_CONFIG
    with pytest.raises(RuntimeError):  # the server turns this into 'internal'
        await control(gateway, reload=bug).reload()
    assert (await control(gateway).reload()).changed == ["policy: 3 rules -> 2 rules"]


def test_metrics_snapshot(gateway: FakeGateway) -> None:
    crl = CrlSummary(4, "2026-06-08T12:00:00+00:00", 1234.0, stale=False)
    snap = control(gateway, crl=crl).metrics_snapshot()
    assert snap.sessions == 3
    assert (snap.bytes_in, snap.bytes_out, snap.packets_in, snap.packets_out) == (607, 800, 6, 8)
    assert snap.drops == {"no_route": 4, "spoofed_source": 13}
    assert snap.handshakes["refused_revoked"] == 2
    assert snap.cert_expiry == (
        CertExpiry("own", "gw1", 90 * 86400.0),
        CertExpiry("ca", "test-ca", 365 * 86400.0),
        CertExpiry("peer", "alice", 2 * 86400.0),
        CertExpiry("peer", "bob", 30 * 86400.0 - 1),
    )
    assert snap.crl_next_update_seconds == 1234.0
    assert snap.firewall == {"entries": 4}
    assert control(gateway).metrics_snapshot().crl_next_update_seconds is None


def _typing_only(gw: Gateway, ctl: GatewayControl) -> tuple[GatewayView, ControlHandler]:
    # mypy checks that the real Gateway fits the bridge and the bridge fits the server.
    return gw, ctl


def test_counters_of_departed_peers_keep_the_totals_growing(gateway: FakeGateway) -> None:
    before = control(gateway).metrics_snapshot()
    gateway.totals.update(bytes_in=1000, bytes_out=2000, packets_in=10, packets_out=20)
    after = control(gateway).metrics_snapshot()
    assert after.bytes_in == before.bytes_in + 1000
    assert after.bytes_out == before.bytes_out + 2000
    assert (after.packets_in, after.packets_out) == (
        before.packets_in + 10,
        before.packets_out + 20,
    )


def test_nftables_drop_counters_show_in_metrics(gateway: FakeGateway) -> None:
    ctl = control(gateway)
    assert not any(k.startswith("nft_") for k in ctl.metrics_snapshot().drops)
    ctl.kernel_drops.update({"forward_dropped": 15, "input_dropped": 3})
    drops = ctl.metrics_snapshot().drops
    assert drops["nft_forward_dropped"] == 15 and drops["nft_input_dropped"] == 3
    assert drops["no_route"] == 4  # the userspace reasons are still there


class FakeLifecycle:
    counts: Mapping[str, int] = {"renewals_issued": 3, "renewals_refused": 1, "supersedes": 2}

    def issuer_cert(self) -> x509.Certificate:
        return CA.cert

    def issuer_warning(self, now: dt.datetime) -> str | None:
        return "the issuing CA expires soon"


async def test_status_and_metrics_show_the_issuer_and_the_lifecycle(gateway: FakeGateway) -> None:
    ctl = control(gateway)
    ctl._lifecycle = FakeLifecycle()
    gateway.totals["quarantines"] = 4
    info = await ctl.status()
    assert info.issuer is not None and info.issuer.name == "test-ca"
    assert info.issuer_warning == "the issuing CA expires soon"
    assert info.lifecycle == {
        "renewals_issued": 3,
        "renewals_refused": 1,
        "supersedes": 2,
        "quarantines": 4,
    }
    snap = ctl.metrics_snapshot()
    assert [e.kind for e in snap.cert_expiry if e.kind == "issuer"] == ["issuer"]
    assert snap.renewals == {"issued": 3, "refused": 1}
    assert (snap.quarantines, snap.supersedes) == (4, 2)
