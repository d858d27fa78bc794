"""A fake control handler and a control server running on its own loop thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from vpnd.control.protocol import ControlError, ErrorCode
from vpnd.control.results import (
    CertSummary,
    CrlSummary,
    KickResult,
    PeerInfo,
    ReloadReport,
    RenewHintResult,
    RenewResult,
    StatusInfo,
)
from vpnd.control.server import ControlServer

T = TypeVar("T")

CERT = CertSummary("gw1", "1a2b", "ab" * 32, "2027-06-01T12:00:00+00:00", 365)
CA = CertSummary("test-ca", "77", "cd" * 32, "2030-01-01T00:00:00+00:00", 1300)
STATUS = StatusInfo(
    role="gateway",
    version="0.1.0",
    pid=42,
    uptime_s=93784.0,
    listen="0.0.0.0:4443",
    tun="vpn0",
    sessions=2,
    handshakes={"accepted": 5, "refused_revoked": 1},
    drops={"spoofed_source": 3},
    cert=CERT,
    ca=CA,
    crl=CrlSummary(4, "2026-06-08T12:00:00+00:00", 604800.0, stale=False),
    policy_rules=3,
)


def peer(name: str, address: str, **kw: Any) -> PeerInfo:
    fields: dict[str, Any] = {
        "name": name,
        "serial": "c0ffee",
        "fingerprint": "ef" * 32,
        "addresses": [address],
        "groups": ["dev"],
        "remote": "192.0.2.1:50000",
        "connected_since": "2026-06-01T12:00:00+00:00",
        "bytes_in": 1000,
        "bytes_out": 3 * 1024 * 1024,
        "packets_in": 10,
        "packets_out": 20,
        "drops": {},
        "cert_not_after": "2026-07-01T12:00:00+00:00",
        "cert_days_left": 30,
    }
    fields.update(kw)
    return PeerInfo(**fields)


class FakeHandler:
    """Answers from fixed data and records what it was asked."""

    def __init__(self) -> None:
        self.status_info = STATUS
        self.peer_list = [peer("alice", "10.77.0.2"), peer("bob", "10.77.0.3")]
        self.kicked: list[tuple[str, str]] = []
        self.hinted: list[tuple[str, str]] = []
        self.reload_report = ReloadReport(["policy: 3 rules -> 2 rules"], ["bob"], [])
        self.reload_error: Exception | None = None
        self.status_error: Exception | None = None
        self.reload_entered = threading.Event()
        self.reload_gate: threading.Event | None = None

    async def status(self) -> StatusInfo:
        if self.status_error is not None:
            raise self.status_error
        return self.status_info

    async def peers(self) -> list[PeerInfo]:
        return list(self.peer_list)

    async def kick(self, name: str, reason: str) -> KickResult:
        closed = sum(1 for p in self.peer_list if p.name == name)
        if not closed:
            raise ControlError(ErrorCode.NOT_FOUND, f"no connected peer named {name!r}")
        self.kicked.append((name, reason))
        return KickResult(name, closed)

    async def reload(self) -> ReloadReport:
        self.reload_entered.set()
        if self.reload_gate is not None:
            await asyncio.to_thread(self.reload_gate.wait, 10)
        if self.reload_error is not None:
            raise self.reload_error
        return self.reload_report

    async def renew(self) -> RenewResult:
        return RenewResult(True, "1f", "ab" * 32, "2026-07-01T12:00:00+00:00", "renewed")

    async def renew_hint(self, name: str, reason: str) -> RenewHintResult:
        sessions = sum(1 for p in self.peer_list if p.name == name)
        if not sessions:
            raise ControlError(ErrorCode.NOT_FOUND, f"no connected peer named {name!r}")
        self.hinted.append((name, reason))
        return RenewHintResult(name, sessions)


class ServerThread:
    """A ``ControlServer`` on an event loop in a background thread, for sync clients."""

    def __init__(self, path: Path, handler: FakeHandler | None = None, **kw: Any) -> None:
        self.path = path
        self.handler = handler or FakeHandler()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ControlServer(path, self.handler, **kw)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        try:
            self.run(self.server.start())
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        try:
            self.run(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


class LineSocket:
    """A raw client: send bytes, read reply lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; pending {self.buf[:80]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def closed(self) -> bool:
        """True once the server closed its end (after any pending data)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
