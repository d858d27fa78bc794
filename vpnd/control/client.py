"""A small synchronous control client (stdlib socket only: vpnctl must start fast)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vpnd.control.protocol import (
    Command,
    ControlError,
    ProtocolError,
    Request,
    decode_response,
    encode_request,
)
from vpnd.control.results import (
    KickResult,
    PeerInfo,
    ReloadReport,
    RenewResult,
    StatusInfo,
    peers_from_json,
)

T = TypeVar("T")

DEFAULT_SOCKET = Path("/run/vpnd/vpnd.sock")
ENV_SOCKET = "VPND_SOCKET"
MAX_REPLY = 64 * 1024 * 1024
"""A peers list of many thousand peers is a few MB; beyond this the reply is broken."""


class ControlClientError(Exception):
    """vpnd could not be asked (no socket, no permission, timeout, broken reply)."""


def default_socket() -> Path:
    return Path(os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET)


class ControlClient:
    """One connection per call: vpnctl asks one thing and exits."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._ids = itertools.count(1)

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its result, or raise ``ControlError`` for an error reply."""
        try:
            command = Command(cmd)
        except ValueError:
            raise ControlClientError(f"unknown command {cmd!r}") from None
        req = Request(next(self._ids), command, dict(args or {}))
        line = self._exchange(encode_request(req))
        try:
            resp = decode_response(line)
        except ProtocolError as err:
            raise ControlClientError(f"malformed reply from vpnd on {self.path}: {err}") from None
        if resp.id is not None and resp.id != req.id:
            raise ControlClientError(f"reply for request {resp.id}, expected {req.id}")
        if not resp.ok:
            assert resp.error is not None
            raise resp.error
        assert resp.result is not None
        return resp.result

    def _exchange(self, data: bytes) -> bytes:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            self._connect(sock)
            # Refused before reading (forbidden, busy): the reply is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            return self._read_line(sock)
        except TimeoutError:
            raise ControlClientError(
                f"vpnd did not answer within {self.timeout:g}s on {self.path}"
            ) from None
        finally:
            sock.close()

    def _connect(self, sock: socket.socket) -> None:
        where = str(self.path)
        try:
            sock.connect(where)
        except FileNotFoundError:
            raise ControlClientError(f"no such socket {where} (is vpnd running?)") from None
        except PermissionError:
            raise ControlClientError(f"permission denied on {where} (run as root)") from None
        except ConnectionRefusedError:
            raise ControlClientError(
                f"nobody is listening on {where} (is vpnd running? the socket is stale)"
            ) from None
        except OSError as err:
            if err.errno == errno.ENOTSOCK:
                raise ControlClientError(f"{where} is not a socket") from None
            raise ControlClientError(f"cannot connect to {where}: {err.strerror or err}") from None

    def _read_line(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_REPLY:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ControlClientError(f"vpnd closed {self.path} without a reply")
            newline = chunk.find(b"\n")
            if newline >= 0:
                chunks.append(chunk[: newline + 1])
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise ControlClientError(f"reply from {self.path} is over {MAX_REPLY} bytes")

    # ---- typed wrappers ----------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def status(self) -> StatusInfo:
        return self._shaped(StatusInfo.from_json, self.call("status"))

    def peers(self) -> list[PeerInfo]:
        return self._shaped(peers_from_json, self.call("peers"))

    def kick(self, name: str, reason: str = "") -> KickResult:
        return self._shaped(
            KickResult.from_json, self.call("kick", {"name": name, "reason": reason})
        )

    def reload(self) -> ReloadReport:
        return self._shaped(ReloadReport.from_json, self.call("reload"))

    def renew(self) -> RenewResult:
        return self._shaped(RenewResult.from_json, self.call("renew"))

    def _shaped(self, parse: Callable[[object], T], doc: dict[str, Any]) -> T:
        try:
            return parse(doc)
        except ProtocolError as err:
            raise ControlClientError(f"malformed reply from vpnd on {self.path}: {err}") from None


__all__ = ["ControlClient", "ControlClientError", "ControlError", "default_socket"]
