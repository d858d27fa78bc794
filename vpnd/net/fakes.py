"""In-memory stand-ins for the kernel edges, so a gateway and N clients run in one process.

They mimic the real things' observable behaviour, errors included: a FakeTun's link
(and its routes) vanish from its FakeNetConfigurator when it closes, adding a route on
a link that is down fails, and deleting a missing route does not.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vpnd.net.errors import NetError, TunError
from vpnd.net.netlink import IPAddress, IPInterface, IPNetwork, is_listed_route
from vpnd.net.nftables import Source, table_name
from vpnd.net.tun import validate_ifname
from vpnd.net.vnet import VNET_HDR_LEN

__all__ = ["FakeFirewall", "FakeLink", "FakeNetConfigurator", "FakeRoute", "FakeTun"]


class FakeTun:
    """A TunDevice in memory. ``inject`` is kernel→daemon; ``written`` is daemon→kernel.

    ``fileno()`` is a real non-blocking eventfd that is readable exactly while injected
    packets wait, so ``loop.add_reader`` works as with a real TUN.
    """

    def __init__(
        self, name: str = "vpn0", *, vnet_hdr: bool = False, net: FakeNetConfigurator | None = None
    ) -> None:
        self.name = validate_ifname(name)
        self.vnet_hdr = vnet_hdr
        self.write_errors = 0
        self.written: list[bytes] = []
        self._inbound: collections.deque[bytes] = collections.deque()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._net = net
        if net is not None:
            try:
                net.create_link(name)
            except NetError:
                os.close(self._fd)
                raise TunError(f"TUN {name}: device busy: another process has it open") from None

    def fileno(self) -> int:
        if self._fd < 0:
            raise TunError(f"TUN {self.name} is closed")
        return self._fd

    def inject(self, pkt: bytes) -> None:
        """Queue a packet as if the kernel had routed it into the TUN."""
        fd = self.fileno()
        self._inbound.append(bytes(pkt))
        os.eventfd_write(fd, 1)

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        fd = self.fileno()
        out: list[bytes] = []
        while self._inbound and len(out) < max_packets:
            out.append(self._inbound.popleft())
        if not self._inbound:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)  # reset readability
        return out

    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int:
        self.fileno()
        n = 0
        for pkt in packets:
            if self._kernel_refuses(pkt):
                self.write_errors += 1
                continue
            self.written.append(bytes(pkt))
            n += 1
        return n

    def _kernel_refuses(self, pkt: bytes | memoryview) -> bool:
        # What Linux answers EINVAL/EIO to: a short vnet header, no IP version nibble,
        # or any write while the link is down.
        off = VNET_HDR_LEN if self.vnet_hdr else 0
        if len(pkt) <= off or pkt[off] >> 4 not in (4, 6):
            return True
        if self._net is not None:
            link = self._net.links.get(self.name)
            return link is None or not link.up
        return False

    def take_written(self) -> list[bytes]:
        """Return and clear what the daemon wrote."""
        out, self.written = self.written, []
        return out

    @property
    def pending(self) -> int:
        return len(self._inbound)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            self._inbound.clear()
            if self._net is not None:
                self._net.remove_link(self.name)


@dataclass
class FakeRoute:
    via: IPAddress | None = None
    metric: int | None = None


@dataclass
class FakeLink:
    mtu: int = 1500
    up: bool = False
    addresses: list[IPInterface] = field(default_factory=list)
    ipv6_disabled: bool = False
    alias: str | None = None
    routes: dict[IPNetwork, FakeRoute] = field(default_factory=dict)
    """Main-table routes out of this link, connected ones included."""


class FakeNetConfigurator:
    """A NetConfigurator that keeps the 'kernel' state in dicts tests can assert on."""

    def __init__(self) -> None:
        self.links: dict[str, FakeLink] = {}
        self.forwarding: dict[str, bool] = {"ipv4": False, "ipv6": False}
        """The two namespace-wide forwarding sysctls (also readable via ``read_sysctl``)."""
        self.closed = False
        self.calls: list[str] = []
        self.host_extra: list[IPAddress] = []
        """Addresses of the host's other links (its LAN...), for ``host_addresses``."""

    # Test-side helpers: what opening / closing a TUN does to the kernel.
    def create_link(self, ifname: str, *, mtu: int = 1500) -> FakeLink:
        if ifname in self.links:
            raise NetError(f"link {ifname} exists")
        link = self.links[ifname] = FakeLink(mtu=mtu)
        return link

    def remove_link(self, ifname: str) -> None:
        self.links.pop(ifname, None)  # its routes go with it

    @property
    def routes(self) -> dict[str, dict[IPNetwork, FakeRoute]]:
        """Every link's routes, by link name."""
        return {name: dict(link.routes) for name, link in self.links.items()}

    def _link(self, ifname: str, what: str) -> FakeLink:
        try:
            validate_ifname(ifname)
        except TunError as e:
            raise NetError(str(e)) from None
        if self.closed:
            raise NetError(f"{what}: configurator is closed")
        link = self.links.get(ifname)
        if link is None:
            raise NetError(f"{what}: no such link {ifname}")
        return link

    async def configure_link(
        self, ifname: str, *, addresses: Sequence[IPInterface], mtu: int
    ) -> None:
        what = f"configure {ifname}"
        self.calls.append(what)
        link = self._link(ifname, what)
        if not 68 <= mtu <= 65535:
            raise NetError(f"{what}: mtu {mtu} out of range 68..65535")
        link.mtu = mtu
        link.ipv6_disabled = not any(a.version == 6 for a in addresses)
        if link.ipv6_disabled:
            # Disabling IPv6 on a link flushes its IPv6 routes, as Linux does.
            link.routes = {d: r for d, r in link.routes.items() if d.version == 4}
        for old in link.addresses:
            if old not in addresses:
                link.routes.pop(old.network, None)
        link.addresses = list(dict.fromkeys(addresses))
        link.up = True
        for a in link.addresses:
            # The kernel adds the connected route of every address (none for /32, /128).
            if a.network.num_addresses > 1:
                link.routes[a.network] = FakeRoute()

    async def add_route(
        self,
        dst: IPNetwork,
        ifname: str,
        *,
        via: IPAddress | None = None,
        metric: int | None = None,
    ) -> None:
        what = f"route {dst} via {ifname}" + (f" gateway {via}" if via else "")
        self.calls.append(what)
        link = self._link(ifname, what)
        if not link.up:
            raise NetError(f"{what}: link is down (ENETDOWN)")
        if via is not None and via.version != dst.version:
            raise NetError(f"{what}: gateway and destination differ in IP version")
        link.routes[dst] = FakeRoute(via=via, metric=metric)

    async def del_route(self, dst: IPNetwork, ifname: str) -> None:
        self.calls.append(f"delete route {dst} via {ifname}")
        link = self.links.get(ifname)
        if link is not None:
            link.routes.pop(dst, None)

    async def list_routes(self, ifname: str) -> list[IPNetwork]:
        link = self._link(ifname, f"list routes via {ifname}")
        return [r for r in link.routes if is_listed_route(r)]

    async def host_addresses(self) -> list[IPAddress]:
        if self.closed:
            raise NetError("list host addresses: configurator is closed")
        found = [i.ip for link in self.links.values() for i in link.addresses]
        return list(dict.fromkeys([*found, *self.host_extra]))

    async def link_exists(self, ifname: str) -> bool:
        try:
            validate_ifname(ifname)
        except TunError as e:
            raise NetError(str(e)) from None
        return ifname in self.links

    async def delete_link(self, ifname: str) -> None:
        self.calls.append(f"delete link {ifname}")
        self.remove_link(ifname)

    async def link_alias(self, ifname: str) -> tuple[bool, str | None]:
        await self.link_exists(ifname)  # validates the name
        link = self.links.get(ifname)
        return (False, None) if link is None else (True, link.alias)

    async def set_link_alias(self, ifname: str, alias: str) -> None:
        what = f"mark link {ifname}"
        self.calls.append(what)
        self._link(ifname, what).alias = alias

    async def set_ip_forwarding(self, enabled: bool, *, ipv6: bool = False) -> bool:
        key = "ipv6" if ipv6 else "ipv4"
        previous = self.forwarding[key]
        self.forwarding[key] = enabled
        return previous

    _SYSCTLS = {"net/ipv4/ip_forward": "ipv4", "net/ipv6/conf/all/forwarding": "ipv6"}

    def read_sysctl(self, key: str) -> str:
        if key not in self._SYSCTLS:
            raise NetError(f"sysctl {key.replace('/', '.')}: no such setting")
        return "1" if self.forwarding[self._SYSCTLS[key]] else "0"

    def write_sysctl(self, key: str, value: str) -> None:
        if key not in self._SYSCTLS or value not in ("0", "1"):
            raise NetError(f"sysctl {key.replace('/', '.')}={value}: invalid argument (EINVAL)")
        self.calls.append(f"sysctl {key}={value}")
        self.forwarding[self._SYSCTLS[key]] = value == "1"

    async def close(self) -> None:
        self.closed = True


class FakeFirewall:
    """A Firewall that records the installed body and the allowed sources."""

    def __init__(self, ifname: str = "vpn0") -> None:
        self.table = table_name(ifname)
        self.ruleset: str | None = None
        self.sources: set[IPNetwork] = set()
        self.installs = 0

    async def install(self, ruleset: str) -> None:
        self.ruleset = ruleset
        self.installs += 1

    async def remove(self) -> None:
        self.ruleset = None
        self.sources.clear()

    @property
    def installed(self) -> bool:
        return self.ruleset is not None

    async def add_sources(self, sources: Sequence[Source]) -> None:
        if self.ruleset is None:
            raise NetError(f"allow sources in {self.table}: table is not installed")
        self.sources.update(ipaddress.ip_network(s) for s in sources)

    async def delete_sources(self, sources: Sequence[Source]) -> None:
        self.sources.difference_update(ipaddress.ip_network(s) for s in sources)
