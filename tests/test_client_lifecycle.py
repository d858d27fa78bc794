"""Client lifecycle in one process: stop() at any stage, its log, and stepped wall clocks.

Real TLS on 127.0.0.1 with the kernel edges faked (the World of test_tunnel_inprocess).
Every ``wait_for`` here only bounds a hang; what is asserted is order and outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from test_tunnel_inprocess import DAY, REAL_NOW, World, run, until

from vpnd.client.runner import Client, ClientSettings
from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.pki import load_trust_store
from vpnd.transport.connection import TlsConnection, connect
from vpnd.transport.tlsctx import client_context

HANG_GUARD = 10.0  # only against a hang; stop() is expected back long before


class SteppedWall:
    """A wall clock that can be stepped like NTP/an admin would: real time + offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def bare_client(tmp: Path, dial: object, *, initial_delay: float = 0.05) -> Client:
    w = World(tmp)  # for its CA files only
    return Client(
        ClientSettings(
            server="127.0.0.1:9", server_name="gw.test", tun_name="tun0",
            initial_delay=initial_delay, max_delay=initial_delay,
        ),
        connect=dial,  # type: ignore[arg-type]
        tun_factory=lambda name, offload: FakeTun(name),
        net=FakeNetConfigurator(),
        trust=load_trust_store(w.ca_path, None, crl_required=False),
    )  # fmt: skip


def test_stop_cancels_a_hung_connect(tmp_path: Path) -> None:
    async def scenario() -> None:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def dial() -> TlsConnection:
            started.set()
            try:
                await asyncio.Event().wait()  # a SYN into the void
            except asyncio.CancelledError:
                cancelled.set()
                raise
            raise AssertionError("unreachable")

        client = bare_client(tmp_path, dial)
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(started.wait(), HANG_GUARD)
        client.stop()
        await asyncio.wait_for(task, HANG_GUARD)
        assert cancelled.is_set()  # stop cancelled the connect; no daemon cancel needed
        assert client.tun is None

    run(scenario())


def test_stop_cancels_a_tls_handshake_that_never_finishes(tmp_path: Path) -> None:
    async def scenario() -> None:
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

        async def dial() -> TlsConnection:
            ctx = client_context(ca=w.ca_path, cert=cert, key=key)
            return await connect("127.0.0.1", port, ctx, server_hostname="gw.test", timeout=300)

        client = bare_client(tmp_path, dial)
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

    run(scenario())


def test_stop_ends_a_backoff_wait(tmp_path: Path) -> None:
    async def scenario() -> None:
        attempts = 0

        async def dial() -> TlsConnection:
            nonlocal attempts
            attempts += 1
            raise ConnectionRefusedError("refused")

        client = bare_client(tmp_path, dial, initial_delay=3600)
        task = asyncio.create_task(client.run())
        await until(lambda: client.last_outcome is not None, "the first attempt failed")
        client.stop()  # now waiting out an hour of backoff
        await asyncio.wait_for(task, HANG_GUARD)
        assert attempts == 1

    run(scenario())


def test_own_stop_logs_stopping_not_gateway_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
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

    run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "vpnd.client"]
    assert any(line.startswith("stopping:") for line in lines), lines
    assert any(line.startswith("stopped: closed the session") for line in lines), lines
    assert not any("shutting down" in line for line in lines), lines
    assert "tunnel down: tun0 removed" in lines


@pytest.mark.parametrize(("gw_step", "cl_step"), [(-120.0, 120.0), (120.0, -120.0)])
def test_wall_steps_do_not_end_a_tunnel_and_expiry_still_cuts(
    tmp_path: Path, gw_step: float, cl_step: float
) -> None:
    async def scenario() -> None:
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
                await until(
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
            await until(lambda: alice.client.last_outcome is not None, "expiry cut",
                        timeout=HANG_GUARD)  # fmt: skip
            assert alice.client.last_outcome is not None
            assert "your certificate expired at" in alice.client.last_outcome.message
        finally:
            await w.close()

    run(scenario())


def test_the_client_unit_reloads_with_sighup() -> None:
    unit = Path(__file__).parent.parent / "config" / "systemd" / "vpnd-client.service"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text().splitlines()
