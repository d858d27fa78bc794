"""The gateway's nftables table: masquerade for the overlay and kernel-side anti-spoofing.

vpnd owns exactly one table, ``inet vpnd_<ifname>``, and replaces it atomically in one
``nft -f -`` transaction, so a reload never leaves a window with no rules and never
touches anyone else's tables. The anti-spoofing sets are updated element by element
as peers connect and disconnect.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

from vpnd.net.errors import NetError, TunError
from vpnd.net.tun import validate_ifname

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Source = IPNetwork | IPAddress

NFT_TIMEOUT = 10.0
SET_V4 = "allowed4"
SET_V6 = "allowed6"
# How nft reports deleting an element that is not there (wording varies by version).
_MISSING = ("element does not exist", "No such file or directory")

__all__ = [
    "Firewall",
    "NftablesRuleset",
    "render_anti_spoof",
    "render_masquerade",
    "render_sets",
    "table_name",
]


class Firewall(Protocol):
    """What the daemon needs from the packet filter."""

    async def install(self, ruleset: str) -> None:
        """Atomically replace our table with one whose body is ``ruleset``."""
        ...

    async def remove(self) -> None:
        """Delete our table; missing is fine."""
        ...

    async def add_sources(self, sources: Sequence[Source]) -> None:
        """Allow these sources in on the TUN (a peer connected)."""
        ...

    async def delete_sources(self, sources: Sequence[Source]) -> None:
        """Stop allowing them (a peer left); elements already gone are fine."""
        ...


def table_name(ifname: str) -> str:
    """``vpnd_<ifname>`` with the name made a plain nft identifier.

    If sanitising changed anything, a short hash of the real name is appended so that
    ``vpn-0`` and ``vpn_0`` never share (and delete) one table.
    """
    _valid(ifname)
    clean = re.sub(r"[^A-Za-z0-9_]", "_", ifname)
    if clean != ifname:
        clean += "_" + hashlib.sha256(ifname.encode()).hexdigest()[:6]
    return f"vpnd_{clean}"


def _valid(ifname: str) -> str:
    try:
        return validate_ifname(ifname)
    except TunError as e:
        raise NetError(str(e)) from None


def _net(s: Source) -> IPNetwork:
    return ipaddress.ip_network(s) if not isinstance(s, IPNetwork) else s


def render_sets(sources: Iterable[Source] = ()) -> str:
    """The two anti-spoofing sets (interval sets, so routed subnets fit), pre-filled."""
    nets = [_net(s) for s in sources]
    lines = []
    for name, ver, typ in ((SET_V4, 4, "ipv4_addr"), (SET_V6, 6, "ipv6_addr")):
        elems = ", ".join(str(n) for n in nets if n.version == ver)
        body = f"type {typ}; flags interval;" + (f" elements = {{ {elems} }};" if elems else "")
        lines.append(f"set {name} {{ {body} }}")
    return "\n".join(lines) + "\n"


def render_anti_spoof(tun: str) -> str:
    """Drop anything entering on the TUN whose source no connected peer owns.

    At raw priority, before conntrack, so a spoofed packet never creates state.
    """
    _valid(tun)
    return (
        "chain antispoof {\n"
        "  type filter hook prerouting priority raw; policy accept;\n"
        f'  iifname "{tun}" ip saddr != @{SET_V4} counter drop\n'
        f'  iifname "{tun}" ip6 saddr != @{SET_V6} counter drop\n'
        "}\n"
    )


def render_masquerade(tun: str, overlays: Sequence[IPNetwork]) -> str:
    """Masquerade overlay traffic that leaves through any interface but the TUN."""
    _valid(tun)
    rules = []
    for net in overlays:
        fam = "ip" if net.version == 4 else "ip6"
        rules.append(f'  {fam} saddr {net} oifname != "{tun}" masquerade\n')
    return (
        "chain masq {\n"
        "  type nat hook postrouting priority srcnat; policy accept;\n" + "".join(rules) + "}\n"
    )


class NftablesRuleset:
    """Firewall backed by the ``nft`` binary, owning table ``inet vpnd_<ifname>``."""

    def __init__(self, ifname: str, *, nft: str = "nft", timeout: float = NFT_TIMEOUT) -> None:
        self.ifname = _valid(ifname)
        self.table = table_name(ifname)
        self._nft = nft
        self._timeout = timeout

    def render(
        self,
        *,
        overlays: Sequence[IPNetwork],
        masquerade: bool = True,
        anti_spoof: bool = True,
        sources: Iterable[Source] = (),
    ) -> str:
        """A full table body for install(): sets, anti-spoofing and masquerade."""
        body = render_sets(sources)
        if anti_spoof:
            body += render_anti_spoof(self.ifname)
        if masquerade and overlays:
            body += render_masquerade(self.ifname, overlays)
        return body

    def transaction(self, ruleset: str) -> str:
        """The nft script install() feeds to ``nft -f -``: create-if-missing, delete, recreate,
        all in one atomic transaction."""
        t = f"inet {self.table}"
        return f"table {t}\ndelete table {t}\ntable {t} {{\n{ruleset}}}\n"

    async def install(self, ruleset: str) -> None:
        await self._run(["-f", "-"], self.transaction(ruleset), f"install table {self.table}")

    async def remove(self) -> None:
        # Declaring the table first makes the delete succeed when it is missing.
        t = f"inet {self.table}"
        await self._run(["-f", "-"], f"table {t}\ndelete table {t}\n", f"remove {self.table}")

    async def add_sources(self, sources: Sequence[Source]) -> None:
        script = self._elements("add", sources)
        if script:
            await self._run(["-f", "-"], script, f"allow sources in {self.table}")

    async def delete_sources(self, sources: Sequence[Source]) -> None:
        # A batch fails as a whole if one element is missing; fall back to one at a time.
        script = self._elements("delete", sources)
        if not script:
            return
        try:
            await self._run(["-f", "-"], script, f"revoke sources in {self.table}")
        except NetError:
            for s in sources:
                try:
                    await self._run(
                        ["-f", "-"], self._elements("delete", [s]), f"revoke {s} in {self.table}"
                    )
                except NetError as e:
                    if not any(m in str(e) for m in _MISSING):
                        raise

    def _elements(self, verb: str, sources: Sequence[Source]) -> str:
        lines = []
        for s in sources:
            n = _net(s)
            name = SET_V4 if n.version == 4 else SET_V6
            lines.append(f"{verb} element inet {self.table} {name} {{ {n} }}\n")
        return "".join(lines)

    async def _run(self, args: list[str], script: str, what: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._nft,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise NetError(f"{what}: {self._nft} not found (apt-get install nftables)") from None
        except OSError as e:
            raise NetError(f"{what}: cannot run {self._nft}: {e.strerror}") from None
        try:
            _, err = await asyncio.wait_for(proc.communicate(script.encode()), self._timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NetError(f"{what}: nft did not finish within {self._timeout:g}s") from None
        if proc.returncode != 0:
            text = err.decode(errors="replace")
            errors = [ln.strip() for ln in text.splitlines() if "Error:" in ln]
            msg = errors[0] if errors else " ".join(text.split()) or f"exit {proc.returncode}"
            raise NetError(f"{what}: nft failed: {msg}")
