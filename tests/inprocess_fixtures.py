"""A gateway and N clients in one process, over in-memory streams, kernel edges faked.

No sockets and no real time: the tests that use ``World`` run under ``looptime``
(fake loop time that jumps ahead while the loop is idle), and gateway and clients
take ``loop.time`` as their monotonic clock. Nothing polls: ``World.until`` re-checks
its condition whenever something happened (a delivery, an end, a TUN read or write,
a client outcome; over real TLS only the last three).

There is no TLS handshake on a memory pipe, so nothing checks a chain on the way in:
the gateway's own ``verify_peer`` judges what the client presents, and the client
verifies the gateway's chain itself, exactly as they do after a real handshake.
``World(tls=True)`` runs the same world over real TLS on 127.0.0.1 instead (its
tests opt out of looptime), so the Stream abstraction cannot hide a TLS bug.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pki_fixtures import Leaf, TestCA, make_ca

from vpnd.client.runner import Client, ClientSettings, Connector, Outcome
from vpnd.config import AnyMatch, PolicyConfig, Proto, RuleConfig
from vpnd.gateway.shell import Gateway, GatewaySettings
from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.pki import load_trust_store
from vpnd.pki.crl import RevokedEntry, build_crl, crl_pem
from vpnd.pki.identity import Role
from vpnd.transport.connection import connect, serve
from vpnd.transport.memory import MemoryStream, memory_pipe
from vpnd.transport.stream import Stream
from vpnd.transport.tlsctx import client_context, server_context

REAL_NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
OVERLAY = ipaddress.ip_network("10.8.0.0/24")
LAN = ipaddress.ip_network("192.168.50.0/24")
OVERLAY6 = ipaddress.ip_network("fd00:8::/64")
BACKLOG_CAP = 512 * 1024
HANG_GUARD = 10.0
"""Bounds a hang only; under looptime it costs no real time."""

ALLOW_ALL = PolicyConfig(rules=(RuleConfig(from_=AnyMatch(), to=AnyMatch(), proto=Proto.ANY),))


def ipv4_packet(
    src: str, dst: str, payload: bytes = b"ping", sport: int = 40000, dport: int = 7
) -> bytes:
    """A minimal, well-formed IPv4/UDP packet (checksums are not checked by the fakes)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, total, 1, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + udp


def ipv6_packet(src: str, dst: str, payload: bytes = b"ping6") -> bytes:
    udp = struct.pack("!HHHH", 40000, 7, 8 + len(payload), 0) + payload
    return (
        struct.pack("!IHBB", 6 << 28, len(udp), 17, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + udp
    )


def tcp_open(src: str, dst: str) -> bytes:
    from scapy.layers.inet import IP, TCP

    return bytes(IP(src=src, dst=dst) / TCP(sport=80, dport=5000, flags="S"))


def tso_packet(src: str, dst: str, payload: bytes, mss: int = 1360) -> bytes:
    """A GSO TCPv4 super-packet with a virtio header, as an offload TUN hands it out."""
    from scapy.layers.inet import IP, TCP

    raw = bytearray(bytes(IP(src=src, dst=dst) / TCP(sport=5000, dport=80, flags="PA") / payload))
    struct.pack_into("!H", raw, 36, 0)  # a partial checksum; the segmenter recomputes it
    return struct.pack("<BBHHHH", 1, 1, 40, mss, 20, 16) + bytes(raw)


class Activity:
    """Wakes every waiter whenever something in the world happened."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def poke(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def until(
        self, predicate: Callable[[], object], what: str, timeout: float = HANG_GUARD
    ) -> None:
        """Wait for a condition, re-checked after each event; the timeout only bounds
        a hang, it is not a speed assertion."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    fut = asyncio.get_running_loop().create_future()
                    self._waiters.append(fut)
                    await fut
        except TimeoutError:
            raise AssertionError(f"never happened: {what}") from None


class WatchedTun(FakeTun):
    """A FakeTun that reports reads, writes and its close to an ``Activity``."""

    def __init__(
        self,
        name: str,
        activity: Activity,
        *,
        vnet_hdr: bool = False,
        net: FakeNetConfigurator | None = None,
    ) -> None:
        super().__init__(name, vnet_hdr=vnet_hdr, net=net)
        self._activity = activity
        activity.poke()  # a client's bring-up made it: its waiters wake after this turn

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        self._activity.poke()  # what the reader does with them happens in this turn
        return super().read_batch(max_packets)

    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int:
        n = super().write_batch(packets)
        self._activity.poke()
        return n

    def close(self) -> None:
        super().close()
        self._activity.poke()


@dataclass
class Node:
    client: Client
    tun: list[FakeTun]
    net: FakeNetConfigurator
    task: asyncio.Task[None]
    streams: list[Stream]
    """Each stream the client dialled, the newest last."""


class World:
    def __init__(
        self, tmp: Path, *, offload: bool = False, v6: bool = False, tls: bool = False
    ) -> None:
        self.v6 = v6
        self.tmp = tmp
        self.tls = tls
        self.activity = Activity()
        self.ca = make_ca(
            "corp-ca",
            networks=[OVERLAY, OVERLAY6] if v6 else [OVERLAY],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 900 * DAY,
        )
        self.ca_path = tmp / "ca.pem"
        self.crl_path = tmp / "crl.pem"
        self.ca_path.write_bytes(self.ca.cert.public_bytes(Encoding.PEM))
        self.write_crl()
        gw = self.ca.issue(
            "gw",
            role=Role.GATEWAY,
            addresses=["10.8.0.1", "fd00:8::1"] if v6 else ["10.8.0.1"],
            dns_names=["gw.test"],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 90 * DAY,
        )
        self.gw_cert, self.gw_key = gw.write(tmp, "gw")
        self.gw_net = FakeNetConfigurator()
        self.gw_tun = WatchedTun("vpn0", self.activity, vnet_hdr=offload, net=self.gw_net)
        self.gateway: Gateway | None = None
        self.server: asyncio.Server | None = None
        self.port = 0
        self.nodes: list[Node] = []
        self._ports = itertools.count(40000)

    async def until(
        self, predicate: Callable[[], object], what: str, timeout: float = HANG_GUARD
    ) -> None:
        await self.activity.until(predicate, what, timeout)

    def write_crl(self, revoked: tuple[int, ...] = ()) -> None:
        crl = build_crl(
            ca_cert=self.ca.cert,
            ca_key=self.ca.key,
            revoked=[RevokedEntry(s, REAL_NOW - DAY, None) for s in revoked],
            crl_number=len(revoked) + 1,
            this_update=REAL_NOW - dt.timedelta(hours=1),
            next_update=REAL_NOW + 7 * DAY,
        )
        self.crl_path.write_bytes(crl_pem(crl))

    def gateway_settings(
        self, duplicate: str = "replace", keepalive: tuple[float, float] = (5, 15)
    ) -> GatewaySettings:
        return GatewaySettings(
            duplicate=duplicate,
            tun_name="vpn0",
            mtu=1400,
            overlay_networks=(OVERLAY, OVERLAY6) if self.v6 else (OVERLAY,),
            gateway_addresses=tuple(
                ipaddress.ip_interface(a)
                for a in (["10.8.0.1/24", "fd00:8::1/64"] if self.v6 else ["10.8.0.1/24"])
            ),
            push_routes=(LAN,),
            keepalive_interval=keepalive[0],
            keepalive_timeout=keepalive[1],
        )

    async def start_gateway(
        self,
        duplicate: str = "replace",
        policy: PolicyConfig = ALLOW_ALL,
        *,
        clock: Callable[[], float] = time.time,
        keepalive: tuple[float, float] = (5, 15),
    ) -> None:
        self.gateway = Gateway(
            self.gateway_settings(duplicate, keepalive),
            tun=self.gw_tun,
            net=self.gw_net,
            trust=load_trust_store(self.ca_path, self.crl_path),
            policy=policy,
            clock=clock,
            mono=asyncio.get_running_loop().time,
        )
        await self.gateway.start()
        if not self.tls:
            return
        ctx = server_context(ca=self.ca_path, cert=self.gw_cert, key=self.gw_key, crl=self.crl_path)
        self.server = await serve(
            "127.0.0.1",
            0,
            ctx,
            self.gateway.on_connection,
            handshake_timeout=5,
            on_refused=self.gateway.on_refused,
            max_write_backlog=BACKLOG_CAP,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def dial_memory(self, cert: Path) -> MemoryStream:
        """A pipe to the gateway: the client presents the certificate in ``cert``
        (read now, as the daemon reads its files at every connection)."""
        assert self.gateway is not None
        client, server = memory_pipe(
            client_chain=_der_chain(cert),
            server_chain=_der_chain(self.gw_cert),
            client_addr=("192.0.2.10", next(self._ports)),
            server_addr=("192.0.2.1", 443),
            server_max_backlog=BACKLOG_CAP,
            on_activity=self.activity.poke,
        )
        self.gateway.on_connection(server)
        return client

    async def dial_tls(self, cert: Path, key: Path) -> Stream:
        ctx = client_context(ca=self.ca_path, cert=cert, key=key)
        return await connect("127.0.0.1", self.port, ctx, server_hostname="gw.test", timeout=5)

    def new_client(
        self,
        connect: Connector,
        *,
        tun_factory: Callable[[str, bool], FakeTun] | None = None,
        net: FakeNetConfigurator | None = None,
        clock: Callable[[], float] = time.time,
        offload: bool = False,
        initial_delay: float = 0.05,
        max_delay: float = 0.2,
        local_check: Callable[[], str | None] | None = None,
    ) -> Client:
        """A client on fakes, with this world's timing and outcome reporting."""
        fake_net = net or FakeNetConfigurator()

        def on_outcome(_outcome: Outcome) -> None:
            self.activity.poke()

        return Client(
            ClientSettings(
                server="gw.test:443",
                server_name="gw.test",
                tun_name="tun0",
                initial_delay=initial_delay,
                max_delay=max_delay,
                offload=offload,
            ),
            connect=connect,
            tun_factory=tun_factory
            or (lambda n, o: WatchedTun(n, self.activity, vnet_hdr=o, net=fake_net)),
            net=fake_net,
            trust=load_trust_store(self.ca_path, None, crl_required=False),
            clock=clock,
            mono=asyncio.get_running_loop().time,
            on_outcome=on_outcome,
            local_check=local_check,
        )

    def start_client(
        self,
        name: str,
        *,
        ca: TestCA | None = None,
        addr: str | list[str] = "10.8.0.2",
        leaf: Leaf | None = None,
        label: str | None = None,
        offload: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> Node:
        issuer = ca or self.ca
        if leaf is None:
            leaf = issuer.issue(
                name,
                addresses=[addr] if isinstance(addr, str) else addr,
                not_before=REAL_NOW - DAY,
                not_after=REAL_NOW + 30 * DAY,
            )
        cert, key = leaf.write(self.tmp, label or name)
        net = FakeNetConfigurator()
        tuns: list[FakeTun] = []
        streams: list[Stream] = []

        def tun_factory(ifname: str, offload: bool) -> FakeTun:
            tun = WatchedTun(ifname, self.activity, vnet_hdr=offload, net=net)
            tuns.append(tun)
            return tun

        async def dial() -> Stream:
            stream = await self.dial_tls(cert, key) if self.tls else self.dial_memory(cert)
            streams.append(stream)
            return stream

        client = self.new_client(
            dial, tun_factory=tun_factory, net=net, clock=clock, offload=offload
        )
        node = Node(client, tuns, net, asyncio.create_task(client.run()), streams)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            node.client.stop()
        for node in self.nodes:
            await asyncio.wait_for(node.task, HANG_GUARD)
        if self.server is not None:
            self.server.close()
        if self.gateway is not None:
            await self.gateway.stop()
        self.gw_tun.close()


def issue_leaf(w: World, name: str, addr: str) -> Leaf:
    """A peer certificate of ``w``'s CA, valid for 30 days around now."""
    return w.ca.issue(
        name, addresses=[addr], not_before=REAL_NOW - DAY, not_after=REAL_NOW + 30 * DAY
    )


def owners(w: World) -> dict[str, list[str]]:
    """Who owns which overlay networks in the gateway's address table."""
    assert w.gateway is not None
    return {
        p.identity.name: [str(n) for n in w.gateway.table.networks_of(p)]
        for p in w.gateway.table.owners()
    }


def _der_chain(cert: Path) -> tuple[bytes, ...]:
    """The chain a TLS peer would present from this PEM file, leaf first."""
    certs = x509.load_pem_x509_certificates(cert.read_bytes())
    return tuple(c.public_bytes(Encoding.DER) for c in certs)
