"""plan_reload: one decision per config key, table-tested for every key of the schema.

The tables below are the expected decisions, written independently of the module's
rule tables; ``test_every_key_has_a_row`` fails when the schema grows a key nobody
decided about.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from vpnd.config import (
    AnyMatch,
    ClientConfig,
    CrlRollback,
    CrlStale,
    DuplicatePolicy,
    GatewayConfig,
    HostPort,
    LogFormat,
    LogLevel,
    NatMode,
    PkiConfig,
    Proto,
    RuleConfig,
)
from vpnd.config.schema import IssuerConfig
from vpnd.service.reload_plan import Apply, ReloadPlan, leaves, plan_reload

PKI = PkiConfig(ca=Path("/etc/vpnd/ca.pem"), cert=Path("/etc/vpnd/me.pem"), key=Path("/k"))
GATEWAY = GatewayConfig(source="/etc/vpnd/gateway.yaml", pki=PKI)
CLIENT = ClientConfig(
    source="/etc/vpnd/client.yaml", pki=PKI, server=HostPort("gw.test", 4443), server_name="gw"
)
R = "changed, takes effect after a restart"

COMMON: dict[str, tuple[object, Apply]] = {
    "source": ("/etc/vpnd/other.yaml", Apply.IGNORED),
    "warnings": (("a warning",), Apply.IGNORED),
    "pki.ca": (Path("/b/ca.pem"), Apply.LIVE),
    "pki.cert": (Path("/b/me.pem"), Apply.LIVE),
    "pki.key": (Path("/b/me.key"), Apply.LIVE),
    "pki.key_passphrase_file": (Path("/b/pass"), Apply.LIVE),
    "pki.crl": (Path("/b/crl.pem"), Apply.LIVE),
    "pki.expiry_warning_days": (30, Apply.LIVE),
    "log.level": (LogLevel.DEBUG, Apply.LIVE),
    "log.format": (LogFormat.JSON, Apply.RESTART),
    "control_socket": (Path("/run/other.sock"), Apply.RESTART),
    "metrics.listen": (HostPort("127.0.0.1", 9100), Apply.RESTART),
    "limits.max_frame": (131072, Apply.LIVE),
}

GATEWAY_TABLE: dict[str, tuple[object, Apply]] = {
    **COMMON,
    "pki.crl_stale": (CrlStale.ALLOW, Apply.LIVE),
    "pki.crl_rollback": (CrlRollback.ALLOW, Apply.LIVE),
    "tun.name": ("vpn9", Apply.RESTART),
    "tun.mtu": (1300, Apply.RESTART),
    "tun.offload": (False, Apply.RESTART),
    "keepalive.interval": (5.0, Apply.LIVE),
    "keepalive.timeout": (60.0, Apply.LIVE),
    "handshake_timeout": (5.0, Apply.PARTLY),
    "limits.max_sessions": (10, Apply.LIVE),
    "limits.max_pending_handshakes": (64, Apply.PARTLY),
    "limits.max_pending_per_source": (4, Apply.RESTART),
    "limits.max_pending_per_subnet": (8, Apply.RESTART),
    "limits.peer_queue_bytes": (1 << 20, Apply.LIVE),
    "limits.peer_turn_packets": (8, Apply.LIVE),
    "listen": (HostPort("0.0.0.0", 4444), Apply.RESTART),
    "push_routes": ((ipaddress.ip_network("192.168.1.0/24"),), Apply.LIVE),
    "nat": (NatMode.MASQUERADE, Apply.RESTART),
    "forwarding": (False, Apply.RESTART),
    "duplicate": (DuplicatePolicy.REJECT, Apply.LIVE),
    "duplicate_holddown.takeovers": (3, Apply.LIVE),
    "duplicate_holddown.window": (30.0, Apply.LIVE),
    "duplicate_holddown.hold": (60.0, Apply.LIVE),
    "state_dir": (Path("/var/lib/other"), Apply.RESTART),
    "policy.rules": ((RuleConfig(AnyMatch(), AnyMatch(), Proto.ANY),), Apply.LIVE),
    "policy.conntrack.tcp_timeout": (60.0, Apply.LIVE),
    "policy.conntrack.udp_timeout": (60.0, Apply.LIVE),
    "policy.conntrack.icmp_timeout": (5.0, Apply.LIVE),
    "policy.conntrack.max_flows_per_peer": (16, Apply.LIVE),
    "policy.source": ("/etc/vpnd/policy.yaml", Apply.LIVE),
    "nftables.anti_spoofing": (True, Apply.RESTART),
    "nftables.forward_filter": (False, Apply.RESTART),
    "pki.issuer": (IssuerConfig(Path("/i.pem"), Path("/i.key"), Path("/i.crl")), Apply.RESTART),
    "pki.inventory": (Path("/etc/vpnd/inventory.sqlite"), Apply.RESTART),
    "pki.inventory_poll": (5.0, Apply.RESTART),
    "renewal.enabled": (True, Apply.RESTART),
    "renewal.lifetime": (3600.0, Apply.RESTART),
    "renewal.quarantine_grace": (60.0, Apply.RESTART),
    "enrollment.enabled": (True, Apply.RESTART),
    "enrollment.rate": (1.0, Apply.RESTART),
    "enrollment.burst": (2, Apply.RESTART),
}

CLIENT_TABLE: dict[str, tuple[object, Apply]] = {
    **COMMON,
    # Revocation freshness and rollback are the gateway's checks.
    "pki.crl_stale": (CrlStale.ALLOW, Apply.IGNORED),
    "pki.crl_rollback": (CrlRollback.ALLOW, Apply.IGNORED),
    "tun.name": ("tun9", Apply.LIVE),
    "tun.mtu": (1300, Apply.IGNORED),  # the gateway's CONFIG sets the MTU
    "tun.offload": (False, Apply.LIVE),
    "keepalive.interval": (5.0, Apply.IGNORED),
    "keepalive.timeout": (60.0, Apply.IGNORED),
    "handshake_timeout": (5.0, Apply.LIVE),
    "limits.max_sessions": (10, Apply.IGNORED),
    "limits.max_pending_handshakes": (64, Apply.IGNORED),
    "limits.max_pending_per_source": (4, Apply.IGNORED),
    "limits.max_pending_per_subnet": (8, Apply.IGNORED),
    "limits.peer_queue_bytes": (1 << 20, Apply.IGNORED),
    "limits.peer_turn_packets": (8, Apply.IGNORED),
    "server": (HostPort("gw2.test", 4443), Apply.LIVE),
    "server_name": ("gw2", Apply.LIVE),
    "reconnect.initial_delay": (2.0, Apply.LIVE),
    "reconnect.max_delay": (60.0, Apply.LIVE),
    "pki.issuer": (IssuerConfig(Path("/i.pem"), Path("/i.key"), Path("/i.crl")), Apply.IGNORED),
    "pki.inventory": (Path("/x.sqlite"), Apply.IGNORED),
    "pki.inventory_poll": (5.0, Apply.IGNORED),
    "renewal.enabled": (False, Apply.RESTART),
    "renewal.at": (0.5, Apply.RESTART),
}

# The restart line names the section for these keys.
REPORTED_AS = {"tun.name": "tun", "tun.mtu": "tun", "tun.offload": "tun",
               "renewal.enabled": "renewal", "renewal.lifetime": "renewal",
               "renewal.quarantine_grace": "renewal", "renewal.at": "renewal",
               "enrollment.enabled": "enrollment", "enrollment.rate": "enrollment",
               "enrollment.burst": "enrollment",
               "nftables.anti_spoofing": "nftables", "nftables.forward_filter": "nftables",
               "metrics.listen": "metrics"}  # fmt: skip
HANDSHAKE_NOTE = (
    "handshake_timeout: the TLS part takes effect after a restart "
    "(the tunnel-setup part applies to new sessions now)"
)


def with_key(obj: Any, key: str, value: object) -> Any:
    """``obj`` with the dotted ``key`` set to ``value`` (sections rebuilt)."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: with_key(getattr(obj, head), rest, value)})


@pytest.mark.parametrize(("base", "table"), [(GATEWAY, GATEWAY_TABLE), (CLIENT, CLIENT_TABLE)])
def test_every_key_has_a_row(base: Any, table: dict[str, object]) -> None:
    assert set(leaves(base)) - {"mode"} == set(table)


def _cases() -> list[Any]:
    out = []
    for name, base, table in (
        ("gateway", GATEWAY, GATEWAY_TABLE),
        ("client", CLIENT, CLIENT_TABLE),
    ):
        for key, (value, apply) in table.items():
            out.append(pytest.param(base, key, value, apply, id=f"{name}:{key}"))
    return out


@pytest.mark.parametrize(("base", "key", "value", "apply"), _cases())
def test_each_key_alone(base: Any, key: str, value: object, apply: Apply) -> None:
    new = with_key(base, key, value)
    assert leaves(new)[key] != leaves(base)[key]  # the row really changes the key
    plan = plan_reload(base, new)
    assert plan.changed == (key,) and plan.errors == ()
    assert plan.touches(key) and plan.touches(key.split(".", maxsplit=1)[0])
    if apply in (Apply.LIVE, Apply.IGNORED):
        assert (plan.needs_restart, plan.notes) == ((), ())
        return
    name = REPORTED_AS.get(key, key)
    note = HANDSHAKE_NOTE if key == "handshake_timeout" else f"{name}: {R}"
    assert (plan.needs_restart, plan.notes) == ((name,), (note,))


def test_the_same_config_plans_nothing() -> None:
    assert plan_reload(GATEWAY, GATEWAY) == ReloadPlan()
    assert plan_reload(CLIENT, dataclasses.replace(CLIENT)) == ReloadPlan()


def test_a_section_is_reported_once_and_lines_keep_the_report_order() -> None:
    new = dataclasses.replace(
        GATEWAY,
        log=dataclasses.replace(GATEWAY.log, format=LogFormat.JSON),
        handshake_timeout=3.0,
        tun=dataclasses.replace(GATEWAY.tun, name="vpn7", mtu=1280),
        listen=HostPort("127.0.0.1", 1),
    )
    plan = plan_reload(GATEWAY, new)
    assert plan.needs_restart == ("listen", "tun", "handshake_timeout", "log.format")
    assert plan.notes == (f"listen: {R}", f"tun: {R}", HANDSHAKE_NOTE, f"log.format: {R}")
    assert not plan.touches("limits") and plan.touches("tun")


@pytest.mark.parametrize(
    ("old", "new", "to"), [(GATEWAY, CLIENT, "client"), (CLIENT, GATEWAY, "gateway")]
)
def test_a_mode_switch_is_refused(old: Any, new: Any, to: str) -> None:
    plan = plan_reload(old, new)
    (refusal,) = plan.errors
    assert (refusal.key, refusal.message) == ("mode", f"changed to {to}: restart vpnd instead")
    assert str(refusal) == f"mode: changed to {to}: restart vpnd instead"
    assert plan.changed == () and plan.notes == ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Grown(GatewayConfig):
    brand_new: int = 0


def test_a_key_without_a_decision_is_an_error_not_a_silent_ignore() -> None:
    grown = _Grown(source="x", pki=PKI)
    with pytest.raises(KeyError, match="brand_new"):
        plan_reload(grown, grown)
