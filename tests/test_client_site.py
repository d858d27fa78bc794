"""A site router (certificate ``routes``) sends its LAN's packets into the tunnel; reload
planning decides when a new setting needs a new session. In one process over memory
pipes, kernel faked, loop time fake."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from pathlib import Path

import pytest
from inprocess_fixtures import DAY, REAL_NOW, World, ipv4_packet

from vpnd.client.runner import ClientSettings, settings_changes

SITE_LAN = ipaddress.ip_network("172.20.0.0/24")


@pytest.mark.looptime
async def test_site_router_forwards_its_lan_and_still_drops_other_sources(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        leaf = w.ca.issue("site", addresses=["10.8.0.9"], routes=[str(SITE_LAN)],
                          not_before=REAL_NOW - DAY, not_after=REAL_NOW + 9 * DAY)  # fmt: skip
        site = w.start_client("site", leaf=leaf)
        # What the daemon reads from the site's own certificate.
        site.client.settings = dataclasses.replace(site.client.settings, own_routes=(SITE_LAN,))
        await asyncio.wait_for(site.client.connected.wait(), 10)
        from_lan = ipv4_packet("172.20.0.10", "192.168.50.10", b"from the site LAN")
        own = ipv4_packet("10.8.0.9", "192.168.50.10", b"from the router")
        stray = ipv4_packet("172.21.0.10", "192.168.50.10", b"not ours")
        for pkt in (from_lan, own, stray):
            site.tun[0].inject(pkt)
        await w.until(lambda: len(w.gw_tun.written) == 2, "both own sources arrive")
        assert w.gw_tun.written == [from_lan, own]
        assert site.client.drops["not_own_source"] == 1  # the stray source only
        # The LAN host's reply comes back through the tunnel to the site LAN.
        reply = ipv4_packet("192.168.50.10", "172.20.0.10", b"reply", sport=7, dport=40000)
        w.gw_tun.inject(reply)
        await w.until(lambda: reply in site.tun[0].written, "the reply reaches the site")
    finally:
        await w.close()


def base() -> ClientSettings:
    return ClientSettings(server="gw:4443", server_name="gw", tun_name="vpn0")


def test_reload_plan_keeps_the_tunnel_for_unchanged_or_live_settings() -> None:
    assert settings_changes(base(), base()) == ([], False)
    changed, reconnect = settings_changes(
        base(), dataclasses.replace(base(), max_delay=60.0, own_routes=(SITE_LAN,))
    )
    assert changed == ["max_delay: 30.0 -> 60.0", "own_routes: none -> 172.20.0.0/24"]
    assert not reconnect


def test_reload_plan_reconnects_when_the_session_settings_change() -> None:
    news: dict[str, ClientSettings] = {
        "server": dataclasses.replace(base(), server="gw2:4443"),
        "server_name": dataclasses.replace(base(), server_name="gw2"),
        "tun_name": dataclasses.replace(base(), tun_name="vpn1"),
        "max_frame": dataclasses.replace(base(), max_frame=131072),
    }
    for field, new in news.items():
        changed, reconnect = settings_changes(base(), new)
        assert reconnect, field
        assert changed[0].startswith(f"{field}: "), changed
