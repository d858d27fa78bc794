"""Link, address, route and forwarding configuration through netlink (pyroute2).

Async so the daemon's event loop never blocks. We use pyroute2's native
``AsyncIPRoute``: it runs on the caller's loop with no thread, whereas the sync
``IPRoute`` refuses to be built inside a running loop (pyroute2 0.9 raises) and would need a
thread hop per call. Every netlink failure becomes a NetError naming the object and
the errno, e.g. ``route 10.9.0.0/24 via vpn0: link is down (ENETDOWN)``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from vpnd.net.errors import NetError, TunError
from vpnd.net.tun import validate_ifname

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAIN_TABLE = 254
_RTN_UNICAST = 1
_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")

__all__ = [
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "NetConfigurator",
    "NetError",
    "PyRoute2Configurator",
    "forwarding_key",
    "is_listed_route",
]


class NetConfigurator(Protocol):
    """What the daemon needs from the kernel's routing side."""

    async def configure_link(
        self, ifname: str, *, addresses: Sequence[IPInterface], mtu: int
    ) -> None:
        """Set mtu; disable IPv6 if no v6 address (before up); set exactly these addresses; up."""
        ...

    async def add_route(
        self,
        dst: IPNetwork,
        ifname: str,
        *,
        via: IPAddress | None = None,
        metric: int | None = None,
    ) -> None:
        """Add or replace a main-table route (idempotent)."""
        ...

    async def del_route(self, dst: IPNetwork, ifname: str) -> None:
        """Delete a route; a missing route (or link) is not an error."""
        ...

    async def list_routes(self, ifname: str) -> list[IPNetwork]:
        """Unicast main-table routes out of ``ifname`` (IPv6 link-local excluded)."""
        ...

    async def host_addresses(self) -> list[IPAddress]:
        """Every address on every link of this namespace (read-only; IPv6 scope dropped)."""
        ...

    async def link_exists(self, ifname: str) -> bool: ...

    async def delete_link(self, ifname: str) -> None:
        """Delete a (stale, persistent) link; a missing one is fine."""
        ...

    async def link_alias(self, ifname: str) -> tuple[bool, str | None]:
        """(exists, ifalias) of a link; (False, None) when there is no such link."""
        ...

    async def set_link_alias(self, ifname: str, alias: str) -> None:
        """Set a link's ifalias (vpnd marks the links it creates, see net.ownership)."""
        ...

    async def set_ip_forwarding(self, enabled: bool, *, ipv6: bool = False) -> bool:
        """Set forwarding in this namespace; returns the previous value."""
        ...

    def read_sysctl(self, key: str) -> str:
        """The value of ``key`` (``net/ipv4/ip_forward``), stripped."""
        ...

    def write_sysctl(self, key: str, value: str) -> None: ...

    async def close(self) -> None: ...


def forwarding_key(*, ipv6: bool) -> str:
    """The namespace-wide forwarding sysctl, as a /proc/sys relative path."""
    return "net/ipv6/conf/all/forwarding" if ipv6 else "net/ipv4/ip_forward"


def is_listed_route(dst: IPNetwork) -> bool:
    """list_routes leaves out IPv6 link-local routes: the kernel owns them."""
    return not (dst.version == 6 and dst.subnet_of(_LINK_LOCAL6))


def _errno_text(code: int) -> str:
    if code == errno.ENETDOWN:
        return "link is down (ENETDOWN)"
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code).lower()} ({name})"


def _check_ifname(ifname: str) -> None:
    try:
        validate_ifname(ifname)
    except TunError as e:
        raise NetError(str(e)) from None


class PyRoute2Configurator:
    """NetConfigurator over pyroute2's AsyncIPRoute, in the caller's network namespace."""

    def __init__(self, *, proc_sys: str | os.PathLike[str] = "/proc/sys") -> None:
        self._proc_sys = Path(proc_sys)
        self._ipr: Any = None
        self._lock = asyncio.Lock()  # one request at a time on the netlink socket

    async def _get(self) -> Any:
        # Built lazily so it binds to the loop that uses it.
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute  # noqa: PLC0415 - keeps pure importers light

            try:
                self._ipr = AsyncIPRoute()
            except OSError as e:
                raise NetError(
                    f"cannot open a netlink socket: {_errno_text(e.errno or 0)}"
                ) from None
        return self._ipr

    async def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

        ipr = await self._get()
        try:
            result = await getattr(ipr, method)(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                return [m async for m in result]
            return result
        except NetlinkError as e:
            raise _NetlinkFailure(e.code, f"{what}: {_errno_text(e.code)}") from None
        except OSError as e:
            raise NetError(f"{what}: {_errno_text(e.errno or 0)}") from None

    async def _index(self, ifname: str, what: str) -> int | None:
        _check_ifname(ifname)
        found = await self._call(what, "link_lookup", ifname=ifname)
        return int(found[0]) if found else None

    async def _require(self, ifname: str, what: str) -> int:
        idx = await self._index(ifname, what)
        if idx is None:
            raise NetError(f"{what}: no such link {ifname}")
        return idx

    async def configure_link(
        self, ifname: str, *, addresses: Sequence[IPInterface], mtu: int
    ) -> None:
        what = f"configure {ifname}"
        if not 68 <= mtu <= 65535:
            raise NetError(f"{what}: mtu {mtu} out of range 68..65535")
        async with self._lock:
            idx = await self._require(ifname, what)
            await self._call(f"{what}: mtu {mtu}", "link", "set", index=idx, mtu=mtu)
            has_v6 = any(a.version == 6 for a in addresses)
            # Before up, so a v4-only TUN never emits router solicitations or MLD.
            self._write_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "0" if has_v6 else "1")
            current = await self._call(what, "addr", "dump", index=idx)
            want = {(str(a.ip), a.network.prefixlen) for a in addresses}
            for msg in current:
                addr = msg.get("address")
                plen = int(msg["prefixlen"])
                if addr is None or (addr, plen) in want:
                    continue
                if ipaddress.ip_address(addr) in _LINK_LOCAL6:
                    continue  # kernel-managed
                await self._call(
                    f"{what}: remove address {addr}/{plen}",
                    "addr",
                    "del",
                    index=idx,
                    address=addr,
                    prefixlen=plen,
                )
            for a in addresses:
                await self._call(
                    f"{what}: address {a}",
                    "addr",
                    "replace",
                    index=idx,
                    address=str(a.ip),
                    prefixlen=a.network.prefixlen,
                )
            await self._call(f"{what}: set up", "link", "set", index=idx, state="up")

    async def add_route(
        self,
        dst: IPNetwork,
        ifname: str,
        *,
        via: IPAddress | None = None,
        metric: int | None = None,
    ) -> None:
        what = f"route {dst} via {ifname}" + (f" gateway {via}" if via else "")
        async with self._lock:
            idx = await self._require(ifname, what)
            kw: dict[str, Any] = {
                "dst": str(dst),
                "oif": idx,
                "table": MAIN_TABLE,
                "family": socket.AF_INET6 if dst.version == 6 else socket.AF_INET,
            }
            if via is not None:
                if via.version != dst.version:
                    raise NetError(f"{what}: gateway and destination differ in IP version")
                kw["gateway"] = str(via)
            if metric is not None:
                kw["priority"] = metric
            await self._call(what, "route", "replace", **kw)

    async def del_route(self, dst: IPNetwork, ifname: str) -> None:
        what = f"delete route {dst} via {ifname}"
        async with self._lock:
            idx = await self._index(ifname, what)
            if idx is None:
                return  # the routes went with the link
            try:
                await self._call(
                    what,
                    "route",
                    "del",
                    dst=str(dst),
                    oif=idx,
                    table=MAIN_TABLE,
                    family=socket.AF_INET6 if dst.version == 6 else socket.AF_INET,
                )
            except _NetlinkFailure as e:
                if e.code != errno.ESRCH:
                    raise

    async def list_routes(self, ifname: str) -> list[IPNetwork]:
        what = f"list routes via {ifname}"
        async with self._lock:
            idx = await self._require(ifname, what)
            out: list[IPNetwork] = []
            for family in (socket.AF_INET, socket.AF_INET6):
                msgs = await self._call(what, "route", "dump", family=family, table=MAIN_TABLE)
                for m in msgs:
                    if m.get("oif") != idx or m["type"] != _RTN_UNICAST:
                        continue
                    dst = m.get("dst") or ("0.0.0.0" if family == socket.AF_INET else "::")  # noqa: S104
                    net = ipaddress.ip_network(f"{dst}/{m['dst_len']}")
                    if is_listed_route(net) and net not in out:
                        out.append(net)
            return out

    async def host_addresses(self) -> list[IPAddress]:
        what = "list host addresses"
        async with self._lock:
            msgs = await self._call(what, "addr", "dump")
        out: list[IPAddress] = []
        for m in msgs:
            raw = m.get("local") or m.get("address")
            if not raw:
                continue
            try:
                addr = ipaddress.ip_address(str(raw).split("%", 1)[0])
            except ValueError:
                continue
            if addr not in out:
                out.append(addr)
        return out

    async def link_exists(self, ifname: str) -> bool:
        async with self._lock:
            return await self._index(ifname, f"look up link {ifname}") is not None

    async def delete_link(self, ifname: str) -> None:
        what = f"delete link {ifname}"
        async with self._lock:
            idx = await self._index(ifname, what)
            if idx is None:
                return
            try:
                await self._call(what, "link", "del", index=idx)
            except _NetlinkFailure as e:
                if e.code != errno.ENODEV:
                    raise

    async def link_alias(self, ifname: str) -> tuple[bool, str | None]:
        what = f"look up link {ifname}"
        async with self._lock:
            idx = await self._index(ifname, what)
            if idx is None:
                return False, None
            try:
                msgs = await self._call(what, "link", "get", index=idx)
            except _NetlinkFailure as e:
                if e.code == errno.ENODEV:
                    return False, None
                raise
            alias = msgs[0].get_attr("IFLA_IFALIAS") if msgs else None
            return True, (str(alias) if alias else None)

    async def set_link_alias(self, ifname: str, alias: str) -> None:
        what = f"mark link {ifname}"
        async with self._lock:
            idx = await self._require(ifname, what)
            await self._call(what, "link", "set", index=idx, ifalias=alias)

    async def set_ip_forwarding(self, enabled: bool, *, ipv6: bool = False) -> bool:
        key = forwarding_key(ipv6=ipv6)
        previous = self._read_sysctl(key).strip() != "0"
        self._write_sysctl(key, "1" if enabled else "0")
        return previous

    def read_sysctl(self, key: str) -> str:
        return self._read_sysctl(key).strip()

    def write_sysctl(self, key: str, value: str) -> None:
        self._write_sysctl(key, value)

    async def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    # /proc/sys writes are instant, so they are done inline rather than in a thread.
    def _read_sysctl(self, key: str) -> str:
        path = self._proc_sys / key
        try:
            return path.read_text()
        except OSError as e:
            raise NetError(f"sysctl {key.replace('/', '.')}: {_errno_text(e.errno or 0)}") from None

    def _write_sysctl(self, key: str, value: str) -> None:
        path = self._proc_sys / key
        try:
            path.write_text(value)
        except FileNotFoundError:
            if key.startswith("net/ipv6/") and not (self._proc_sys / "net/ipv6").exists():
                return  # kernel without IPv6: nothing to disable
            raise NetError(f"sysctl {key.replace('/', '.')}: no such setting") from None
        except OSError as e:
            raise NetError(
                f"sysctl {key.replace('/', '.')}={value}: {_errno_text(e.errno or 0)}"
            ) from None


class _NetlinkFailure(NetError):
    """A NetError that remembers the netlink errno, so callers can tolerate ENOENT-likes."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
