"""vpnd.net against the real kernel, each scenario in a child process inside a fresh namespace.

The scenarios live in net_scenarios.py; here we check their observations and, from
outside, that the namespace is exactly as it was before (OpenVPN t_client style).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nslib import Netns, NetnsFactory

pytestmark = pytest.mark.netns


def scenario(ns: Netns, *args: str, timeout: float = 120) -> dict[str, Any]:
    res = ns.python(["netns-tests/net_scenarios.py", *args], check=False, timeout=timeout)
    assert res.returncode == 0, f"scenario {args} failed:\n{res.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_tun_echo_through_the_kernel(netns_factory: NetnsFactory, offload: bool) -> None:
    ns = netns_factory()
    before = ns.snapshot()
    r = scenario(ns, "ping", *(["offload"] if offload else []))
    assert r["probe_offload"] is True
    assert r["vnet_hdr"] is offload
    assert r["written"] == 1
    assert r["reply"] == {
        "src": "10.8.0.1",
        "dst": "10.8.0.2",
        "id": 0x1234,
        "seq": 7,
        "load": "vpnd-probe",
    }
    if offload:
        assert r["reply_vnet_reason"] is None
        assert len(r["reply_vnet_hdr"]) == 20
    # IPv6 off before up: not one router solicitation or MLD report came out.
    assert r["disable_ipv6"] == "1"
    assert r["non_ipv4_seen"] == 0
    # The refused packet is counted, and the good one after it still goes in.
    assert r["write_errors_before"] == 0
    assert r["bad_batch_written"] == 1
    assert r["write_errors_after"] == 1
    assert r["link_after_close"] == 0
    assert ns.snapshot() == before


def test_routes_add_list_replace_delete(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    before = ns.snapshot()
    r = scenario(ns, "routes")
    assert r["down_error"] == "route 10.9.0.0/24 via vpn0: link is down (ENETDOWN)"
    assert r["listed"] == ["10.10.0.0/16", "10.8.0.0/24", "10.9.0.0/24"]
    # Replace semantics: one route each, the second gateway won.
    assert r["ip_route"].count("10.9.0.0/24") == 1
    assert "10.10.0.0/16 via 10.8.0.3 proto static metric 50" in r["ip_route"]
    assert "10.8.0.2" not in r["ip_route"]
    assert r["after_del"] == ["10.10.0.0/16", "10.8.0.0/24"]
    assert "inet 10.7.0.1/24" in r["addrs"] and "10.8.0.1" not in r["addrs"]
    assert r["mtu"] == 1300
    assert "ENETUNREACH" in r["unreachable_error"]
    assert r["missing_link_error"] == "list routes via nope0: no such link nope0"
    # Closing the fd removed the link and every route through it.
    assert (r["exists_open"], r["exists_closed"]) == (True, False)
    assert r["ip_route_closed"] == ""
    assert (r["stale_before"], r["stale_after"]) == (True, False)
    assert ns.snapshot() == before


def test_forwarding_toggled_and_restored(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    r = scenario(ns, "forwarding")
    assert r == {
        "v4_prev_on_enable": False,
        "v4_proc_enabled": "1",
        "v4_prev_on_restore": True,
        "v4_proc_restored": "0",
        "v6_prev_on_enable": False,
        "v6_proc_enabled": "1",
        "v6_prev_on_restore": True,
        "v6_proc_restored": "0",
    }
    assert ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"


def test_nftables_table_antispoof_and_masquerade(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    r = scenario(ns, "nft")
    table = r["table"]
    assert "table inet vpnd_vpn0 {" in table
    assert "elements = { 10.8.0.2, 10.9.0.0/24 }" in table
    assert "elements = { fd00:8::2 }" in table
    assert 'iifname "vpn0" ip saddr != @allowed4 counter' in table
    assert 'ip saddr 10.8.0.0/24 oifname != "vpn0" masquerade' in table
    assert 'ip6 saddr fd00:8::/64 oifname != "vpn0" masquerade' in table
    # The kernel enforces it: allowed sources get answers, forged ones are dropped.
    assert r["allowed_reply"] is True
    assert r["routed_subnet_reply"] is True
    assert r["spoofed_reply"] is False
    assert "10.8.0.2" not in r["after_delete_table"]
    assert r["revoked_reply"] is False
    assert "ip saddr != @allowed4 counter packets 2 " in r["counters"]
    # A broken ruleset is refused with nft's message and the old table stays.
    assert r["bad_install_error"].startswith("install table vpnd_vpn0: nft failed: ")
    assert "syntax error" in r["bad_install_error"]
    assert r["table_survives_bad_install"] is True
    assert r["tables_after_remove"] == ""
    assert ns.run(["nft", "list", "tables"]).stdout == ""


def test_gso_super_packets_relay_between_offload_tuns(netns_factory: NetnsFactory) -> None:
    a, b = netns_factory(), netns_factory()
    r = scenario(a, "gso", b.name, "16")
    assert r["intact"] is True
    assert r["received"] == r["sent"] == 16 * 1024 * 1024
    # TSO really happened, and every header the kernel produced passed the validator.
    assert r["gso_packets"] > 0
    assert r["max_len"] > 1500 + 10
    assert r["rejected"] == 0, r["reasons"]
    assert r["write_errors"] == 0
    for ns in (a, b):
        assert "tun" not in ns.run(["ip", "-o", "link"]).stdout


def test_tun_open_errors_are_clear(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    r = scenario(ns, "errors")
    assert r["busy0"] == "TUN busy0: device busy: another process has it open"
    assert r["lo"].startswith("TUN lo: kernel refused the name or flags (EINVAL)")
