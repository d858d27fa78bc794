"""Attack matrix, protocol: DATA before HELLO from a verified peer, and one malicious
session (spoofed, non-IP and garbage traffic, then broken framing) beside an honest one
that must not notice. In-process gateway over memory pipes with fake TUN/netlink."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest
from inprocess_fixtures import DAY, REAL_NOW, World, ipv4_packet

from vpnd.proto import CloseCode, ConfigReceived, Session, SessionClosed, SessionConfig
from vpnd.proto.frames import FrameType, encode_frame
from vpnd.transport.stream import Stream

pytestmark = pytest.mark.looptime


def data_frame(*packets: bytes) -> bytes:
    body = b"\x00" + b"".join(struct.pack(">I", len(p)) + p for p in packets)
    return encode_frame(FrameType.DATA, body)


class Rogue:
    """A verified peer (valid certificate) that writes whatever bytes it likes."""

    def __init__(self, conn: Stream) -> None:
        self.conn = conn
        self.session = Session(SessionConfig(role="client"), time.time())
        self.configured = asyncio.Event()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self.received: list[bytes] = []
        conn.set_receiver(self._on_data, self._on_close)

    def _on_data(self, data: bytes) -> None:
        self.session.receive_data(data, time.time())
        while (ev := self.session.next_event()) is not None:
            if isinstance(ev, ConfigReceived):
                self.configured.set()
            elif isinstance(ev, SessionClosed) and not self.closed.done():
                self.closed.set_result((int(ev.code), ev.message))
            elif hasattr(ev, "packets"):
                self.received.extend(bytes(p) for p in ev.packets)

    def _on_close(self, _reason: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result((-1, "connection lost without CLOSE"))


async def rogue(w: World, name: str, addr: str) -> Rogue:
    leaf = w.ca.issue(
        name, addresses=[addr], not_before=REAL_NOW - DAY, not_after=REAL_NOW + 30 * DAY
    )
    cert, _key = leaf.write(w.tmp, name)
    return Rogue(w.dial_memory(cert))


async def test_data_before_hello_is_a_protocol_error_and_reaches_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    try:
        r = await rogue(w, "carol", "10.8.0.4")
        # Authenticated by TLS, but no HELLO yet: no address is owned, so no packet
        # may pass, not even one with the certificate's own source address.
        r.conn.write(data_frame(ipv4_packet("10.8.0.4", "192.168.50.10")))
        code, message = await asyncio.wait_for(r.closed, 5)
        assert code == CloseCode.PROTOCOL_ERROR, (code, message)
        assert "DATA" in message and "await_hello" in message
        assert w.gw_tun.written == []
        assert len(w.gateway.table) == 0 and not w.gateway.peers
    finally:
        await w.close()


async def test_a_malicious_session_does_not_disturb_another(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    gw = w.gateway
    assert gw is not None
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        r = await rogue(w, "carol", "10.8.0.4")
        r.conn.write(r.session.data_to_send())  # HELLO
        await asyncio.wait_for(r.configured.wait(), 5)
        carol = next(p for p in gw.peers.values() if p.identity.name == "carol")

        honest: list[bytes] = []
        hostile = [
            ipv4_packet("10.8.0.3", "10.8.0.2", b"as bob"),  # another peer's source
            ipv4_packet("10.8.0.1", "10.8.0.2", b"as gw"),  # the gateway's source
            ipv4_packet("203.0.113.5", "10.8.0.3", b"outside"),  # an outside source
            b"\x00" * 40,  # not IP at all
            b"\x45",  # one byte of "IPv4"
            b"\x60" + b"\x00" * 10,  # truncated IPv6
        ]
        for round_ in range(20):
            pkt = ipv4_packet("10.8.0.2", "10.8.0.3", f"honest {round_}".encode())
            honest.append(pkt)
            alice.tun[0].inject(pkt)
            r.session.send_packets(hostile, time.time())
            r.conn.write(r.session.data_to_send())
            await asyncio.sleep(0)
        await w.until(lambda: len(bob.tun[0].written) == len(honest), "bob gets alice's")
        assert bob.tun[0].written == honest  # all of alice's, in order, nothing else
        await w.until(lambda: carol.drops["spoofed_source"] == 3 * 20, "spoofs counted")
        assert carol.drops["not_ip"] == 3 * 20
        assert alice.tun[0].written == [] and w.gw_tun.written == []

        # Now break the framing: an oversize header, then garbage. Only carol goes.
        r.conn.write(struct.pack(">I", (FrameType.DATA << 24) | 0xFFFFFF) + b"\xde\xad")
        code, _message = await asyncio.wait_for(r.closed, 5)
        assert code == CloseCode.FRAME_TOO_LARGE
        await w.until(lambda: carol.key not in gw.peers, "carol is gone")
        last = ipv4_packet("10.8.0.2", "10.8.0.3", b"still here")
        alice.tun[0].inject(last)
        await w.until(lambda: bob.tun[0].written[-1:] == [last], "alice -> bob after")
        assert {p.identity.name for p in gw.peers.values()} == {"alice", "bob"}
        assert gw.table.lookup_raw(bytes([10, 8, 0, 4])) is None  # carol's address freed
    finally:
        await w.close()
