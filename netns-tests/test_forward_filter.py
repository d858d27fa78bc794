"""The gateway is not an open router, and policy on a LAN subnet does not reach the gateway
host's own services (issue #11: "The gateway must not be an open router", "Firewall scope").

mallory has no certificate: she only sits on the underlay, with routes via the gateway.
What arrives at the LAN host is counted by an nftables counter in the LAN namespace at the
earliest hook (prerouting, raw priority), so nothing the LAN's stack sees goes uncounted.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

import pytest
import yaml
from nslib import PYTHON, Netns, NetnsFactory
from vpnlab import GW_WAN, LAN, LAN_HOST, OVERLAY, VPNCTL, Lab

from vpnd.net.nftables import NftablesRuleset, parse_counters

pytestmark = pytest.mark.netns

GW_LAN = "192.168.50.1"
PROBE_PORT = 7777
SVC_PORT = 2222
PROBES = 5  # packets per kind
N = ipaddress.ip_network
A = ipaddress.ip_address

# mallory's packets, built by scapy in her namespace: real SYNs from her own address and
# SYNs carrying a verified peer's overlay source, to the LAN host and to the peer itself.
SENDER = """
import sys
from scapy.config import conf
conf.verb = 0
from scapy.layers.inet import IP, TCP
from scapy.sendrecv import send
own, spoofed, lan, peer, port, n = sys.argv[1:7]
pkts = []
for i in range(int(n)):
    pkts.append(IP(src=own, dst=lan) / TCP(sport=40000 + i, dport=int(port), flags="S"))
    pkts.append(IP(src=spoofed, dst=lan) / TCP(sport=41000 + i, dport=int(port), flags="S"))
    pkts.append(IP(src=own, dst=peer) / TCP(sport=42000 + i, dport=int(port), flags="S"))
send(pkts)
print("sent", len(pkts))
"""


def _lan_counter(lan: Netns) -> None:
    """Count every packet reaching the LAN host for the probe port, before anything else."""
    lan.run(["nft", "-f", "-"], input=(
        "table inet probe {\n"
        "  chain pre {\n"
        "    type filter hook prerouting priority -400; policy accept;\n"
        f"    tcp dport {PROBE_PORT} counter\n"
        "  }\n"
        "}\n"
    ))  # fmt: skip


def _lan_seen(lan: Netns) -> int:
    doc = json.loads(lan.run(["nft", "-j", "list", "chain", "inet", "probe", "pre"]).stdout)
    for item in doc["nftables"]:
        rule = item.get("rule")
        if rule:
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError("probe counter missing")


def _gw_counters(lab: Lab) -> dict[str, int]:
    res = lab.hosts["gw"].ns.run(["nft", "-j", "list", "counters", "table", "inet", "vpnd_vpn0"])
    return {
        c["counter"]["name"]: int(c["counter"]["packets"])
        for c in json.loads(res.stdout)["nftables"]
        if "counter" in c
    }


def _mallory_attacks(lab: Lab, peer_ip: str) -> None:
    m = lab.hosts["mallory"].ns
    res = m.run(
        [PYTHON, "-c", SENDER, m_ip(lab), peer_ip, LAN_HOST, peer_ip, str(PROBE_PORT), str(PROBES)],
        timeout=60,
    )
    assert res.stdout.split() == ["sent", str(3 * PROBES)]
    # A real connect() from her own stack too (its SYN and retransmits): it must not connect.
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('{LAN_HOST}', {PROBE_PORT}), timeout=1).close()\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('failed', e)\n"
    )
    m.run([PYTHON, "-c", probe], check=False, timeout=20)


def m_ip(lab: Lab) -> str:
    return lab.hosts["mallory"].wan_ip


def _peer_ip(lab: Lab, name: str) -> str:
    out = lab.hosts[name].ns.run(["ip", "-4", "-o", "addr", "show", "dev", "tun0"]).stdout
    return out.split()[3].split("/")[0]


def _route_mallory_via_gateway(lab: Lab) -> None:
    m = lab.hosts["mallory"].ns
    m.run(["ip", "route", "add", LAN, "via", GW_WAN])
    m.run(["ip", "route", "add", OVERLAY, "via", GW_WAN])


def test_outsider_cannot_route_through_the_gateway(lab: Lab) -> None:
    assert lab.lan is not None
    lab.issue("alice")
    lab.start_gateway()  # nftables.forward_filter defaults to on
    lab.start_client("alice")
    lab.wait_up("alice")
    alice = _peer_ip(lab, "alice")
    _route_mallory_via_gateway(lab)
    _lan_counter(lab.lan)
    # The verified peer still reaches the LAN (policy allows all), both ways, over TCP.
    assert lab.ping("alice", LAN_HOST)
    assert lab.tcp_transfer("alice", "lan", LAN_HOST)
    assert lab.tcp_transfer("alice", "lan", LAN_HOST, download=True)
    before = _gw_counters(lab).get("forward_dropped", 0)
    _mallory_attacks(lab, alice)
    assert _lan_seen(lab.lan) == 0, "the LAN host saw the outsider's packets"
    dropped = _gw_counters(lab).get("forward_dropped", 0) - before
    assert dropped >= 3 * PROBES, dropped
    # The LAN cannot open new flows into the overlay either (only tracked replies go in).
    assert not lab.tcp_connect("lan", "alice", alice, 2323, timeout=1)
    assert lab.ping("alice", LAN_HOST), "the peer's own flows still work after the attack"

    # Positive control: the same gateway with the filter off forwards all of it.
    lab.stop("gw")
    lab.start_gateway(nftables={"anti_spoofing": True, "forward_filter": False})
    assert lab.wait_log("gw", r"forward_filter is OFF: this gateway is an OPEN ROUTER")
    gw_ns = lab.hosts["gw"].ns
    # Forwarding is switched on last in start-up, after vpnd's table is installed.
    assert lab.wait_for(
        lambda: gw_ns.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    )
    _mallory_attacks(lab, alice)
    # 2 * PROBES crafted SYNs to the LAN, plus at least one SYN of the real connect().
    lan = lab.ns_of("lan")
    assert lab.wait_for(lambda: _lan_seen(lan) >= 2 * PROBES + 1, timeout=10), _lan_seen(lan)


def _reload(lab: Lab) -> dict[str, list[str]]:
    res = subprocess.run(
        [VPNCTL, "--socket", str(lab.workdir / "gw.sock"), "reload", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    report: dict[str, list[str]] = json.loads(res.stdout)
    return report


def test_lan_rule_does_not_grant_the_gateways_own_services(lab: Lab) -> None:
    lab.issue("alice")
    lan_only = {"rules": [{"from": "any", "to": LAN, "proto": "any"}]}
    lab.start_gateway(policy=lan_only)
    lab.start_client("alice")
    lab.wait_up("alice")
    # The LAN rule reaches a LAN host...
    assert lab.tcp_connect("alice", "lan", LAN_HOST, SVC_PORT)
    # ...but not a listener on the gateway's own LAN address (sshd, say). vpnd's own
    # firewall refuses it first; the kernel's input chain would too (input_dropped).
    assert not lab.tcp_connect("alice", "gw", GW_LAN, SVC_PORT, timeout=1)
    assert lab.wait_log("gw", r"\(gateway_host_needs_exact_rule\)")
    # A rule naming the gateway's address exactly grants it (applied by a live reload).
    gw = lab.hosts["gw"]
    assert gw.config is not None
    cfg = yaml.safe_load(gw.config.read_text())
    exact = {"from": "any", "to": f"{GW_LAN}/32", "proto": "tcp", "ports": [SVC_PORT]}
    cfg["policy"] = {"rules": [*lan_only["rules"], exact]}
    gw.config.write_text(yaml.safe_dump(cfg))
    report = _reload(lab)
    assert report["errors"] == [], report
    assert lab.tcp_connect("alice", "gw", GW_LAN, SVC_PORT)
    assert lab.tcp_connect("alice", "lan", LAN_HOST, SVC_PORT)


def test_a_subnet_rule_does_not_ride_on_another_groups_exact_rule(lab: Lab) -> None:
    """The exact-host rule for ops puts the gateway's LAN address into the kernel's input
    set; eng's LAN-subnet rule must still not reach it (vpnd's own firewall refuses)."""
    lab.issue("alice", "--groups", "eng")
    lab.issue("bob", "--groups", "ops")
    policy = {
        "rules": [
            {"from": {"group": "ops"}, "to": f"{GW_LAN}/32", "proto": "tcp", "ports": [SVC_PORT]},
            {"from": {"group": "eng"}, "to": LAN, "proto": "any"},
        ]
    }
    lab.start_gateway(policy=policy)
    lab.start_client("alice")
    lab.start_client("bob")
    lab.wait_up("alice")
    lab.wait_up("bob")
    # eng: the LAN host yes, the gateway's own LAN-address listener no.
    assert lab.tcp_connect("alice", "lan", LAN_HOST, SVC_PORT)
    assert not lab.tcp_connect("alice", "gw", GW_LAN, SVC_PORT, timeout=1)
    assert lab.wait_log("gw", r"denied tcp \S+ -> 192\.168\.50\.1:2222 \(gateway_host_needs_exact")
    # ops, by its exact rule: yes; and not the LAN host, which no ops rule names.
    assert lab.tcp_connect("bob", "gw", GW_LAN, SVC_PORT)
    assert not lab.tcp_connect("bob", "lan", LAN_HOST, SVC_PORT, timeout=1)


def test_dual_stack_ruleset_loads_into_the_kernel(netns_factory: NetnsFactory) -> None:
    """The IPv6 halves (overlay, pushed networks, exact hosts) are valid for the real nft,
    and a policy reload's host update applies to the loaded table."""
    ns = netns_factory()
    fw = NftablesRuleset("vpn0")
    body = fw.render(
        overlays=[N("10.8.0.0/24"), N("fd00:8::/64")],
        anti_spoof=True,
        masquerade=True,
        forward_filter=True,
        input_filter=True,
        pushed=[N("192.168.50.0/24"), N("fd00:50::/64")],
        gateway_addresses=[A("10.8.0.1"), A("fd00:8::1")],
        hosts=[A("192.168.50.1"), A("fd00:50::1")],
    )
    ns.run(["nft", "-f", "-"], input=fw.transaction(body))
    ns.run(["nft", "-f", "-"], input=fw.hosts_transaction([A("192.168.50.2"), A("fd00:50::2")]))
    listing = ns.run(["nft", "list", "table", "inet", "vpnd_vpn0"]).stdout
    assert "fd00:50::2" in listing and "192.168.50.2" in listing
    assert "fd00:50::1" not in listing
    assert "ip6 saddr fd00:8::/64" in listing and "ip6 daddr fd00:8::1 accept" in listing
    counters = parse_counters(
        ns.run(["nft", "-j", "list", "counters", "table", "inet", "vpnd_vpn0"]).stdout
    )
    assert counters == {"forward_dropped": 0, "input_dropped": 0}
    ns.run(["nft", "delete", "table", "inet", "vpnd_vpn0"])
