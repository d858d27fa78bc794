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
MAX_QUEUED_BATCHES = 256  # bounded: beyond this, batches are dropped (counted), never buffered


class ThreadedTunWriter:
    """``write_batch`` for a TUN, off the event loop thread for large batches."""

    def __init__(self, tun: TunDevice, *, name: str = "tun-writer") -> None:
        self.tun = tun
        self.dropped = 0
        self._queue: collections.deque[Sequence[bytes | memoryview]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int:
        if not packets:
            return 0
        with self._cond:
            if self._closed:
                return 0
            inline = (
                not self._queue and not self._busy and sum(len(p) for p in packets) <= INLINE_BYTES
            )
            if not inline:
                if len(self._queue) >= MAX_QUEUED_BATCHES:
                    self.dropped += len(packets)
                    return 0
                self._queue.append(packets)
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
