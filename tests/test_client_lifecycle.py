"""Client lifecycle in one process: stop() at any stage, its log, and stepped wall clocks.

In-memory streams and fake loop time (the World of inprocess_fixtures); a handshake
that never finishes is real TLS on 127.0.0.1. Every ``wait_for`` here only bounds a
hang; what is asserted is order and outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from inprocess_fixtures import DAY, REAL_NOW, World

from vpnd.client.runner import Client, Connector
from vpnd.transport.connection import connect
from vpnd.transport.stream import Stream
from vpnd.transport.tlsctx import client_context

HANG_GUARD = 10.0  # only against a hang; stop() is expected back long before

pytestmark = pytest.mark.looptime


class SteppedWall:
    """A wall clock that can be stepped like NTP/an admin would: real time + offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def bare_client(w: World, dial: Connector, *, initial_delay: float = 0.05) -> Client:
    """A client of ``w``'s CA whose connector is ``dial`` (no gateway needed)."""
    return w.new_client(dial, initial_delay=initial_delay, max_delay=initial_delay)


async def test_stop_cancels_a_hung_connect(tmp_path: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def dial() -> Stream:
        started.set()
        try:
            await asyncio.Event().wait()  # a SYN into the void
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    client = bare_client(World(tmp_path), dial)
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(started.wait(), HANG_GUARD)
    client.stop()
    await asyncio.wait_for(task, HANG_GUARD)
    assert cancelled.is_set()  # stop cancelled the connect; no daemon cancel needed
    assert client.tun is None


@pytest.mark.looptime(False)  # a real socket: its I/O takes real time
async def test_stop_cancels_a_tls_handshake_that_never_finishes(tmp_path: Path) -> None:
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts TCP, never answers the ClientHello
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = World(tmp_path)
    leaf = w.ca.issue("alice", addresses=["10.8.0.2"],
                      not_before=REAL_NOW - DAY, not_after=REAL_NOW + DAY)  # fmt: skip
    cert, key = leaf.write(tmp_path, "alice")

    async def dial() -> Stream:
        ctx = client_context(ca=w.ca_path, cert=cert, key=key)
        return await connect("127.0.0.1", port, ctx, server_hostname="gw.test", timeout=300)

    client = bare_client(w, dial)
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(accepted.wait(), HANG_GUARD)
        client.stop()
        await asyncio.wait_for(task, HANG_GUARD)  # not after the 300 s TLS timeout
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert client.last_outcome is not None and not client.last_outcome.established


async def test_stop_ends_a_backoff_wait(tmp_path: Path) -> None:
    attempts = 0

    async def dial() -> Stream:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError("refused")

    w = World(tmp_path)
    client = bare_client(w, dial, initial_delay=3600)
    task = asyncio.create_task(client.run())
    await w.until(lambda: client.last_outcome is not None, "the first attempt failed")
    client.stop()  # now waiting out an hour of backoff
    await asyncio.wait_for(task, HANG_GUARD)
    assert attempts == 1


async def test_own_stop_logs_stopping_not_gateway_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), HANG_GUARD)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vpnd.client"):
            alice.client.stop()
            await asyncio.wait_for(alice.task, HANG_GUARD)
    finally:
        await w.close()

    lines = [r.getMessage() for r in caplog.records if r.name == "vpnd.client"]
    assert any(line.startswith("stopping:") for line in lines), lines
    assert any(line.startswith("stopped: closed the session") for line in lines), lines
    assert not any("shutting down" in line for line in lines), lines
    assert "tunnel down: tun0 removed" in lines


@pytest.mark.parametrize(("gw_step", "cl_step"), [(-120.0, 120.0), (120.0, -120.0)])
async def test_wall_steps_do_not_end_a_tunnel_and_expiry_still_cuts(
    tmp_path: Path, gw_step: float, cl_step: float
) -> None:
    gw_wall, cl_wall = SteppedWall(), SteppedWall()
    w = World(tmp_path)
    await w.start_gateway(clock=gw_wall, keepalive=(0.25, 4.0))
    try:
        alice = w.start_client("alice", clock=cl_wall)  # cert valid for 30 days
        await asyncio.wait_for(alice.client.connected.wait(), HANG_GUARD)
        assert w.gateway is not None
        driver = alice.client._driver
        assert driver is not None
        for gw_off, cl_off in ((gw_step, cl_step), (-gw_step, -cl_step)):
            gw_wall.offset, cl_wall.offset = gw_off, cl_off
            # Ten keepalive frames later (120 s steps dwarf the 4 s timeout) ...
            seen = driver.session.counters.frames_in
            await w.until(
                lambda seen=seen: driver.session.counters.frames_in >= seen + 10,  # type: ignore[misc]
                "keepalives keep flowing", timeout=HANG_GUARD,
            )  # fmt: skip
            # ... the same session is up: no timeout, no reconnect, on either side.
            assert alice.client._driver is driver
            assert alice.client.last_outcome is None
            assert w.gateway.handshakes["accepted"] == 1
        # Certificate validity is still judged by the wall clock: the gateway cuts
        # the session as soon as its clock passes the client's notAfter.
        gw_wall.offset = 31 * 86400.0
        await w.until(lambda: alice.client.last_outcome is not None, "expiry cut",
                    timeout=HANG_GUARD)  # fmt: skip
        assert alice.client.last_outcome is not None
        assert "your certificate expired at" in alice.client.last_outcome.message
    finally:
        await w.close()


def test_the_client_unit_reloads_with_sighup() -> None:
    unit = Path(__file__).parent.parent / "config" / "systemd" / "vpnd-client.service"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text().splitlines()
