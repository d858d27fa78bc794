"""The in-memory edges behave like the kernel for every call the daemon makes."""

from __future__ import annotations

import asyncio
import ipaddress
import select

import pytest

from vpnd.net.errors import NetError, TunError
from vpnd.net.fakes import FakeFirewall, FakeNetConfigurator, FakeRoute, FakeTun
from vpnd.net.netlink import NetConfigurator
from vpnd.net.nftables import Firewall
from vpnd.net.tun import TunDevice
from vpnd.net.vnet import plain_vnet_header

PING = bytes.fromhex("4500001c00010000400100000a0800020a0800010800f7ff00000000")
N = ipaddress.ip_network
I = ipaddress.ip_interface  # noqa: E741


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_fakes_satisfy_the_protocols() -> None:
    net = FakeNetConfigurator()
    tun: TunDevice = FakeTun("vpn0", net=net)
    cfg: NetConfigurator = net
    fw: Firewall = FakeFirewall("vpn0")
    assert tun.name == "vpn0" and cfg is net and fw is not None


def test_tun_inject_read_and_readability() -> None:
    tun = FakeTun("vpn0")
    assert tun.read_batch() == []
    assert not readable(tun.fileno())
    for i in range(5):
        tun.inject(PING[:-1] + bytes([i]))
    assert readable(tun.fileno())
    first = tun.read_batch(max_packets=3)
    assert [p[-1] for p in first] == [0, 1, 2]
    assert readable(tun.fileno())  # still two waiting
    assert [p[-1] for p in tun.read_batch()] == [3, 4]
    assert not readable(tun.fileno())
    tun.close()


def test_tun_write_refuses_what_the_kernel_refuses() -> None:
    tun = FakeTun("vpn0")
    assert tun.write_batch([PING, b"", b"\x00garbage", memoryview(PING)]) == 2
    assert tun.write_errors == 2
    assert tun.take_written() == [PING, PING]
    assert tun.written == []
    vtun = FakeTun("vpn1", vnet_hdr=True)
    assert vtun.write_batch([plain_vnet_header() + PING, PING, bytes(10)]) == 1
    assert vtun.write_errors == 2


async def test_tun_write_on_a_down_link_is_refused() -> None:
    net = FakeNetConfigurator()
    tun = FakeTun("vpn0", net=net)
    assert tun.write_batch([PING]) == 0  # not configured, so not up
    await net.configure_link("vpn0", addresses=[I("10.8.0.1/24")], mtu=1400)
    assert tun.write_batch([PING]) == 1


async def test_tun_works_with_add_reader() -> None:
    tun = FakeTun("vpn0")
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[list[bytes]] = asyncio.Queue()
    loop.add_reader(tun.fileno(), lambda: got.put_nowait(tun.read_batch()))
    tun.inject(PING)
    batch = await asyncio.wait_for(got.get(), 5)
    loop.remove_reader(tun.fileno())
    tun.close()
    assert batch == [PING]


def test_tun_close_is_idempotent_and_final() -> None:
    net = FakeNetConfigurator()
    tun = FakeTun("vpn0", net=net)
    assert "vpn0" in net.links
    tun.close()
    tun.close()
    assert tun.closed and "vpn0" not in net.links
    for call in (tun.fileno, tun.read_batch, lambda: tun.write_batch([PING])):
        with pytest.raises(TunError, match="closed"):
            call()


def test_tun_name_validated_and_busy() -> None:
    with pytest.raises(TunError, match="interface name invalid"):
        FakeTun("much-too-long-name0")
    net = FakeNetConfigurator()
    FakeTun("vpn0", net=net)
    with pytest.raises(TunError, match="busy"):
        FakeTun("vpn0", net=net)


async def test_configurator_records_exact_state_and_close_removes_routes() -> None:
    net = FakeNetConfigurator()
    tun = FakeTun("vpn0", net=net)
    with pytest.raises(NetError, match="link is down"):
        await net.add_route(N("10.9.0.0/24"), "vpn0")
    await net.configure_link("vpn0", addresses=[I("10.8.0.1/24")], mtu=1400)
    link = net.links["vpn0"]
    assert (link.mtu, link.up, link.ipv6_disabled) == (1400, True, True)
    assert link.addresses == [I("10.8.0.1/24")]
    await net.add_route(N("10.9.0.0/24"), "vpn0")
    await net.add_route(N("10.9.0.0/24"), "vpn0")  # replace: idempotent
    await net.add_route(N("10.10.0.0/16"), "vpn0", via=ipaddress.ip_address("10.8.0.2"))
    assert await net.list_routes("vpn0") == [
        N("10.8.0.0/24"),
        N("10.9.0.0/24"),
        N("10.10.0.0/16"),
    ]
    assert net.routes["vpn0"][N("10.10.0.0/16")] == FakeRoute(via=ipaddress.ip_address("10.8.0.2"))
    await net.del_route(N("10.9.0.0/24"), "vpn0")
    await net.del_route(N("10.9.0.0/24"), "vpn0")  # missing: fine
    await net.del_route(N("10.9.0.0/24"), "nope0")  # missing link: fine
    assert N("10.9.0.0/24") not in await net.list_routes("vpn0")
    # Re-addressing replaces the address set and its connected route.
    await net.configure_link("vpn0", addresses=[I("10.7.0.5/24"), I("fd00::5/64")], mtu=1400)
    assert link.addresses == [I("10.7.0.5/24"), I("fd00::5/64")] and not link.ipv6_disabled
    assert set(await net.list_routes("vpn0")) == {
        N("10.7.0.0/24"),
        N("10.10.0.0/16"),
        N("fd00::/64"),
    }
    # Dropping the v6 address disables IPv6, which flushes the v6 routes.
    await net.configure_link("vpn0", addresses=[I("10.7.0.5/24")], mtu=1400)
    assert N("fd00::/64") not in await net.list_routes("vpn0")
    assert await net.link_exists("vpn0")
    tun.close()
    assert not await net.link_exists("vpn0")
    assert net.routes == {}
    with pytest.raises(NetError, match="no such link vpn0"):
        await net.list_routes("vpn0")
    with pytest.raises(NetError, match="no such link"):
        await net.configure_link("vpn0", addresses=[], mtu=1400)
    with pytest.raises(NetError, match="interface name invalid"):
        await net.link_exists("a/b")
    await net.delete_link("vpn0")  # missing: fine


async def test_configurator_rejects_bad_arguments() -> None:
    net = FakeNetConfigurator()
    FakeTun("vpn0", net=net)
    with pytest.raises(NetError, match="mtu 20 out of range"):
        await net.configure_link("vpn0", addresses=[], mtu=20)
    await net.configure_link("vpn0", addresses=[], mtu=1400)
    with pytest.raises(NetError, match="differ in IP version"):
        await net.add_route(N("10.9.0.0/24"), "vpn0", via=ipaddress.ip_address("fd00::1"))


async def test_forwarding_returns_previous_value() -> None:
    net = FakeNetConfigurator()
    assert await net.set_ip_forwarding(True) is False
    assert await net.set_ip_forwarding(True) is True
    assert await net.set_ip_forwarding(True, ipv6=True) is False
    assert net.forwarding == {"ipv4": True, "ipv6": True}
    assert await net.set_ip_forwarding(False) is True
    assert net.forwarding["ipv4"] is False


async def test_firewall_records_rules_and_sources() -> None:
    fw = FakeFirewall("vpn-0")
    assert fw.table.startswith("vpnd_vpn_0_")
    with pytest.raises(NetError, match="not installed"):
        await fw.add_sources([ipaddress.ip_address("10.8.0.2")])
    await fw.install("set allowed4 { type ipv4_addr; }\n")
    await fw.add_sources([ipaddress.ip_address("10.8.0.2"), N("10.9.0.0/24")])
    assert fw.sources == {N("10.8.0.2/32"), N("10.9.0.0/24")}
    await fw.delete_sources([ipaddress.ip_address("10.8.0.2"), ipaddress.ip_address("10.8.0.3")])
    assert fw.sources == {N("10.9.0.0/24")}
    await fw.remove()
    await fw.remove()
    assert not fw.installed and fw.sources == set()
