"""Site-to-site: a peer whose certificate carries ``routes`` is a router for its LAN.

    site LAN host 172.20.0.10 ── site (vpnd client, routes 172.20.0.0/24, forwarding on)
        ══ tunnel ══ gw ── LAN host 192.168.50.10 (routes 172.20.0.0/24 back via gw)

The site LAN host reaches the gateway's LAN host and gets its replies (ping and TCP),
with the gateway's policy allowing exactly the site peer to the LAN.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nslib import NetnsFactory, veth
from vpnlab import LAN, LAN_HOST, Host, Lab

SITE_LAN = "172.20.0.0/24"
SITE_HOST = "172.20.0.10"


@pytest.fixture
def site_lab(netns_factory: NetnsFactory) -> Iterator[Lab]:
    lab = Lab(netns_factory)
    lab.build(clients=("site",))
    lab.make_pki()
    site = lab.hosts["site"]
    sitelan = netns_factory()
    veth(site.ns, sitelan, "172.20.0.1/24", f"{SITE_HOST}/24")
    sitelan.run(["ip", "route", "add", "default", "via", "172.20.0.1"])
    site.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])  # a router forwards
    assert lab.lan is not None
    lab.lan.run(["ip", "route", "add", SITE_LAN, "via", "192.168.50.1"])
    lab.hosts["sitelan"] = Host("sitelan", sitelan, SITE_HOST)
    try:
        yield lab
    finally:
        problems = lab.cleanup()
        assert not problems, problems


def test_a_host_behind_the_site_reaches_a_host_behind_the_gateway_and_back(
    site_lab: Lab,
) -> None:
    lab = site_lab
    lab.issue("site", "--ip", "10.8.0.9", "--routes", SITE_LAN)
    policy = {"rules": [{"from": {"peer": "site"}, "to": LAN, "proto": "any"}]}
    lab.start_gateway(policy=policy)
    lab.start_client("site")
    lab.wait_up("site")
    # The site's LAN is routed to the site's session on the gateway.
    routes = lab.hosts["gw"].ns.run(["ip", "route", "show", SITE_LAN]).stdout
    assert "vpn0" in routes, routes
    assert lab.ping("sitelan", LAN_HOST, count=3), lab.hosts["site"].log_text()
    assert lab.tcp_connect("sitelan", "lan", LAN_HOST, 9100)
    assert lab.tcp_transfer("sitelan", "lan", LAN_HOST, size=300_000)
    assert lab.tcp_transfer("sitelan", "lan", LAN_HOST, size=300_000, download=True)
    log = lab.hosts["site"].log_text()
    assert "forwarding is enabled" not in log, log  # forwarding is on: no warning
    assert "Traceback" not in log + lab.hosts["gw"].log_text()
