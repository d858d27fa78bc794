"""The validated configuration: frozen, typed, built once by ``vpnd.config.loader``.

``Config`` is a tagged union on ``mode``: ``GatewayConfig`` or ``ClientConfig``. Both
share ``CommonConfig``; narrow with ``isinstance`` or ``if cfg.mode is Mode.GATEWAY``.
Every path is absolute (relative ones were resolved against the config file's
directory), every address is an ``ipaddress`` object, every duration is float seconds.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(enum.StrEnum):
    GATEWAY = "gateway"
    CLIENT = "client"


class NatMode(enum.StrEnum):
    NONE = "none"
    MASQUERADE = "masquerade"
    """Masquerade overlay traffic that leaves the gateway via a non-TUN interface."""


class DuplicatePolicy(enum.StrEnum):
    """What the gateway does with a second connection presenting the same certificate."""

    REPLACE = "replace"
    REJECT = "reject"


class CrlStale(enum.StrEnum):
    """What to do with a CRL past its nextUpdate."""

    DENY = "deny"
    ALLOW = "allow"
    """Accept it, and warn at every check."""


class CrlRollback(enum.StrEnum):
    """What to do at start with a CRL older than the newest one already seen for its CA."""

    DENY = "deny"
    ALLOW = "allow"
    """Start with it anyway, and warn loudly."""


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class Proto(enum.StrEnum):
    ANY = "any"
    ICMP = "icmp"
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``host:port`` endpoint; ``host`` is a normalised IP literal or a lowercase DNS name."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address, or None for a DNS name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# --- policy (evaluated by vpnd.policy; default deny) -------------------------------


@dataclass(frozen=True, slots=True)
class AnyMatch:
    """``any``: every peer (in ``from``) or every destination (in ``to``)."""


@dataclass(frozen=True, slots=True)
class GroupMatch:
    """Peers whose certificate carries *all* of ``groups``."""

    groups: frozenset[str]


@dataclass(frozen=True, slots=True)
class PeerMatch:
    """The one peer with this canonical certificate name."""

    name: str


@dataclass(frozen=True, slots=True)
class NetworkMatch:
    """Destinations inside ``network`` (a LAN behind the gateway, or part of the overlay)."""

    network: IPNetwork


Selector = AnyMatch | GroupMatch | PeerMatch
"""Who a rule's ``from`` matches: always a peer (identified by its certificate)."""
Target = AnyMatch | GroupMatch | PeerMatch | NetworkMatch
"""What a rule's ``to`` matches."""


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """One allow rule. Rules only ever allow; anything no rule allows is denied."""

    from_: Selector
    to: Target
    proto: Proto
    ports: tuple[tuple[int, int], ...] = ()
    """Inclusive (lo, hi) destination port ranges; empty means every port. tcp/udp only."""


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    """Idle timeouts (seconds) after which a tracked flow's return traffic is no longer allowed."""

    tcp_timeout: float = 3600.0
    udp_timeout: float = 180.0
    icmp_timeout: float = 30.0
    max_flows_per_peer: int = 4096
    """Tracked flows one peer may hold; its next flow evicts its own oldest, never another's."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The gateway firewall. No rules (the default) means deny everything between peers and
    to the LAN; the evaluator decides what gateway-local traffic (e.g. ping) still passes."""

    rules: tuple[RuleConfig, ...] = ()
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    source: str | None = None
    """The policy file this came from, or None when inline/absent (for reload messages)."""


# --- sections shared by both modes ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """The online issuing intermediate a gateway signs renewals and enrollments with."""

    cert: Path
    key: Path
    """0600; a key readable by others is refused."""
    crl: Path
    """The issuer's CRL, written by the gateway (revoked and superseded serials)."""
    key_passphrase_file: Path | None = None


@dataclass(frozen=True, slots=True)
class PkiConfig:
    ca: Path
    """CA bundle: the trust anchors."""
    cert: Path
    key: Path
    key_passphrase_file: Path | None = None
    crl: Path | None = None
    """Required on a gateway; optional on a client."""
    crl_stale: CrlStale = CrlStale.DENY
    crl_rollback: CrlRollback = CrlRollback.DENY
    expiry_warning_days: int = 14
    issuer: IssuerConfig | None = None
    """Gateway only: sign renewals and enrollments online (``vpnctl ca issuer``)."""
    inventory: Path | None = None
    """Gateway only: the CA's inventory (SQLite), read for groups, generations, supersede."""
    inventory_poll: float = 1.0
    """Seconds between checks of the inventory for changes."""


@dataclass(frozen=True, slots=True)
class TunConfig:
    name: str = "vpn0"
    mtu: int = 1400
    offload: bool = True
    """True: use TUN GSO offload if the kernel supports it; False: never."""


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    interval: float = 10.0
    timeout: float = 30.0
    """Always greater than ``interval``."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: HostPort | None = None
    """None: metrics disabled."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.TEXT


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_sessions: int = 10000
    max_pending_handshakes: int = 256
    max_pending_per_source: int = 16
    """At most ``max_pending_handshakes``."""
    max_pending_per_subnet: int = 64
    """Per /24 (IPv4) or /64 (IPv6); at most ``max_pending_handshakes``."""
    max_frame: int = 262144
    """Bytes; at least ``MIN_MAX_FRAME`` so one 64 KiB GSO super-packet always fits."""
    peer_queue_bytes: int = 4194304
    """Bytes queued towards one peer before it counts as slow; at least ``max_frame``."""
    peer_turn_packets: int = 32
    """Packets (GSO segments each count) read from one peer before the others get a turn."""


MIN_MAX_FRAME = 65536 + 4096
"""A 64 KiB offload super-packet plus its virtio header and framing must fit in one frame."""


# --- gateway / client -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    """Exponential backoff with jitter between connection attempts."""

    initial_delay: float = 1.0
    max_delay: float = 30.0
    """Always at least ``initial_delay``."""


@dataclass(frozen=True, slots=True)
class DuplicateHolddownConfig:
    """Under ``duplicate: replace``: hold down a certificate that keeps taking itself over."""

    takeovers: int = 5
    """Takeovers of one connected certificate allowed within ``window``; 0 disables."""
    window: float = 60.0
    """Seconds."""
    hold: float = 600.0
    """Seconds newcomers with that certificate are refused after the last attempt."""


@dataclass(frozen=True, slots=True)
class NftablesConfig:
    anti_spoofing: bool = False
    """Also drop spoofed sources in nftables on the gateway TUN (defence in depth)."""
    forward_filter: bool = True
    """vpnd's nftables forward and input filter: the gateway is no open router (only the
    TUN's traffic and its tracked replies are forwarded to/from the overlay and pushed
    networks), and the TUN reaches the gateway host only at its overlay addresses or at
    addresses a policy rule names exactly. Off only for debugging: warned loudly."""


DEFAULT_RENEWED_LIFETIME = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class GatewayRenewalConfig:
    """Automatic in-tunnel renewal, signed by ``pki.issuer`` with terms from the inventory."""

    enabled: bool = False
    lifetime: float = DEFAULT_RENEWED_LIFETIME
    """Seconds a renewed certificate lives."""
    quarantine_grace: float = 0.0
    """Seconds after expiry a not-revoked, not-superseded peer may still connect, only to
    renew; 0 disables quarantine."""


@dataclass(frozen=True, slots=True)
class EnrollmentConfig:
    """Invitation-token enrollment on the gateway's listener (no client certificate)."""

    enabled: bool = False
    rate: float = 5.0
    """Enrollment attempts per second, all sources together."""
    burst: int = 10


@dataclass(frozen=True, slots=True)
class ClientRenewalConfig:
    """When the client renews its own certificate over the tunnel."""

    enabled: bool = True
    at: float = 0.67
    """Fraction of the lifetime after which renewal starts (jittered by a few percent)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommonConfig:
    """What both modes have."""

    source: str
    """The config file (or caller-given name) this was loaded from."""
    pki: PkiConfig
    tun: TunConfig = field(default_factory=TunConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    handshake_timeout: float = 10.0
    control_socket: Path = Path("/run/vpnd/vpnd.sock")
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    warnings: tuple[str, ...] = ()
    """One-line warnings found while loading (e.g. a group-readable key): log them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig(CommonConfig):
    mode: Literal[Mode.GATEWAY] = field(default=Mode.GATEWAY, init=False)
    listen: HostPort = HostPort("0.0.0.0", 4443)  # noqa: S104 - a gateway serves the world
    push_routes: tuple[IPNetwork, ...] = ()
    nat: NatMode = NatMode.NONE
    forwarding: bool = True
    """Enable IPv4 forwarding at start and restore the previous value at stop."""
    duplicate: DuplicatePolicy = DuplicatePolicy.REPLACE
    duplicate_holddown: DuplicateHolddownConfig = field(default_factory=DuplicateHolddownConfig)
    state_dir: Path = Path("/var/lib/vpnd")
    """Where the gateway keeps what must survive a restart (the CRL numbers seen)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    nftables: NftablesConfig = field(default_factory=NftablesConfig)
    renewal: GatewayRenewalConfig = field(default_factory=GatewayRenewalConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig(CommonConfig):
    mode: Literal[Mode.CLIENT] = field(default=Mode.CLIENT, init=False)
    server: HostPort
    server_name: str
    """The DNS SAN the gateway certificate must carry (pinned)."""
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    renewal: ClientRenewalConfig = field(default_factory=ClientRenewalConfig)


Config = GatewayConfig | ClientConfig
