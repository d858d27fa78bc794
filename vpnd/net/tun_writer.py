"""Writes to a TUN from a second thread, so the kernel's share of the work overlaps ours.

A TUN write is where the receiving kernel does its work: it segments a GSO
super-packet and runs TCP receive for the local socket inside the ``write()`` call
(a quarter of the gateway's CPU under a bulk transfer). ``os.write`` releases the GIL,
so a writer thread lets that kernel work run on the other core while the event loop
decrypts the next chunk. Small batches (pings, ACKs) are written inline when nothing
is queued, so the hand-off never adds latency where latency matters. Order is kept:
inline writes happen only while the queue is empty and the writer idle.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence

from vpnd.net.tun import TunDevice

log = logging.getLogger("vpnd.net")

INLINE_BYTES = 16 * 1024
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # bounded: beyond this, drop (counted), like a full NIC queue


class ThreadedTunWriter:
    """``write_batch`` for a TUN, off the event loop thread for large batches."""

    def __init__(self, tun: TunDevice, *, name: str = "tun-writer") -> None:
        self.tun = tun
        self.dropped = 0
        self._queue: collections.deque[Sequence[bytes | memoryview]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._queued_bytes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int:
        if not packets:
            return 0
        size = sum(len(p) for p in packets)
        with self._cond:
            if self._closed:
                return 0
            inline = not self._queue and not self._busy and size <= INLINE_BYTES
            if not inline:
                if self._queued_bytes + size > MAX_QUEUED_BYTES:
                    self.dropped += len(packets)
                    return 0
                self._queue.append(packets)
                self._queued_bytes += size
                self._cond.notify()
        if inline:
            return self.tun.write_batch(packets)
        return len(packets)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = self._queue.popleft()
                self._queued_bytes -= sum(len(p) for p in batch)
                self._busy = True
            try:
                self.tun.write_batch(batch)
            except Exception:  # a closed TUN at shutdown; never kill the thread silently
                log.exception("TUN writer failed")
            finally:
                with self._cond:
                    self._busy = False

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, then stop the thread (bounded wait)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
