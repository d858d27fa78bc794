"""Silent unauthenticated connections cannot starve valid peers: real sockets on
loopback, silent clients bound to 127.0.1.N (127.0.0.0/8 is all loopback)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from test_tls_connection import (
    HOST,
    Gateway,
    Sink,
    bounded,
    dial,
    start_gateway,
    stop,
)
from test_tls_support import World, build_world

Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("pki"))


async def valid_peer_echoes(world: World, gw: Gateway) -> None:
    conn = await dial(world, gw)
    sink = Sink(want=2)
    conn.set_receiver(sink.on_data, sink.on_close)
    conn.write(b"ok")
    await sink.enough.wait()
    conn.close()
    await sink.closed


async def test_20_sources_by_16_silent_connections_leave_room_for_valid_peers(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(
            world,
            lambda conn: conn.set_receiver(conn.write, lambda _reason: None),
            max_pending=256,
            max_pending_per_source=16,
            max_pending_per_subnet=64,
            min_evict_age=3600,  # the subnet limit alone must do it
        )
        silent: list[Pair] = []
        try:
            for src in range(20):
                for _ in range(16):
                    silent.append(
                        await asyncio.open_connection(
                            HOST, gw.port, local_addr=(f"127.0.1.{src + 1}", 0)
                        )
                    )
            for _ in range(320 - 64):  # all but one /24's share are dropped at once
                assert (await gw.next_refusal()).reason == "too_many_pending"
            await valid_peer_echoes(world, gw)  # from 127.0.0.1: another /24
            await valid_peer_echoes(world, gw)
        finally:
            for _, w in silent:
                w.close()
            await stop(gw)

    await bounded(main())


async def test_a_full_table_evicts_the_oldest_silent_handshake_for_a_valid_peer(
    world: World,
) -> None:
    async def main() -> None:
        gw = await start_gateway(
            world,
            lambda conn: conn.set_receiver(conn.write, lambda _reason: None),
            max_pending=8,
            max_pending_per_source=8,
            max_pending_per_subnet=8,
            min_evict_age=0,
        )
        silent: list[Pair] = []
        try:
            # Eight silent connections from as many /24s fill the whole table.
            for n in range(8):
                silent.append(
                    await asyncio.open_connection(HOST, gw.port, local_addr=(f"127.{n + 2}.0.1", 0))
                )
            await valid_peer_echoes(world, gw)
            assert (await gw.next_refusal()).reason == "handshake_evicted"
            # The oldest one went: its socket is closed (reset) by the gateway.
            reader = silent[0][0]
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        finally:
            for _, w in silent:
                w.close()
            await stop(gw)

    await bounded(main())
