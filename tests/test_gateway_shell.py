"""The shell carries out the core's effects in order: CONFIG waits for the nft set.

One gateway over a hand-written stream (no sockets, no TLS), a client ``Session``
on the other end, and a kernel firewall whose set update the test holds open.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.serialization import Encoding
from gateway_fixtures import SETTINGS
from pki_fixtures import NOW, make_ca

from vpnd.gateway.shell import Gateway
from vpnd.net.fakes import FakeFirewall, FakeNetConfigurator, FakeTun
from vpnd.net.nftables import Source
from vpnd.proto import ConfigReceived, Session, SessionConfig, SessionState

PEER = ("192.0.2.7", 40000)


class OneStream:
    """The gateway's end of one client connection; ``wrote`` is set on every write."""

    backlog_bytes = 0
    peername = PEER

    def __init__(self, chain: tuple[bytes, ...]) -> None:
        self.chain = chain
        self.out = bytearray()
        self.wrote = asyncio.Event()
        self.closed = False
        self.on_data: Callable[[bytes], None] = lambda _d: None

    def peer_chain(self) -> tuple[bytes, ...]:
        return self.chain

    def set_receiver(
        self, on_data: Callable[[bytes], None], on_close: Callable[[Exception | None], None]
    ) -> None:
        self.on_data = on_data

    def write(self, data: bytes | memoryview) -> None:
        self.out += data
        self.wrote.set()

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        self.wrote.clear()
        return out

    def pause_delivery(self) -> None:
        pass

    def resume_delivery(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class HeldFirewall(FakeFirewall):
    """Adding sources blocks until the test opens ``gate``."""

    def __init__(self) -> None:
        super().__init__("vpn0")
        self.ruleset = "installed"
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def add_sources(self, sources: Sequence[Source]) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().add_sources(sources)


async def test_config_is_sent_only_once_the_nft_set_holds_the_peer() -> None:
    ca = make_ca(networks=("10.8.0.0/24",))
    leaf = ca.issue("alice", addresses=["10.8.0.2"])
    net = FakeNetConfigurator()
    nft = HeldFirewall()
    gateway = Gateway(
        SETTINGS,
        tun=FakeTun("vpn0", net=net),
        net=net,
        trust=ca.trust(),
        nft=nft,
        clock=NOW.timestamp,
    )
    await gateway.start()
    try:
        stream = OneStream((leaf.cert.public_bytes(Encoding.DER),))
        gateway.on_connection(stream)
        client = Session(SessionConfig("client"), 0.0)
        stream.on_data(client.data_to_send())  # HELLO
        await nft.entered.wait()
        (peer,) = gateway.peers.values()
        assert peer.admitted and not nft.sources
        client.receive_data(stream.take(), 0.0)
        assert client.state is not SessionState.ESTABLISHED  # no CONFIG yet
        nft.gate.set()
        await stream.wrote.wait()
        assert nft.sources == {ipaddress.ip_network("10.8.0.2/32")}
        client.receive_data(stream.take(), 0.0)
        event = client.next_event()
        assert isinstance(event, ConfigReceived)
        assert str(event.config.address) == "10.8.0.2/24"
    finally:
        await gateway.stop()
