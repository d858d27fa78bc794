"""Fair sharing between peers: a flood of tiny packets (or of GSO super-packets) from one
peer is served in per-turn budgets, so another peer's packet is not queued behind it.

Structural, not timed: the order in which packets reach the gateway's TUN proves it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from inprocess_fixtures import World, ipv4_packet, tso_packet

from vpnd.gateway.shell import Peer
from vpnd.transport.memory import MemoryStream

pytestmark = pytest.mark.looptime


def _peer(w: World, name: str) -> Peer:
    assert w.gateway is not None
    return next(p for p in w.gateway.peers.values() if p.identity.name == name)


async def test_one_packet_from_b_is_not_queued_behind_a_flood_from_a(tmp_path: Path) -> None:
    budget = 64
    flood = 20000

    w = World(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    w.gateway.settings = dataclasses.replace(w.gateway.settings, peer_turn_packets=budget)
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        a_gw, b_gw = _peer(w, "alice").driver.conn, _peer(w, "bob").driver.conn
        assert isinstance(a_gw, MemoryStream) and isinstance(b_gw, MemoryStream)
        a_drv, b_drv = alice.client._driver, bob.client._driver
        assert a_drv is not None and b_drv is not None
        # Hold both at the gateway while the traffic piles up on the way to it.
        a_gw.pause_reading()
        b_gw.pause_reading()
        tiny = [
            ipv4_packet("10.8.0.2", "192.168.50.10", b"", sport=1000 + i % 50) for i in range(flood)
        ]
        for i in range(0, flood, 64):  # frames as a client fills them: a TUN batch each
            a_drv.session.send_packets(tiny[i : i + 64], 0.0)
        a_drv.flush()
        probe = ipv4_packet("10.8.0.3", "192.168.50.10", b"bob!")
        b_drv.session.send_packets([probe], 0.0)
        b_drv.flush()
        assert b_drv.conn.backlog_bytes > 0  # bob's packet waits for the gateway to read
        # Precondition: the gateway can take far more than a budget of alice's at once
        # (a loop turn delivers up to 64 KiB, as asyncio reads up to 256 KiB).
        assert a_drv.conn.backlog_bytes > 64 * 1024, a_drv.conn.backlog_bytes
        a_gw.resume_reading()  # alice's socket is ready first ...
        b_gw.resume_reading()  # ... bob's right after, in the same loop turn
        await w.until(lambda: probe in w.gw_tun.written, "bob's packet delivered")
        before = w.gw_tun.written.index(probe)
        # Without the budget, alice's whole first read (about 2,000 packets here) went
        # out first. With it, bob's packet is served right after alice's first turn.
        assert before <= 2 * budget, before
        await w.until(lambda: len(w.gw_tun.written) == flood + 1, "alice's flood drained")
        assert _peer(w, "alice").turn_yields >= flood // budget - 1  # split in turns
    finally:
        await w.close()


async def test_the_budget_is_charged_per_gso_segment_not_per_frame(tmp_path: Path) -> None:
    w = World(tmp_path, offload=True)
    await w.start_gateway()
    assert w.gateway is not None
    w.gateway.settings = dataclasses.replace(w.gateway.settings, peer_turn_packets=64)
    try:
        fast = w.start_client("alice", addr="10.8.0.2", offload=True)
        await asyncio.wait_for(fast.client.connected.wait(), 5)
        drv = fast.client._driver
        assert drv is not None
        payload = bytes(20000)  # 15 segments at mss 1360
        frames = [tso_packet("10.8.0.2", "192.168.50.10", payload) for _ in range(10)]
        drv.session.send_packets(frames, 0.0, vnet=True)
        drv.flush()
        await w.until(lambda: len(w.gw_tun.written) == 10, "super-packets forwarded")
        peer = _peer(w, "alice")
        # 150 segments against a budget of 64: charged per frame (10) it never yields.
        assert peer.turn_yields >= 1
        assert peer.turn_yields + peer.turn_packets / 64 >= 150 // 64 - 1
        # A tiny gso_size is refused outright: no 20,000-segment fan-out.
        tiny = bytearray(tso_packet("10.8.0.2", "192.168.50.10", payload))
        tiny[4:6] = (1).to_bytes(2, "little")
        drv.session.send_packets([bytes(tiny)], 0.0, vnet=True)
        drv.flush()
        await w.until(lambda: peer.drops["vnet_gso_size_small"] == 1, "tiny gso_size dropped")
        assert len(w.gw_tun.written) == 10
    finally:
        await w.close()
