"""The shell carries out the core's effects in order: CONFIG waits for the nft set.

One gateway over a hand-written stream (no sockets, no TLS), a client ``Session``
on the other end, and a kernel firewall whose set update the test holds open.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.serialization import Encoding
from gateway_fixtures import SETTINGS
from inprocess_fixtures import ALLOW_ALL, ipv4_packet
from pki_fixtures import NOW, make_ca

from vpnd.gateway.shell import Gateway
from vpnd.net.fakes import FakeFirewall, FakeNetConfigurator, FakeTun
from vpnd.net.nftables import Source
from vpnd.proto import ConfigReceived, PacketsReceived, Session, SessionConfig, SessionState

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


async def test_a_reply_during_a_renewals_nft_wait_is_held_and_follows_the_config() -> None:
    # The renewed session owns alice's address from HELLO on, but takes DATA only after
    # CONFIG, which waits for the nft set: the LAN's reply in between must reach her.
    ca = make_ca(networks=("10.8.0.0/24",))
    old = ca.issue("alice", addresses=["10.8.0.2"], not_before=NOW - dt.timedelta(days=2))
    new = ca.issue("alice", addresses=["10.8.0.2"], not_before=NOW - dt.timedelta(days=1))
    net = FakeNetConfigurator()
    tun = FakeTun("vpn0", net=net)
    nft = HeldFirewall()
    nft.gate.set()
    gateway = Gateway(
        SETTINGS,
        tun=tun,
        net=net,
        trust=ca.trust(),
        nft=nft,
        policy=ALLOW_ALL,
        clock=NOW.timestamp,
    )
    await gateway.start()
    try:
        first, laptop = await _configured(gateway, old.cert.public_bytes(Encoding.DER))
        laptop.send_packets([ipv4_packet("10.8.0.2", "192.168.1.5")], 0.0)
        first.on_data(laptop.data_to_send())  # opens the flow the reply belongs to
        assert len(tun.take_written()) == 1
        nft.gate.clear()
        nft.entered.clear()
        second = OneStream((new.cert.public_bytes(Encoding.DER),))
        gateway.on_connection(second)
        renewed = Session(SessionConfig("client"), 0.0)
        second.on_data(renewed.data_to_send())  # HELLO: the takeover; nft update held
        await nft.entered.wait()
        # Make-before-break: the old session still delivers what it carries, then closes.
        assert not first.closed
        tun.inject(ipv4_packet("192.168.1.5", "10.8.0.2", b"reply", sport=7, dport=40000))
        gateway._on_tun_readable()  # must not raise: the new session is not configured
        renewed.receive_data(second.take(), 0.0)
        assert renewed.next_event() is None  # neither CONFIG nor DATA yet
        nft.gate.set()
        await second.wrote.wait()
        renewed.receive_data(second.take(), 0.0)
        assert isinstance(renewed.next_event(), ConfigReceived)
        event = renewed.next_event()
        assert isinstance(event, PacketsReceived)
        assert [bytes(p)[-5:] for p in event.packets] == [b"reply"]
        (peer,) = [p for p in gateway.peers.values() if p.admitted and p.successor is None]
        assert (peer.packets_out, dict(peer.drops)) == (1, {})
        for _ in range(40):  # the drain (1 s) ends with REPLACED
            if first.closed:
                break
            await asyncio.sleep(0.05)
        assert first.closed
    finally:
        await gateway.stop()


async def _configured(gateway: Gateway, der: bytes) -> tuple[OneStream, Session]:
    stream = OneStream((der,))
    gateway.on_connection(stream)
    client = Session(SessionConfig("client"), 0.0)
    stream.on_data(client.data_to_send())
    await stream.wrote.wait()
    client.receive_data(stream.take(), 0.0)
    assert isinstance(client.next_event(), ConfigReceived)
    return stream, client
