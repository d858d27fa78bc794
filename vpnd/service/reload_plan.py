"""What a reload may change: a pure diff of two configs, one decision per key.

``plan_reload(old, new)`` names every changed key (dotted, e.g. ``limits.max_frame``),
the ones that only take effect after a restart (with the line to report), and why
the reload must be refused. The services apply the plan; nothing here does I/O.
Every key of the schema has a decision in the table of its mode: a new key without
one fails the table test rather than being silently ignored at reload.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from vpnd.config import ClientConfig, GatewayConfig, HostPort
from vpnd.config.schema import IssuerConfig


class Apply(enum.Enum):
    LIVE = "live"
    """The running service applies it (at once, or to new sessions)."""
    RESTART = "restart"
    """The running value is kept until a restart; the reload says so."""
    PARTLY = "partly"
    """Applied in part now; the rest after a restart (the reload says which)."""
    IGNORED = "ignored"
    """Bookkeeping (the file name, load warnings), or not used in this mode."""


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    apply: Apply
    report_as: str | None = None
    """The key a restart line names (a whole section, e.g. ``tun``), if not the key itself."""
    note: str | None = None
    """The restart line, if not the usual "<key>: changed, takes effect after a restart"."""


_LIVE = Rule(Apply.LIVE)
_IGNORED = Rule(Apply.IGNORED)
_RESTART = Rule(Apply.RESTART)

_COMMON_BOOKKEEPING: dict[str, Rule] = {"source": _IGNORED, "warnings": _IGNORED, "mode": _IGNORED}

# Ordered as the restart lines are reported.
GATEWAY_RULES: Mapping[str, Rule] = {
    "listen": _RESTART,
    "tun.name": Rule(Apply.RESTART, "tun"),
    "tun.mtu": Rule(Apply.RESTART, "tun"),
    "tun.offload": Rule(Apply.RESTART, "tun"),
    "nat": _RESTART,
    "forwarding": _RESTART,
    "nftables.anti_spoofing": Rule(Apply.RESTART, "nftables"),
    "nftables.forward_filter": Rule(Apply.RESTART, "nftables"),
    "control_socket": _RESTART,
    "metrics.listen": Rule(Apply.RESTART, "metrics"),
    "state_dir": _RESTART,
    # Bound into the TLS listener at start; the gateway's own share applies now.
    "limits.max_pending_handshakes": Rule(Apply.PARTLY),
    "limits.max_pending_per_source": _RESTART,
    "limits.max_pending_per_subnet": _RESTART,
    "handshake_timeout": Rule(
        Apply.PARTLY,
        note="handshake_timeout: the TLS part takes effect after a restart "
        "(the tunnel-setup part applies to new sessions now)",
    ),
    "log.format": _RESTART,
    "log.level": _LIVE,
    "pki.ca": _LIVE,
    "pki.cert": _LIVE,
    "pki.key": _LIVE,
    "pki.key_passphrase_file": _LIVE,
    "pki.crl": _LIVE,
    "pki.crl_stale": _LIVE,
    "pki.crl_rollback": _LIVE,
    "pki.expiry_warning_days": _LIVE,
    "keepalive.interval": _LIVE,
    "keepalive.timeout": _LIVE,
    "limits.max_sessions": _LIVE,
    "limits.max_frame": _LIVE,
    "limits.peer_queue_bytes": _LIVE,
    "limits.peer_turn_packets": _LIVE,
    "push_routes": _LIVE,
    "duplicate": _LIVE,
    "duplicate_holddown.takeovers": _LIVE,
    "duplicate_holddown.window": _LIVE,
    "duplicate_holddown.hold": _LIVE,
    "policy.rules": _LIVE,
    "policy.conntrack.tcp_timeout": _LIVE,
    "policy.conntrack.udp_timeout": _LIVE,
    "policy.conntrack.icmp_timeout": _LIVE,
    "policy.conntrack.max_flows_per_peer": _LIVE,
    "policy.source": _LIVE,
    # The signer and the inventory watcher are built at start.
    "pki.issuer": _RESTART,
    "pki.inventory": _RESTART,
    "pki.inventory_poll": _RESTART,
    "renewal.enabled": Rule(Apply.RESTART, "renewal"),
    "renewal.lifetime": Rule(Apply.RESTART, "renewal"),
    "renewal.quarantine_grace": Rule(Apply.RESTART, "renewal"),
    "enrollment.enabled": Rule(Apply.RESTART, "enrollment"),
    "enrollment.rate": Rule(Apply.RESTART, "enrollment"),
    "enrollment.burst": Rule(Apply.RESTART, "enrollment"),
    **_COMMON_BOOKKEEPING,
}

CLIENT_RULES: Mapping[str, Rule] = {
    "control_socket": _RESTART,
    "metrics.listen": Rule(Apply.RESTART, "metrics"),
    "log.format": _RESTART,
    "log.level": _LIVE,
    # The client reconnects by itself for the settings a live session was built with.
    "server": _LIVE,
    "server_name": _LIVE,
    "tun.name": _LIVE,
    "tun.offload": _LIVE,
    "limits.max_frame": _LIVE,
    "handshake_timeout": _LIVE,
    "reconnect.initial_delay": _LIVE,
    "reconnect.max_delay": _LIVE,
    "pki.ca": _LIVE,
    "pki.cert": _LIVE,
    "pki.key": _LIVE,
    "pki.key_passphrase_file": _LIVE,
    "pki.crl": _LIVE,
    "pki.expiry_warning_days": _LIVE,
    # The gateway decides these for the tunnel (its CONFIG carries MTU and keepalive);
    # revocation staleness and rollback are the gateway's checks.
    "tun.mtu": _IGNORED,
    "keepalive.interval": _IGNORED,
    "keepalive.timeout": _IGNORED,
    "pki.crl_stale": _IGNORED,
    "pki.crl_rollback": _IGNORED,
    "limits.max_sessions": _IGNORED,
    "limits.max_pending_handshakes": _IGNORED,
    "limits.max_pending_per_source": _IGNORED,
    "limits.max_pending_per_subnet": _IGNORED,
    "limits.peer_queue_bytes": _IGNORED,
    "limits.peer_turn_packets": _IGNORED,
    "pki.issuer": _IGNORED,
    "pki.inventory": _IGNORED,
    "pki.inventory_poll": _IGNORED,
    "renewal.enabled": Rule(Apply.RESTART, "renewal"),
    "renewal.at": Rule(Apply.RESTART, "renewal"),
    **_COMMON_BOOKKEEPING,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reload cannot be applied at all: the key and what to do."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclasses.dataclass(frozen=True, slots=True)
class ReloadPlan:
    changed: tuple[str, ...] = ()
    """Every changed key, dotted, whatever its decision."""
    needs_restart: tuple[str, ...] = ()
    """The keys (or sections) whose change waits for a restart, in report order."""
    notes: tuple[str, ...] = ()
    """One line per entry of ``needs_restart``, for the reload report."""
    errors: tuple[Refusal, ...] = ()
    """Why the reload is refused; nothing may be applied when this is not empty."""

    def touches(self, key: str) -> bool:
        """Did ``key``, or any key inside the section ``key``, change?"""
        return any(k == key or k.startswith(f"{key}.") for k in self.changed)


def rules_for(cfg: GatewayConfig | ClientConfig) -> Mapping[str, Rule]:
    return GATEWAY_RULES if isinstance(cfg, GatewayConfig) else CLIENT_RULES


def leaves(obj: object, prefix: str = "") -> dict[str, object]:
    """Every setting of a config, by dotted key. Sections (nested dataclasses) are
    opened; values (addresses, ``HostPort``, enums, tuples of rules) are not."""
    out: dict[str, object] = {}
    for fld in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, fld.name)
        key = f"{prefix}{fld.name}"
        # An optional section is one value: its keys exist only when it is set.
        if dataclasses.is_dataclass(value) and not isinstance(
            value, HostPort | IssuerConfig | type
        ):
            out.update(leaves(value, f"{key}."))
        else:
            out[key] = value
    return out


def plan_reload(old: GatewayConfig | ClientConfig, new: GatewayConfig | ClientConfig) -> ReloadPlan:
    if type(new) is not type(old):
        return ReloadPlan(
            errors=(Refusal("mode", f"changed to {new.mode.value}: restart vpnd instead"),)
        )
    rules = rules_for(old)
    before, after = leaves(old), leaves(new)
    # A key without a decision is a programming error: KeyError, found by the table test.
    changed = tuple(k for k in rules if k in before and before[k] != after[k])
    unknown = [k for k in before if k not in rules]
    if unknown:
        raise KeyError(f"no reload decision for {', '.join(unknown)}")
    restart: dict[str, str] = {}
    for key in changed:
        rule = rules[key]
        if rule.apply in (Apply.RESTART, Apply.PARTLY):
            name = rule.report_as or key
            restart.setdefault(name, rule.note or f"{name}: changed, takes effect after a restart")
    return ReloadPlan(changed=changed, needs_restart=tuple(restart), notes=tuple(restart.values()))
