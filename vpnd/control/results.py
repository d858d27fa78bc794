"""The result shapes control replies carry, each encoded by the one codec.

Every shape is a frozen dataclass; ``to_json`` / ``from_json`` come from
``ResultShape`` and go through ``vpnd.control.codec``, so the JSON keys are the field
names in declaration order and a malformed field is a ``ProtocolError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from vpnd.control import codec
from vpnd.control.protocol import Json


class ResultShape:
    """Base of the result shapes: JSON through the one codec, never by hand."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]
    WHAT: ClassVar[str]
    """How errors name a top-level value of this shape, e.g. ``status``."""

    def to_json(self) -> Json:
        return codec.encode(self)

    @classmethod
    def from_json(cls, doc: object, what: str | None = None) -> Self:
        return codec.decode(cls, doc, cls.WHAT if what is None else what)


@dataclass(frozen=True, slots=True)
class CertSummary(ResultShape):
    WHAT: ClassVar[str] = "cert"

    name: str
    serial: str
    """Lowercase hex."""
    fingerprint: str
    """SHA-256 of the DER, lowercase hex."""
    not_after: str
    """ISO 8601 UTC."""
    days_left: int
    """Whole days until ``not_after``; negative once expired."""


@dataclass(frozen=True, slots=True)
class CrlSummary(ResultShape):
    WHAT: ClassVar[str] = "crl"

    number: int
    next_update: str
    """ISO 8601 UTC."""
    seconds_left: float
    """Until ``next_update``; negative once past it."""
    stale: bool


@dataclass(frozen=True, slots=True)
class RenewalStatus(ResultShape):
    """A client's automatic renewal of its own certificate."""

    WHAT: ClassVar[str] = "renewal"

    enabled: bool
    state: str
    """scheduled, renewing, backoff, waiting for the tunnel, or disabled."""
    cert_age_s: float
    """Seconds since the certificate's notBefore."""
    not_after: str
    """ISO 8601 UTC."""
    generation: int | None
    """The certificate's generation counter, when it carries one."""
    next_renewal: str
    """ISO 8601 UTC, "now", or empty when disabled."""
    renewals: int
    """Successful renewals since start."""
    failures: int
    """Consecutive failed attempts."""
    last_error: str | None
    last_renewed: str | None
    quarantined: bool
    """The gateway admitted us only to renew (our certificate expired)."""


@dataclass(frozen=True, slots=True)
class RenewResult(ResultShape):
    """The ``renew`` result (client): the certificate now in use."""

    WHAT: ClassVar[str] = "renew"

    renewed: bool
    serial: str
    fingerprint: str
    not_after: str
    message: str


@dataclass(frozen=True, slots=True)
class StatusInfo(ResultShape):
    WHAT: ClassVar[str] = "status"

    role: str
    version: str
    pid: int
    uptime_s: float
    listen: str
    tun: str
    sessions: int
    handshakes: dict[str, int]
    """``accepted`` and ``refused_<reason>`` counts."""
    drops: dict[str, int]
    """Dropped packets by reason."""
    cert: CertSummary
    ca: CertSummary
    crl: CrlSummary | None
    policy_rules: int
    renewal: RenewalStatus | None = None
    """Clients: automatic certificate renewal (absent on gateways)."""
    issuer: CertSummary | None = None
    """Gateways with online signing: the issuing CA (``vpnctl ca issuer``)."""
    issuer_warning: str | None = None
    """The issuer's expiry forecast, when it expires soon enough to matter."""
    lifecycle: dict[str, int] | None = None
    """Gateways: renewals_issued/refused/failed, supersedes, quarantines."""


@dataclass(frozen=True, slots=True)
class PeerInfo(ResultShape):
    WHAT: ClassVar[str] = "peer"

    name: str
    serial: str
    fingerprint: str
    addresses: list[str]
    groups: list[str]
    remote: str
    connected_since: str
    """ISO 8601 UTC."""
    bytes_in: int
    """From the peer into the tunnel."""
    bytes_out: int
    """Towards the peer."""
    packets_in: int
    packets_out: int
    drops: dict[str, int]
    cert_not_after: str
    cert_days_left: int
    generation: int | None = None
    """The certificate's renewal generation (gateways report it; 1 when it has none)."""


@dataclass(frozen=True, slots=True)
class RenewHintResult(ResultShape):
    WHAT: ClassVar[str] = "renew-hint"

    name: str
    sessions: int
    """Live sessions asked to renew now."""


@dataclass(frozen=True, slots=True)
class KickResult(ResultShape):
    WHAT: ClassVar[str] = "kick"

    name: str
    closed: int
    """Sessions closed (a name may have several certificates connected)."""


@dataclass(frozen=True, slots=True)
class ReloadReport(ResultShape):
    WHAT: ClassVar[str] = "reload"

    changed: list[str] = field(default_factory=list)
    """Human lines, e.g. ``policy: 3 rules -> 2 rules``."""
    closed: list[str] = field(default_factory=list)
    """Peers dropped because the new config no longer allows them."""
    errors: list[str] = field(default_factory=list)
    """Parts that could not be applied (the rest was)."""


@dataclass(frozen=True, slots=True)
class PeerList(ResultShape):
    """The ``peers`` result: an object, so every result is one."""

    WHAT: ClassVar[str] = "result"

    peers: list[PeerInfo]


def peers_to_json(peers: list[PeerInfo]) -> Json:
    return PeerList(list(peers)).to_json()


def peers_from_json(doc: object) -> list[PeerInfo]:
    return PeerList.from_json(doc).peers
