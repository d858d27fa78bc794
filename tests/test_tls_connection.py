"""connect()/serve()/TlsConnection over real TCP on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from test_tls_support import GATEWAY_NAME, World, build_world

from vpnd.transport.alerts import describe_alert
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.tlsctx import ALPN
from vpnd.transport.tlsengine import TlsAlertReceived, TlsHandshakeError

T = TypeVar("T")
HOST = "127.0.0.1"
# A safety net so a bug cannot hang the suite; no test asserts on elapsed time.
BOUND = 30.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("pki"))


async def bounded(coro: Coroutine[Any, Any, T]) -> T:
    """``await coro``, bounded so a bug cannot hang the suite."""
    async with asyncio.timeout(BOUND):
        return await coro


class Sink:
    """Collects what a TlsConnection delivers."""

    def __init__(self, want: int = 0) -> None:
        self.data = bytearray()
        self.want = want
        self.enough = asyncio.Event()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want:
            self.enough.set()

    def on_close(self, reason: Exception | None) -> None:
        assert not self.closed.done(), "on_close called twice"
        self.closed.set_result(reason)


@dataclass
class Gateway:
    server: asyncio.Server
    port: int
    accepted: list[TlsConnection] = field(default_factory=list)
    refused: list[tuple[tuple[str, int] | None, TlsHandshakeError]] = field(default_factory=list)
    refusals: asyncio.Queue[TlsHandshakeError] = field(default_factory=asyncio.Queue)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a connection was accepted."""

    async def next_refusal(self) -> TlsHandshakeError:
        return await self.refusals.get()


async def start_gateway(
    world: World,
    on_connection: Callable[[TlsConnection], Awaitable[None] | None] | None = None,
    *,
    handshake_timeout: float = 10.0,
    **limits: int,
) -> Gateway:
    gw: Gateway

    def accepted(conn: TlsConnection) -> Awaitable[None] | None:
        gw.accepted.append(conn)
        gw.arrived.set()
        return on_connection(conn) if on_connection else None

    def refused(peer: tuple[str, int] | None, err: TlsHandshakeError) -> None:
        gw.refused.append((peer, err))
        gw.refusals.put_nowait(err)

    server = await serve(
        HOST,
        0,
        world.server_ctx(),
        accepted,
        handshake_timeout=handshake_timeout,
        on_refused=refused,
        **limits,
    )
    port = server.sockets[0].getsockname()[1]
    gw = Gateway(server, port)
    return gw


async def stop(gw: Gateway) -> None:
    for conn in gw.accepted:
        conn.abort()
    gw.server.close()
    await gw.server.wait_closed()


async def dial(world: World, gw: Gateway, client: str = "alice", **kw: Any) -> TlsConnection:
    ctx = kw.pop("ctx", None) or world.client_ctx(client)
    hostname = kw.pop("server_hostname", GATEWAY_NAME)
    return await connect(HOST, gw.port, ctx, server_hostname=hostname, timeout=BOUND)


# -- the good path -----------------------------------------------------------------


async def test_handshake_echo_and_orderly_close(world: World) -> None:
    async def main() -> None:
        server_sink: Sink | None = None

        def on_connection(conn: TlsConnection) -> None:
            nonlocal server_sink
            sink = server_sink = Sink()

            def echo(data: bytes) -> None:
                sink.on_data(data)
                conn.write(data.upper())

            conn.set_receiver(echo, sink.on_close)

        gw = await start_gateway(world, on_connection)
        try:
            conn = await dial(world, gw)
            assert conn.engine.alpn == ALPN
            assert conn.engine.version == "TLSv1.3"
            assert conn.peername == (HOST, gw.port)
            sink = Sink(want=5)
            conn.set_receiver(sink.on_data, sink.on_close)
            conn.write(b"hello")
            await sink.enough.wait()
            assert bytes(sink.data) == b"HELLO"
            assert len(gw.accepted) == 1
            assert gw.accepted[0].peername is not None
            assert server_sink is not None
            conn.close()
            conn.close()  # idempotent
            assert await server_sink.closed is None  # close_notify: orderly
            assert await sink.closed is None
            assert gw.refused == []
        finally:
            await stop(gw)

    await bounded(main())


async def test_one_megabyte_with_backpressure_arrives_intact(world: World) -> None:
    payload = hashlib.shake_256(b"one megabyte").digest(1 << 20)

    async def main() -> None:
        server_sink: Sink | None = None
        ready = asyncio.Event()

        def on_connection(conn: TlsConnection) -> None:
            nonlocal server_sink
            server_sink = Sink(want=len(payload))
            conn.set_receiver(server_sink.on_data, server_sink.on_close)
            ready.set()

        gw = await start_gateway(world, on_connection)
        try:
            conn = await dial(world, gw)
            conn.set_receiver(Sink().on_data, Sink().on_close)
            view = memoryview(payload)
            for start in range(0, len(payload), 16_384):
                conn.write(view[start : start + 16_384])
                if conn.write_buffer_size > 65_536:
                    await conn.wait_writable()
            await ready.wait()
            assert server_sink is not None
            await server_sink.enough.wait()
            assert bytes(server_sink.data) == payload
        finally:
            await stop(gw)

    await bounded(main())


async def test_data_sent_before_the_server_sets_a_receiver_is_kept(world: World) -> None:
    async def main() -> None:
        sink: Sink | None = None
        release, ready = asyncio.Event(), asyncio.Event()

        async def on_connection(conn: TlsConnection) -> None:
            nonlocal sink
            await release.wait()  # e.g. the daemon still verifying the identity
            sink = Sink(want=12)
            conn.set_receiver(sink.on_data, sink.on_close)
            ready.set()

        gw = await start_gateway(world, on_connection)
        try:
            conn = await dial(world, gw)
            conn.write(b"early")
            conn.write(b" bytes")
            conn.close()  # the close must queue behind the data, not overtake it
            await gw.arrived.wait()
            release.set()
            await ready.wait()
            assert sink is not None
            assert await sink.closed is None
            assert bytes(sink.data) == b"early bytes"
        finally:
            await stop(gw)

    await bounded(main())


async def test_wait_writable_blocks_while_the_peer_does_not_read(world: World) -> None:
    async def main() -> None:
        server_sink = Sink()

        def on_connection(conn: TlsConnection) -> None:
            conn.set_receiver(server_sink.on_data, server_sink.on_close)
            conn.pause_reading()

        gw = await start_gateway(world, on_connection)
        try:
            conn = await dial(world, gw)
            conn.set_receiver(Sink().on_data, Sink().on_close)
            await gw.arrived.wait()
            chunk = bytes(65_536)
            sent = 0
            for _ in range(4096):  # kernel buffers fill long before 256 MB
                conn.write(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)
                if conn.write_buffer_size > 1 << 20:
                    break
            assert conn.write_buffer_size > 1 << 20
            waiter = asyncio.ensure_future(conn.wait_writable())
            for _ in range(10):
                await asyncio.sleep(0)
            assert not waiter.done()  # the reader is paused: no drain can happen
            server_sink.want = sent
            gw.accepted[0].resume_reading()
            await waiter
            await server_sink.enough.wait()
            assert len(server_sink.data) == sent
        finally:
            await stop(gw)

    await bounded(main())


async def test_tcp_end_without_close_notify_is_reported_as_a_reset(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(world, lambda conn: conn.abort())
        try:
            conn = await dial(world, gw)
            sink = Sink()
            conn.set_receiver(sink.on_data, sink.on_close)
            reason = await sink.closed
            assert isinstance(reason, ConnectionResetError)
        finally:
            await stop(gw)

    await bounded(main())


# -- refusals by the gateway: what the client sees ---------------------------------


@pytest.mark.parametrize(
    ("client", "alert", "words"),
    [
        ("eve", "unknown_ca", "does not trust the CA"),
        ("bob", "certificate_revoked", "revoked"),
        ("carol", "certificate_expired", "expired"),
        ("srv", "unsupported_certificate", "not a client certificate"),
    ],
)
async def test_refused_client_sees_the_alert(
    world: World, client: str, alert: str, words: str
) -> None:
    async def main() -> None:
        gw = await start_gateway(world)
        try:
            # TLS 1.3: connect() returns; the refusal is the first thing read.
            conn = await dial(world, gw, client)
            sink = Sink()
            conn.set_receiver(sink.on_data, sink.on_close)
            reason = await sink.closed
            assert isinstance(reason, TlsAlertReceived)
            assert reason.alert == alert
            assert words in describe_alert(reason.alert)
            assert words in str(reason)
            refusal = await gw.next_refusal()
            assert refusal.reason == alert
            assert refusal.sent_alert and not refusal.by_peer
            assert gw.accepted == []
        finally:
            await stop(gw)

    await bounded(main())


async def test_client_without_certificate_sees_certificate_required(world: World) -> None:
    async def main() -> None:
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.load_verify_locations(cafile=world.ca_file)
        bare.set_alpn_protocols([ALPN])
        gw = await start_gateway(world)
        try:
            conn = await dial(world, gw, ctx=bare)
            sink = Sink()
            conn.set_receiver(sink.on_data, sink.on_close)
            reason = await sink.closed
            assert isinstance(reason, TlsAlertReceived)
            assert reason.alert == "certificate_required"
            assert (await gw.next_refusal()).reason == "certificate_required"
        finally:
            await stop(gw)

    await bounded(main())


async def test_tls12_client_is_refused_during_connect(world: World) -> None:
    async def main() -> None:
        old = world.client_ctx()
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
        gw = await start_gateway(world)
        try:
            with pytest.raises(TlsAlertReceived) as err:
                await dial(world, gw, ctx=old)
            assert err.value.alert == "protocol_version"
            assert (await gw.next_refusal()).reason == "protocol_version"
        finally:
            await stop(gw)

    await bounded(main())


async def test_client_not_offering_vpnd_alpn_is_closed(world: World) -> None:
    async def main() -> None:
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        plain.load_verify_locations(cafile=world.ca_file)
        alice = world.clients["alice"]
        plain.load_cert_chain(alice.cert, alice.key)
        gw = await start_gateway(world)
        try:
            # asyncio's own TLS client, offering no ALPN at all
            reader, writer = await asyncio.open_connection(
                HOST, gw.port, ssl=plain, server_hostname=GATEWAY_NAME
            )
            assert await reader.read() == b""  # close_notify, no data
            writer.close()
            refusal = await gw.next_refusal()
            assert refusal.reason == "no_application_protocol"
            assert gw.accepted == []
        finally:
            await stop(gw)

    await bounded(main())


# -- refusals by the client ---------------------------------------------------------


async def test_client_refuses_gateway_with_wrong_name(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(world)
        try:
            with pytest.raises(TlsHandshakeError) as err:
                await dial(world, gw, server_hostname="evil.vpn.test")
            assert err.value.reason == "bad_certificate"
            assert "evil.vpn.test" in err.value.detail
            refusal = await gw.next_refusal()  # the gateway learns why from our alert
            assert refusal.by_peer
            assert refusal.reason == "bad_certificate"
        finally:
            await stop(gw)

    await bounded(main())


async def test_connect_to_a_silent_server_times_out(world: World) -> None:
    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []

        def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)  # accept TCP, never answer the ClientHello

        server = await asyncio.start_server(silent, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(TimeoutError, match="no TLS session"):
                await connect(
                    HOST, port, world.client_ctx(), server_hostname=GATEWAY_NAME, timeout=0.2
                )
        finally:
            for writer in writers:
                writer.close()
            server.close()
            await server.wait_closed()

    await bounded(main())


async def test_connect_to_a_closed_port_is_an_oserror(world: World) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await connect(HOST, port, world.client_ctx(), server_hostname=GATEWAY_NAME, timeout=5)

    await bounded(main())


# -- hostile clients ---------------------------------------------------------------


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def test_silent_client_is_closed_at_the_handshake_deadline(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(world, handshake_timeout=0.2)
        try:
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            assert await read_until_closed(reader) == b""  # closed by the server
            writer.close()
            refusal = await gw.next_refusal()
            assert refusal.reason == "handshake_timeout"
            assert not refusal.sent_alert
        finally:
            await stop(gw)

    await bounded(main())


async def test_garbage_is_closed_and_the_next_client_is_served(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(
            world, lambda conn: conn.set_receiver(conn.write, lambda _reason: None)
        )
        try:
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(hashlib.shake_256(b"garbage").digest(4096))
            await read_until_closed(reader)
            writer.close()
            assert (await gw.next_refusal()).reason in {"protocol_version", "decode_error"}
            conn = await dial(world, gw)
            sink = Sink(want=4)
            conn.set_receiver(sink.on_data, sink.on_close)
            conn.write(b"echo")
            await sink.enough.wait()
            assert bytes(sink.data) == b"echo"
            conn.close()
            await sink.closed
        finally:
            await stop(gw)

    await bounded(main())


async def test_refused_handshakes_leave_no_state(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(world, handshake_timeout=0.2)
        try:
            # garbage, silence, a revoked client, a client hanging up mid-handshake
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(b"\x00" * 100)
            await read_until_closed(reader)
            writer.close()
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            await read_until_closed(reader)
            writer.close()
            conn = await dial(world, gw, "bob")
            sink = Sink()
            conn.set_receiver(sink.on_data, sink.on_close)
            await sink.closed
            del conn
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.close()
            for _ in range(4):
                await gw.next_refusal()
            reasons = sorted(err.reason for _, err in gw.refused)
            assert reasons == [
                "certificate_revoked",
                "connection_lost",
                "handshake_timeout",
                "protocol_version",
            ]
            assert gw.accepted == []
            # asyncio detaches a transport a loop iteration or two after closing it
            for _ in range(100):
                if getattr(gw.server, "_active_count", 0) == 0:
                    break
                await asyncio.sleep(0)
            assert getattr(gw.server, "_active_count", 0) == 0
            gc.collect()
            assert [o for o in gc.get_objects() if isinstance(o, TlsConnection)] == []
        finally:
            await stop(gw)

    await bounded(main())


async def test_pending_handshakes_are_bounded_per_source_and_in_total(world: World) -> None:
    async def main() -> None:
        gw = await start_gateway(
            world,
            lambda conn: conn.set_receiver(conn.write, lambda _reason: None),
            max_pending=3,
            max_pending_per_source=2,
            min_evict_age=3600,  # no early eviction here: see test_tls_slots_loopback.py
        )
        silent = []
        try:
            # Two silent connections from 127.0.0.1 take its whole per-source allowance.
            for _ in range(2):
                silent.append(await asyncio.open_connection(HOST, gw.port))
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            assert await read_until_closed(reader) == b""  # the third is dropped at once
            writer.close()
            refusal = await gw.next_refusal()
            assert refusal.reason == "too_many_pending"
            # A different source (127.0.0.2) still gets in: the limit is per address.
            other, w2 = await asyncio.open_connection(HOST, gw.port, local_addr=("127.0.0.2", 0))
            silent.append((other, w2))
            # ...until the total (3) is reached, whatever the source.
            r4, w4 = await asyncio.open_connection(HOST, gw.port, local_addr=("127.0.0.3", 0))
            assert await read_until_closed(r4) == b""
            w4.close()
            assert (await gw.next_refusal()).reason == "too_many_pending"
            # Hanging up frees the slots: a real client completes its handshake.
            for _, w in silent:
                w.close()
            for _ in range(3):
                await gw.next_refusal()  # the three hang-ups, reported as connection_lost
            conn = await dial(world, gw)
            sink = Sink(want=2)
            conn.set_receiver(sink.on_data, sink.on_close)
            conn.write(b"ok")
            await sink.enough.wait()
            conn.close()
            await sink.closed
        finally:
            for _, w in silent:
                w.close()
            await stop(gw)

    await bounded(main())


async def test_a_peer_that_never_reads_stops_being_read_once_the_backlog_cap_is_hit(
    world: World,
) -> None:
    cap = 256 * 1024
    gw_conns: list[TlsConnection] = []

    def on_connection(conn: TlsConnection) -> None:
        gw_conns.append(conn)
        conn.set_receiver(conn.write, lambda _reason: None)  # echo: like PING -> PONG

    async def main() -> None:
        gw = await start_gateway(world, on_connection, max_write_backlog=cap)
        try:
            conn = await dial(world, gw)
            conn.set_receiver(lambda _d: None, lambda _r: None)
            conn.pause_reading()  # never reads the echoes
            await gw.arrived.wait()
            chunk = bytes(65_536)
            worst = 0
            for _ in range(2048):  # up to 128 MB: far beyond what the kernel buffers hold
                conn.write(chunk)
                await asyncio.sleep(0)  # one loop turn: the gateway reads what arrived
                worst = max(worst, gw_conns[0].write_buffer_size)
                if conn.write_buffer_size > 8 << 20:
                    break
            # The gateway stopped reading, so what we wrote piles up on our side ...
            assert conn.write_buffer_size > 8 << 20, conn.write_buffer_size
            # ... while its own queue toward us stayed within one read of its cap.
            assert worst < cap + 512 * 1024, worst
        finally:
            await stop(gw)

    await bounded(main())
