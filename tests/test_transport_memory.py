"""The in-memory Stream pair keeps the TlsConnection semantics the sessions rely on."""

from __future__ import annotations

import asyncio

import pytest

from vpnd.transport.memory import DELIVERY_SLICE, TURN_BUDGET, MemoryStream, memory_pipe

pytestmark = pytest.mark.looptime


class Receiver:
    """Records what one end delivers; ``ended`` resolves with the close reason."""

    def __init__(self, stream: MemoryStream, *, now: bool = True) -> None:
        self.stream = stream
        self.chunks: list[bytes] = []
        self.closes: list[Exception | None] = []
        self.got = asyncio.Event()
        self.ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        if now:
            self.attach()

    def attach(self) -> None:
        self.stream.set_receiver(self._on_data, self._on_close)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def _on_data(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.got.set()

    def _on_close(self, reason: Exception | None) -> None:
        self.closes.append(reason)
        if not self.ended.done():
            self.ended.set_result(reason)

    async def wait_for(self, n: int) -> None:
        while len(self.data) < n:
            self.got.clear()
            await self.got.wait()


async def turns(n: int) -> None:
    """Let the loop run ``n`` iterations (delivery is one call_soon per turn)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_each_end_reports_the_other_sides_chain_and_address() -> None:
    client, server = memory_pipe(
        client_chain=(b"client-leaf", b"client-ca"),
        server_chain=(b"gw-leaf",),
        client_addr=("192.0.2.7", 5000),
        server_addr=("192.0.2.1", 443),
    )
    assert client.peer_chain() == (b"gw-leaf",)
    assert server.peer_chain() == (b"client-leaf", b"client-ca")
    assert client.peername == ("192.0.2.1", 443)
    assert server.peername == ("192.0.2.7", 5000)


async def test_delivery_is_asynchronous_ordered_and_counted_as_backlog() -> None:
    client, server = memory_pipe()
    rx = Receiver(server)
    Receiver(client)
    await turns(2)
    client.write(b"one")
    client.write(memoryview(b"two"))
    assert rx.data == b""  # not from inside write(), as with a socket
    assert client.backlog_bytes == 6
    await rx.wait_for(6)
    assert rx.data == b"onetwo"
    assert client.backlog_bytes == 0


async def test_data_before_set_receiver_is_held_then_delivered() -> None:
    client, server = memory_pipe()
    Receiver(client)
    client.write(b"early")
    await turns(5)
    rx = Receiver(server, now=False)
    assert client.backlog_bytes == 5  # nobody took it yet
    rx.attach()
    assert rx.data == b""  # delivered on a later loop iteration, not inside the call
    await rx.wait_for(5)
    assert rx.data == b"early"


async def test_big_writes_arrive_in_slices_and_a_turn_is_bounded() -> None:
    client, server = memory_pipe()
    rx = Receiver(server)
    Receiver(client)
    await turns(2)
    blob = bytes(range(256)) * 1024  # 256 KiB
    client.write(blob)
    await rx.wait_for(1)
    assert len(rx.data) <= TURN_BUDGET  # one turn's worth, then other work runs
    await rx.wait_for(len(blob))
    assert rx.data == blob
    assert max(len(c) for c in rx.chunks) == DELIVERY_SLICE


async def test_close_delivers_everything_then_ends_both_sides_once() -> None:
    client, server = memory_pipe()
    rx, tx = Receiver(server), Receiver(client)
    client.write(b"last words")
    client.close()
    client.close()  # idempotent
    client.write(b"dropped")  # writes after close are dropped
    assert await rx.ended is None
    assert await tx.ended is None
    assert rx.data == b"last words"
    await turns(3)
    assert rx.closes == [None] and tx.closes == [None]
    server.write(b"to nobody")  # the ended end drops it too
    assert server.backlog_bytes == 0


async def test_abort_resets_the_other_end_and_drops_what_was_unsent() -> None:
    client, server = memory_pipe()
    rx, tx = Receiver(server), Receiver(client)
    await turns(2)
    client.write(b"never seen")
    client.abort()
    reason = await rx.ended
    assert isinstance(reason, ConnectionResetError)
    assert await tx.ended is None  # our own abort is an orderly end for us
    assert rx.data == b""
    client.abort()
    client.close()
    await turns(3)
    assert len(rx.closes) == 1 and len(tx.closes) == 1


async def test_an_end_before_set_receiver_is_reported_after_it() -> None:
    client, server = memory_pipe()
    client.set_receiver(lambda _d: None, lambda _e: None)
    client.abort()
    await turns(3)
    rx = Receiver(server)
    assert isinstance(await rx.ended, ConnectionResetError)


async def test_pause_delivery_holds_the_rest_until_resume() -> None:
    client, server = memory_pipe()
    Receiver(client)
    got: list[bytes] = []

    def on_data(chunk: bytes) -> None:
        got.append(chunk)
        server.pause_delivery()  # a per-turn budget spent after one slice

    server.set_receiver(on_data, lambda _e: None)
    client.write(bytes(3 * DELIVERY_SLICE))
    await turns(10)
    assert len(got) == 1
    assert client.backlog_bytes == 2 * DELIVERY_SLICE
    server.resume_delivery()
    await turns(2)
    assert len(got) == 2


async def test_a_stalled_reader_grows_the_writers_backlog_until_it_reads_again() -> None:
    client, server = memory_pipe()
    rx = Receiver(server)
    Receiver(client)
    server.pause_reading()
    client.write(bytes(100_000))
    await turns(10)
    assert rx.data == b""
    assert client.backlog_bytes == 100_000
    server.resume_reading()
    await rx.wait_for(100_000)
    assert client.backlog_bytes == 0


async def test_over_its_backlog_cap_an_end_stops_reading_and_resumes_below_it() -> None:
    # The gateway end echoes everything; the client never reads the echoes.
    client, server = memory_pipe(server_max_backlog=10_000)
    Receiver(client)
    server.set_receiver(server.write, lambda _e: None)
    client.pause_reading()
    client.write(bytes(100_000))
    await turns(20)
    # It read one slice past the cap and then stopped: the rest waits at the client.
    assert 10_000 < server.backlog_bytes <= 10_000 + DELIVERY_SLICE
    assert client.backlog_bytes == 100_000 - server.backlog_bytes
    client.resume_reading()
    echoed = Receiver(client, now=False)
    echoed.attach()
    await echoed.wait_for(100_000)
    assert client.backlog_bytes == 0 and server.backlog_bytes == 0


async def test_activity_is_reported_for_deliveries_and_ends() -> None:
    seen = asyncio.Event()
    client, server = memory_pipe(on_activity=seen.set)
    Receiver(client)
    Receiver(server)
    client.write(b"x")
    await seen.wait()
    seen.clear()
    server.abort()
    await seen.wait()
