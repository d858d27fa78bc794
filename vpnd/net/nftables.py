"""The gateway's nftables table: masquerade for the overlay and kernel-side anti-spoofing.

vpnd owns exactly one table, ``inet vpnd_<ifname>``, and replaces it atomically in one
``nft -f -`` transaction, so a reload never leaves a window with no rules and never
touches anyone else's tables. The anti-spoofing sets are updated element by element
as peers connect and disconnect.

The gateway filter (``nftables.forward_filter``, on by default) keeps the gateway from
being an open router and keeps policy rules from leaking the gateway host's services:

- ``forward`` (only while vpnd forwards): a packet that came in on the TUN passed vpnd's
  userspace anti-spoofing and policy and is accepted. Into the TUN only a ct
  established,related reply passes. Anything else going into the overlay (underlay to
  overlay, LAN to overlay, to a peer's site routes), anything carrying an overlay source
  that did not come from the TUN, and any new flow into the pushed networks
  (``push_routes``) from elsewhere than the TUN is dropped and counted in the named
  counter ``forward_dropped``. Other forwarding is left alone.
- ``input`` (packets from the TUN delivered to the gateway host itself): accepted only to
  the gateway's overlay addresses (the userspace policy already judged them), as ct
  established,related, or to a host address that a policy rule names exactly (a /32 or
  /128 ``to``: sets ``hosts4``/``hosts6``). A rule naming a LAN subnet thus never grants
  the gateway's own address in it. The rest is dropped and counted in ``input_dropped``.
  Keepalive and control traffic travel on the TLS socket over the underlay, not the TUN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from vpnd.config.schema import NetworkMatch, PolicyConfig
from vpnd.net.errors import NetError, TunError
from vpnd.net.tun import validate_ifname

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Source = IPNetwork | IPAddress

NFT_TIMEOUT = 10.0
COUNTER_POLL = 5.0
log = logging.getLogger("vpnd.nftables")
SET_V4 = "allowed4"
SET_V6 = "allowed6"
HOSTS_V4 = "hosts4"
HOSTS_V6 = "hosts6"
FORWARD_COUNTER = "forward_dropped"
INPUT_COUNTER = "input_dropped"
# How nft reports deleting an element that is not there (wording varies by version).
_MISSING = ("element does not exist", "No such file or directory")

__all__ = [
    "Firewall",
    "NftablesRuleset",
    "parse_counters",
    "policy_hosts",
    "poll_counters",
    "render_anti_spoof",
    "render_forward_filter",
    "render_host_sets",
    "render_input_filter",
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


def _family_sets(nets: Iterable[Source]) -> tuple[str, str]:
    """``{ a, b }`` literals for the IPv4 and IPv6 members (empty string when none)."""

    def text(n: IPNetwork) -> str:
        return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)

    v4 = [text(_net(n)) for n in nets if _net(n).version == 4]
    v6 = [text(_net(n)) for n in nets if _net(n).version == 6]
    return (
        "{ " + ", ".join(v4) + " }" if v4 else "",
        "{ " + ", ".join(v6) + " }" if v6 else "",
    )


def render_forward_filter(
    tun: str, overlays: Sequence[IPNetwork], pushed: Sequence[IPNetwork]
) -> str:
    """The forward chain: only traffic from the TUN, or tracked replies into it.

    Policy accept for unrelated forwarding (the host may be a router for other things);
    every drop here is counted in ``forward_dropped``.
    """
    _valid(tun)
    drop = f'counter name "{FORWARD_COUNTER}" drop'
    rules = [
        f'  iifname "{tun}" accept\n',
        f'  oifname "{tun}" ct state established,related accept\n',
        f'  oifname "{tun}" {drop}\n',
    ]
    o4, o6 = _family_sets(overlays)
    if o4:
        rules.append(f"  ip saddr {o4} {drop}\n")
    if o6:
        rules.append(f"  ip6 saddr {o6} {drop}\n")
    p4, p6 = _family_sets(pushed)
    for fam, nets in (("ip", p4), ("ip6", p6)):
        if nets:
            rules.append(f"  {fam} daddr {nets} ct state established,related accept\n")
            rules.append(f"  {fam} daddr {nets} {drop}\n")
    return (
        "chain forward {\n"
        "  type filter hook forward priority filter; policy accept;\n" + "".join(rules) + "}\n"
    )


def render_input_filter(tun: str, gateway_addresses: Sequence[IPAddress]) -> str:
    """The input chain: what the TUN may reach on the gateway host itself."""
    _valid(tun)
    a4, a6 = _family_sets(gateway_addresses)
    rules = [
        f'  iifname != "{tun}" accept\n',
        "  ct state established,related accept\n",
    ]
    if a4:
        rules.append(f"  ip daddr {a4} accept\n")
    if a6:
        rules.append(f"  ip6 daddr {a6} accept\n")
    rules.append(f"  ip daddr @{HOSTS_V4} accept\n")
    rules.append(f"  ip6 daddr @{HOSTS_V6} accept\n")
    rules.append(f'  counter name "{INPUT_COUNTER}" drop\n')
    return (
        "chain input {\n"
        "  type filter hook input priority filter; policy accept;\n" + "".join(rules) + "}\n"
    )


def render_host_sets(hosts: Iterable[Source] = ()) -> str:
    """The exact-host sets (addresses a policy rule names as /32 or /128) and the counters."""
    h4, h6 = _family_sets(hosts)
    lines = []
    for name, typ, elems in ((HOSTS_V4, "ipv4_addr", h4), (HOSTS_V6, "ipv6_addr", h6)):
        lines.append(
            f"set {name} {{ type {typ};" + (f" elements = {elems};" if elems else "") + " }"
        )
    lines.append(f"counter {FORWARD_COUNTER} {{ }}")
    lines.append(f"counter {INPUT_COUNTER} {{ }}")
    return "\n".join(lines) + "\n"


def policy_hosts(policy: PolicyConfig) -> list[IPAddress]:
    """The addresses policy rules name exactly (``to`` a /32 or /128), for the input filter.

    Only those may reach the gateway host itself from the TUN (besides its overlay
    addresses): a rule naming a LAN subnet does not grant the gateway's address in it.
    """
    found: list[IPAddress] = []
    for rule in policy.rules:
        t = rule.to
        if not isinstance(t, NetworkMatch) or t.network.prefixlen != t.network.max_prefixlen:
            continue
        if t.network.network_address not in found:
            found.append(t.network.network_address)
    return found


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
        forward_filter: bool = False,
        input_filter: bool = False,
        pushed: Sequence[IPNetwork] = (),
        gateway_addresses: Sequence[IPAddress] = (),
        hosts: Iterable[Source] = (),
    ) -> str:
        """A full table body for install(): sets, anti-spoofing, masquerade, and the
        gateway filter (forward chain, input chain from the TUN)."""
        body = render_sets(sources) + render_host_sets(hosts)
        if anti_spoof:
            body += render_anti_spoof(self.ifname)
        if masquerade and overlays:
            body += render_masquerade(self.ifname, overlays)
        if forward_filter:
            body += render_forward_filter(self.ifname, overlays, pushed)
        if input_filter:
            body += render_input_filter(self.ifname, gateway_addresses)
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

    def hosts_transaction(self, hosts: Sequence[Source]) -> str:
        """Replace the exact-host sets' contents in one transaction (a policy reload)."""
        t = f"inet {self.table}"
        script = f"flush set {t} {HOSTS_V4}\nflush set {t} {HOSTS_V6}\n"
        for h in hosts:
            n = _net(h)
            name = HOSTS_V4 if n.version == 4 else HOSTS_V6
            script += f"add element {t} {name} {{ {n.network_address} }}\n"
        return script

    async def set_hosts(self, hosts: Sequence[Source]) -> None:
        """The gateway host addresses the policy names exactly, after a policy reload."""
        await self._run(["-f", "-"], self.hosts_transaction(hosts), f"update hosts in {self.table}")

    async def counters(self) -> dict[str, int]:
        """Packets dropped so far by the gateway filter: ``forward_dropped``, ``input_dropped``."""
        out = await self._run(
            ["-j", "list", "counters", "table", "inet", self.table], "", f"read {self.table}"
        )
        return parse_counters(out)

    def _elements(self, verb: str, sources: Sequence[Source]) -> str:
        lines = []
        for s in sources:
            n = _net(s)
            name = SET_V4 if n.version == 4 else SET_V6
            lines.append(f"{verb} element inet {self.table} {name} {{ {n} }}\n")
        return "".join(lines)

    async def _run(self, args: list[str], script: str, what: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._nft,
                *args,
                # No stdin unless there is a script: a child cancelled mid-spawn (the
                # counter poller at stop) must not sit on an open pipe forever.
                stdin=asyncio.subprocess.PIPE if script else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise NetError(f"{what}: {self._nft} not found (apt-get install nftables)") from None
        except OSError as e:
            raise NetError(f"{what}: cannot run {self._nft}: {e.strerror}") from None
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that lands as nft finishes, and the counter poller then never stops.
            async with asyncio.timeout(self._timeout):
                out, err = await proc.communicate(script.encode() if script else None)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NetError(f"{what}: nft did not finish within {self._timeout:g}s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # never leave an nft child behind
            raise
        if proc.returncode != 0:
            text = err.decode(errors="replace")
            errors = [ln.strip() for ln in text.splitlines() if "Error:" in ln]
            msg = errors[0] if errors else " ".join(text.split()) or f"exit {proc.returncode}"
            raise NetError(f"{what}: nft failed: {msg}")
        return out.decode(errors="replace")


async def poll_counters(
    fw: NftablesRuleset,
    sink: Callable[[dict[str, int]], None],
    interval: float = COUNTER_POLL,
) -> None:
    """Read the drop counters every ``interval`` seconds into ``sink`` until cancelled.

    A failed read (nft briefly unavailable) is logged once and retried; the last good
    values stay in place.
    """
    failed = False
    while True:
        try:
            sink(await fw.counters())
            failed = False
        except NetError as err:
            if not failed:
                log.warning("nftables counters unavailable: %s", err)
            failed = True
        await asyncio.sleep(interval)


def parse_counters(text: str) -> dict[str, int]:
    """Packet counts by counter name from ``nft -j list counters``; bad output gives {}."""
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    found: dict[str, int] = {}
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    for item in items if isinstance(items, list) else []:
        c = item.get("counter") if isinstance(item, dict) else None
        if isinstance(c, dict) and isinstance(c.get("name"), str):
            packets = c.get("packets", 0)
            found[c["name"]] = packets if isinstance(packets, int) else 0
    return found
