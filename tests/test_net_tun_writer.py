"""ThreadedTunWriter keeps packet order across inline and threaded writes."""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

from vpnd.net.fakes import FakeTun
from vpnd.net.tun_writer import INLINE_BYTES, MAX_QUEUED_BYTES, ThreadedTunWriter


def _pkt(n: int, size: int) -> bytes:
    body = struct.pack("!I", n).ljust(size - 20, b"x")
    return struct.pack("!BBH", 0x45, 0, 20 + len(body)) + bytes(16) + body


def test_order_is_kept_across_small_and_large_batches() -> None:
    tun = FakeTun("tw0")
    w = ThreadedTunWriter(tun)
    sent: list[bytes] = []
    for i in range(150):  # fewer batches than the queue bound: nothing may be dropped
        size = 1400 if i % 3 else 60
        batch = [_pkt(i * 100 + j, size) for j in range(1 if size == 60 else 20)]
        sent.extend(batch)
        w.write_batch(batch)
    w.close()
    assert w.dropped == 0
    assert tun.written == sent


class _SlowTun(FakeTun):
    def __init__(self) -> None:
        super().__init__("tw1")
        self.gate = threading.Event()

    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int:
        self.gate.wait(5)
        return super().write_batch(packets)


def test_queue_is_bounded_and_drops_are_counted() -> None:
    tun = _SlowTun()
    w = ThreadedTunWriter(tun)
    big = [_pkt(0, 1400)] * (INLINE_BYTES // 1400 + 1)
    batches = MAX_QUEUED_BYTES // (len(big) * 1400) + 10
    for _ in range(batches):
        w.write_batch(big)
    assert w.dropped >= 9 * len(big)
    tun.gate.set()
    w.close()
    assert len(tun.written) + w.dropped == batches * len(big)
