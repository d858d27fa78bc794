"""What the gateway core asks its shell to do: frozen records, carried out in order.

Peers are named by their registry key; an effect for a peer that has gone since is
skipped by the shell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vpnd.pki.identity import IPNetwork
from vpnd.proto import CloseCode, TunnelConfig


@dataclass(frozen=True, slots=True)
class SendConfig:
    key: int
    config: TunnelConfig


@dataclass(frozen=True, slots=True)
class Close:
    """End the peer's session with a CLOSE frame carrying ``code`` and ``message``."""

    key: int
    code: CloseCode
    message: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse a connection that never became a peer: one CLOSE frame, then close."""

    code: CloseCode
    message: str


@dataclass(frozen=True, slots=True)
class AddRoute:
    key: int
    """The peer the route leads to (a failure is logged against it)."""
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class RemoveRoute:
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class AddSources:
    """Admit ``networks`` to the kernel's anti-spoofing set; then run ``then``.

    CONFIG waits for the set: a peer's first packets would die in nftables otherwise.
    """

    networks: tuple[IPNetwork, ...]
    then: SendConfig | None = None


@dataclass(frozen=True, slots=True)
class RemoveSources:
    networks: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class Audit:
    """One line of the audit log: ``fields`` are its structured (JSON) fields."""

    level: int
    message: str
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Log:
    """One line of the operational log, in the peer's context if ``key`` is set."""

    level: int
    message: str
    key: int | None = None


@dataclass(frozen=True, slots=True)
class Drain:
    """A renewal took the peer's addresses over: keep accepting what the old session
    still delivers for ``seconds`` (packets already in flight), then close it."""

    key: int
    seconds: float
    code: CloseCode
    message: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Admit an expired peer only to renew: no CONFIG, no route, no packets."""

    key: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Supersede:
    """A renewed certificate was used: mark the name's older serials superseded in the
    inventory and publish them in the issuer's CRL."""

    name: str
    serial: int
    older: frozenset[int]


Effect = (
    SendConfig
    | Close
    | Refuse
    | AddRoute
    | RemoveRoute
    | AddSources
    | RemoveSources
    | Audit
    | Log
    | Drain
    | Quarantine
    | Supersede
)
