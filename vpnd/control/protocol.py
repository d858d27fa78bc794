"""Control API protocol: JSON lines over a unix socket, requests, replies, error codes.

Pure: no sockets, no asyncio. ``server.py`` and ``client.py`` are the only edges; the
result shapes a reply carries are in ``vpnd.control.results``.
A request is ``{"id": 1, "cmd": "status", "args": {}}``; a reply is
``{"id": 1, "ok": true, "result": {...}}`` or
``{"id": 1, "ok": false, "error": {"code": "<ErrorCode>", "message": "one line"}}``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 64 * 1024
"""Bytes in one request line, newline excluded; longer is ``too_large``."""
MAX_NAME = 64
MAX_REASON = 200

Json = dict[str, Any]


class ErrorCode(enum.StrEnum):
    """Stable error codes: scripts match on these, so never rename one."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    NOT_FOUND = "not_found"
    INVALID_CONFIG = "invalid_config"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    INTERNAL = "internal"


class Command(enum.StrEnum):
    PING = "ping"
    STATUS = "status"
    PEERS = "peers"
    KICK = "kick"
    RELOAD = "reload"
    RENEW = "renew"
    RENEW_HINT = "renew-hint"
    """Gateway: send RENEW_HINT to a connected peer (``vpnctl update --now``); args as kick."""


class ControlError(Exception):
    """A request was refused; travels as an error reply. ``str()`` is one line."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: int | None = None) -> None:
        self.code = ErrorCode(code)
        self.message = _one_line(message)
        self.request_id = request_id
        super().__init__(f"{self.code.value}: {self.message}")


class ProtocolError(Exception):
    """The other side broke the protocol (a malformed reply or result shape)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- requests and responses ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    cmd: Command
    args: Json = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    id: int | None
    """None when the request was too broken to carry an id."""
    ok: bool
    result: Json | None = None
    error: ControlError | None = None

    @classmethod
    def success(cls, request_id: int | None, result: Json) -> Response:
        return cls(request_id, True, result=result)

    @classmethod
    def failure(cls, request_id: int | None, err: ControlError) -> Response:
        return cls(request_id, False, error=err)


def encode_request(req: Request) -> bytes:
    doc = {"id": req.id, "cmd": req.cmd.value, "args": req.args}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode_request(line: bytes | str) -> Request:
    """Parse and validate one request line; every failure is a ``ControlError``."""
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    if len(raw) > MAX_LINE:
        raise ControlError(ErrorCode.TOO_LARGE, f"request line over {MAX_LINE} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError(ErrorCode.BAD_REQUEST, "request is not a JSON object line") from None
    if not isinstance(doc, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "request must be a JSON object")
    rid = doc.get("id")
    if not _is_int(rid):
        raise ControlError(ErrorCode.BAD_REQUEST, "request 'id' must be an integer")
    assert isinstance(rid, int)
    unknown = set(doc) - {"id", "cmd", "args"}
    if unknown:
        raise ControlError(
            ErrorCode.BAD_REQUEST, f"unknown request field {sorted(unknown)[0]!r}", request_id=rid
        )
    cmd = doc.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError(ErrorCode.BAD_REQUEST, "request 'cmd' must be a string", request_id=rid)
    try:
        command = Command(cmd)
    except ValueError:
        known = ", ".join(c.value for c in Command)
        raise ControlError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {cmd[:40]!r} (known: {known})",
            request_id=rid,
        ) from None
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise ControlError(
            ErrorCode.BAD_REQUEST, "request 'args' must be an object", request_id=rid
        )
    _check_args(command, args, rid)
    return Request(rid, command, args)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_args(cmd: Command, args: Json, rid: int) -> None:
    named = cmd in (Command.KICK, Command.RENEW_HINT)
    allowed = {"name", "reason"} if named else set()
    extra = set(args) - allowed
    if extra:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"{cmd.value} takes no argument {sorted(extra)[0]!r}",
            request_id=rid,
        )
    if not named:
        return
    name = args.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"{cmd.value} needs 'name': a peer name of 1..{MAX_NAME} characters",
            request_id=rid,
        )
    reason = args.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"{cmd.value} 'reason' must be text of at most {MAX_REASON} characters",
            request_id=rid,
        )
    # The name and reason reach logs and CLOSE frames: no forged lines.
    if not (name.isprintable() and reason.isprintable()):
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"{cmd.value} name and reason must be printable text",
            request_id=rid,
        )


def kick_args(req: Request) -> tuple[str, str]:
    """(name, reason) of a validated kick request."""
    return str(req.args["name"]), str(req.args.get("reason", ""))


def encode_response(resp: Response) -> bytes:
    doc: Json = {"id": resp.id, "ok": resp.ok}
    if resp.ok:
        doc["result"] = resp.result if resp.result is not None else {}
    else:
        err = resp.error or ControlError(ErrorCode.INTERNAL, "unknown error")
        doc["error"] = {"code": err.code.value, "message": err.message}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode_response(line: bytes | str) -> Response:
    """Parse one reply line; a malformed one is a ``ProtocolError``."""
    try:
        doc = json.loads(line, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("reply is not a JSON line") from None
    if not isinstance(doc, dict):
        raise ProtocolError("reply is not a JSON object")
    rid = doc.get("id")
    if rid is not None and not _is_int(rid):
        raise ProtocolError("reply 'id' is not an integer")
    ok = doc.get("ok")
    if ok is True:
        result = doc.get("result")
        if not isinstance(result, dict):
            raise ProtocolError("reply 'result' is not an object")
        return Response.success(rid, result)
    if ok is False:
        err = doc.get("error")
        if not isinstance(err, dict):
            raise ProtocolError("error reply has no 'error' object")
        code, message = err.get("code"), err.get("message")
        if not isinstance(message, str):
            raise ProtocolError("error reply has no 'message'")
        try:
            known = ErrorCode(str(code))
        except ValueError:
            # A newer server may add codes: keep the text, map to internal.
            known = ErrorCode.INTERNAL
            message = f"{code}: {message}"
        return Response.failure(rid, ControlError(known, message, request_id=rid))
    raise ProtocolError("reply 'ok' is not true or false")
