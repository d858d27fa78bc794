"""The control socket: a unix stream server speaking ``vpnd.control.protocol``.

Plumbing only: reading lines, peer credentials, limits. What a command means lives in
the ``ControlHandler`` (``vpnd.gateway.control`` for a gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Protocol

from vpnd import __version__
from vpnd.control.protocol import (
    MAX_LINE,
    Command,
    ControlError,
    ErrorCode,
    Json,
    Request,
    Response,
    decode_request,
    encode_response,
    kick_args,
)
from vpnd.control.results import (
    KickResult,
    PeerInfo,
    ReloadReport,
    RenewHintResult,
    RenewResult,
    StatusInfo,
    peers_to_json,
)

log = logging.getLogger("vpnd.control")

_UCRED = struct.Struct("3i")  # pid, uid, gid


class ControlHandler(Protocol):
    """What the control API can ask of a running daemon."""

    async def status(self) -> StatusInfo: ...
    async def peers(self) -> list[PeerInfo]: ...
    async def kick(self, name: str, reason: str) -> KickResult: ...
    async def reload(self) -> ReloadReport: ...
    async def renew(self) -> RenewResult: ...

    async def renew_hint(self, name: str, reason: str) -> RenewHintResult: ...


class ControlServerError(Exception):
    """The control socket cannot be served; ``str()`` is one line saying what to fix."""


class ControlServer:
    def __init__(
        self,
        path: Path,
        handler: ControlHandler,
        *,
        idle_timeout: float = 60.0,
        max_clients: int = 16,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        parent = self.path.parent
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise ControlServerError(
                f"cannot create {parent} for the control socket: {err.strerror}"
            ) from None
        await self._clear_stale()
        # umask, not a later chmod alone: no moment where others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_client, path=str(self.path), limit=MAX_LINE + 2
            )
        except OSError as err:
            raise ControlServerError(
                f"cannot listen on {self.path}: {err.strerror or err}"
            ) from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino
        log.info("control socket listening on %s", self.path)

    async def _clear_stale(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlServerError(
                f"{self.path} exists and is not a socket; remove it or set control_socket"
            )
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), timeout=2.0
            )
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        except (OSError, TimeoutError) as err:
            raise ControlServerError(f"cannot check existing socket {self.path}: {err}") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise ControlServerError(f"another vpnd is already running on {self.path}")

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await server.wait_closed()
        # Remove only our own socket, never one a newer vpnd bound in its place.
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    # ---- one client ------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled: nothing to tell it
        except asyncio.CancelledError:
            pass  # close(): ending normally keeps asyncio from logging the cancel
        finally:
            self._tasks.discard(task)
            writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        if uid is None or uid not in (0, os.geteuid()):
            log.warning("control client uid %s refused (not root)", uid)
            await self._reply(writer, Response.failure(None, _forbidden()))
            return
        if len(self._tasks) > self.max_clients:
            await self._reply(
                writer,
                Response.failure(
                    None, ControlError(ErrorCode.BUSY, "too many control clients; retry")
                ),
            )
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
            except ValueError:
                # The rest of an oversized line cannot be told from the next request.
                too_large = ControlError(ErrorCode.TOO_LARGE, f"request line over {MAX_LINE} bytes")
                await self._reply(writer, Response.failure(None, too_large))
                return
            if not line:
                return
            await self._reply(writer, await self._answer(line))

    async def _reply(self, writer: asyncio.StreamWriter, resp: Response) -> None:
        writer.write(encode_response(resp))
        await asyncio.wait_for(writer.drain(), self.idle_timeout)

    async def _answer(self, line: bytes) -> Response:
        try:
            req = decode_request(line)
        except ControlError as err:
            return Response.failure(err.request_id, err)
        try:
            return Response.success(req.id, await self._dispatch(req))
        except ControlError as err:
            return Response.failure(req.id, err)
        except Exception as err:  # one bad command must not take the daemon down
            log.exception("control command %s failed", req.cmd.value)
            return Response.failure(
                req.id,
                ControlError(ErrorCode.INTERNAL, f"{req.cmd.value} failed: {type(err).__name__}"),
            )

    async def _dispatch(self, req: Request) -> Json:
        match req.cmd:
            case Command.PING:
                return {"pong": True, "version": __version__}
            case Command.STATUS:
                return (await self.handler.status()).to_json()
            case Command.PEERS:
                return peers_to_json(await self.handler.peers())
            case Command.KICK:
                name, reason = kick_args(req)
                return (await self.handler.kick(name, reason)).to_json()
            case Command.RELOAD:
                if self._reload_lock.locked():
                    raise ControlError(ErrorCode.BUSY, "a reload is already running")
                async with self._reload_lock:
                    return (await self.handler.reload()).to_json()
            case Command.RENEW:
                return (await self.handler.renew()).to_json()
            case Command.RENEW_HINT:
                name, reason = kick_args(req)
                return (await self.handler.renew_hint(name, reason)).to_json()
        raise ControlError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {req.cmd!r}")


def _forbidden() -> ControlError:
    return ControlError(ErrorCode.FORBIDDEN, "the control socket is for root only")


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)
