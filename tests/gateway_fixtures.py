"""A gateway core on a stepped monotonic clock, with hand-built identities.

Import as ``from gateway_fixtures import ...`` (pytest puts tests/ on sys.path). No
asyncio: every event is a plain call and every effect a value to compare.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Sequence
from typing import Any, TypeVar

from pki_fixtures import make_ca

from vpnd.config import PolicyConfig
from vpnd.gateway.core import GatewayCore, GatewaySettings
from vpnd.gateway.effects import Close, Effect
from vpnd.gateway.peer_state import PeerState
from vpnd.pki import TrustStore
from vpnd.pki.identity import PeerIdentity, Role

T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
ISSUER = "CN=test-ca"
SETTINGS = GatewaySettings(
    tun_name="vpn0",
    mtu=1400,
    overlay_networks=(ipaddress.ip_network("10.8.0.0/24"), ipaddress.ip_network("fd00:8::/64")),
    gateway_addresses=(
        ipaddress.ip_interface("10.8.0.1/24"),
        ipaddress.ip_interface("fd00:8::1/64"),
    ),
    push_routes=(ipaddress.ip_network("192.168.50.0/24"),),
    holddown_takeovers=2,
    holddown_window=10.0,
    holddown_hold=30.0,
)
E = TypeVar("E")
DEFAULT_TRUST = make_ca().trust()
"""For tests that never verify a chain: a core always holds some trust store."""


def ident(
    name: str,
    *addresses: str,
    serial: int = 1,
    issuer: str = ISSUER,
    not_before: dt.datetime = T0,
    routes: Sequence[str] = (),
    groups: Sequence[str] = (),
) -> PeerIdentity:
    return PeerIdentity(
        name=name,
        role=Role.PEER,
        serial=serial,
        issuer=issuer,
        fingerprint=f"{serial:064x}",
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
        routes=tuple(ipaddress.ip_network(r) for r in routes),
        groups=frozenset(groups),
        not_before=not_before,
        not_after=not_before + dt.timedelta(days=90),
    )


class World:
    """One core; ``now`` only moves when a test steps it."""

    def __init__(
        self,
        *,
        trust: TrustStore | None = None,
        policy: PolicyConfig | None = None,
        sources: bool = False,
        tun_vnet: bool = False,
        **settings: Any,
    ) -> None:
        self.now = 100.0
        self.core: GatewayCore[PeerState] = GatewayCore(
            dataclasses.replace(SETTINGS, **settings),
            trust=trust or DEFAULT_TRUST,
            policy=policy,
            sources=sources,
            tun_vnet=tun_vnet,
        )

    def step(self, seconds: float) -> None:
        self.now += seconds

    def connect(self, identity: PeerIdentity, *, chain: tuple[bytes, ...] = ()) -> PeerState:
        """A verified peer whose session started (no HELLO yet)."""
        key = self.core.next_key()
        peer = PeerState(
            key=key,
            identity=identity,
            remote=f"198.51.100.{key % 250}:4000",
            connected_at=self.now,
            chain=chain,
        )
        self.core.add(peer)
        return peer

    def hello(self, peer: PeerState, *, offload: bool = False) -> list[Effect]:
        return self.core.hello(peer, offload=offload, now=self.now)

    def join(self, identity: PeerIdentity) -> tuple[PeerState, list[Effect]]:
        """Connect, HELLO, and (when admitted) the shell's sending of CONFIG."""
        peer = self.connect(identity)
        effects = self.hello(peer)
        if peer.admitted:
            assert not self.core.configured(peer)  # nothing could be held yet
        return peer, effects

    def lose(self, peer: PeerState, effects: Sequence[Effect]) -> list[Effect]:
        """The shell saw the session end that ``effects`` closed."""
        assert any(isinstance(e, Close) and e.key == peer.key for e in effects)
        return self.core.lost(peer, "closed")


def of_type(effects: Sequence[object], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


def closes(effects: Sequence[Effect]) -> list[tuple[int, int, str]]:
    return [(e.key, e.code, e.message) for e in of_type(effects, Close)]
