"""Control API messages: JSON lines over a unix socket, with stable error codes.

Pure: no sockets, no asyncio. ``server.py`` and ``client.py`` are the only edges.
A request is ``{"id": 1, "cmd": "status", "args": {}}``; a reply is
``{"id": 1, "ok": true, "result": {...}}`` or
``{"id": 1, "ok": false, "error": {"code": "<ErrorCode>", "message": "one line"}}``.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
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
    allowed = {"name", "reason"} if cmd is Command.KICK else set()
    extra = set(args) - allowed
    if extra:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"{cmd.value} takes no argument {sorted(extra)[0]!r}",
            request_id=rid,
        )
    if cmd is not Command.KICK:
        return
    name = args.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"kick needs 'name': a peer name of 1..{MAX_NAME} characters",
            request_id=rid,
        )
    reason = args.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ControlError(
            ErrorCode.BAD_REQUEST,
            f"kick 'reason' must be text of at most {MAX_REASON} characters",
            request_id=rid,
        )
    # The name and reason reach logs and CLOSE frames: no forged lines.
    if not (name.isprintable() and reason.isprintable()):
        raise ControlError(
            ErrorCode.BAD_REQUEST, "kick name and reason must be printable text", request_id=rid
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


# --- result shapes ------------------------------------------------------------------------


class _Reader:
    """Typed field access on a decoded result; a wrong shape is a ``ProtocolError``."""

    def __init__(self, doc: object, what: str) -> None:
        if not isinstance(doc, Mapping):
            raise ProtocolError(f"{what} is not an object")
        self.doc = doc
        self.what = what

    def _get(self, key: str) -> object:
        if key not in self.doc:
            raise ProtocolError(f"{self.what} lacks {key!r}")
        return self.doc[key]

    def _bad(self, key: str, kind: str) -> ProtocolError:
        return ProtocolError(f"{self.what}.{key} is not {kind}")

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if not _is_int(value):
            raise self._bad(key, "an integer")
        assert isinstance(value, int)
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        if not math.isfinite(value):
            raise self._bad(key, "a finite number")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def texts(self, key: str) -> list[str]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return list(value)

    def counts(self, key: str) -> dict[str, int]:
        value = self._get(key)
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and _is_int(v) for k, v in value.items()
        ):
            raise self._bad(key, "an object of integer counts")
        return dict(value)

    def sub(self, key: str) -> _Reader:
        return _Reader(self._get(key), f"{self.what}.{key}")


@dataclass(frozen=True, slots=True)
class CertSummary:
    name: str
    serial: str
    """Lowercase hex."""
    fingerprint: str
    """SHA-256 of the DER, lowercase hex."""
    not_after: str
    """ISO 8601 UTC."""
    days_left: int
    """Whole days until ``not_after``; negative once expired."""

    def to_json(self) -> Json:
        return {
            "name": self.name,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "not_after": self.not_after,
            "days_left": self.days_left,
        }

    @classmethod
    def from_json(cls, doc: object, what: str = "cert") -> CertSummary:
        r = _Reader(doc, what)
        return cls(
            r.text("name"),
            r.text("serial"),
            r.text("fingerprint"),
            r.text("not_after"),
            r.integer("days_left"),
        )


@dataclass(frozen=True, slots=True)
class CrlSummary:
    number: int
    next_update: str
    """ISO 8601 UTC."""
    seconds_left: float
    """Until ``next_update``; negative once past it."""
    stale: bool

    def to_json(self) -> Json:
        return {
            "number": self.number,
            "next_update": self.next_update,
            "seconds_left": self.seconds_left,
            "stale": self.stale,
        }

    @classmethod
    def from_json(cls, doc: object, what: str = "crl") -> CrlSummary:
        r = _Reader(doc, what)
        return cls(
            r.integer("number"), r.text("next_update"), r.number("seconds_left"), r.flag("stale")
        )


@dataclass(frozen=True, slots=True)
class StatusInfo:
    role: str
    version: str
    pid: int
    uptime_s: float
    listen: str
    tun: str
    sessions: int
    handshakes: dict[str, int]
    """``accepted`` and ``refused_<reason>`` counts."""
    drops: dict[str, int]
    """Dropped packets by reason."""
    cert: CertSummary
    ca: CertSummary
    crl: CrlSummary | None
    policy_rules: int

    def to_json(self) -> Json:
        return {
            "role": self.role,
            "version": self.version,
            "pid": self.pid,
            "uptime_s": self.uptime_s,
            "listen": self.listen,
            "tun": self.tun,
            "sessions": self.sessions,
            "handshakes": dict(self.handshakes),
            "drops": dict(self.drops),
            "cert": self.cert.to_json(),
            "ca": self.ca.to_json(),
            "crl": None if self.crl is None else self.crl.to_json(),
            "policy_rules": self.policy_rules,
        }

    @classmethod
    def from_json(cls, doc: object) -> StatusInfo:
        r = _Reader(doc, "status")
        crl_doc = r.doc.get("crl")
        return cls(
            role=r.text("role"),
            version=r.text("version"),
            pid=r.integer("pid"),
            uptime_s=r.number("uptime_s"),
            listen=r.text("listen"),
            tun=r.text("tun"),
            sessions=r.integer("sessions"),
            handshakes=r.counts("handshakes"),
            drops=r.counts("drops"),
            cert=CertSummary.from_json(r.sub("cert").doc, "status.cert"),
            ca=CertSummary.from_json(r.sub("ca").doc, "status.ca"),
            crl=None if crl_doc is None else CrlSummary.from_json(crl_doc, "status.crl"),
            policy_rules=r.integer("policy_rules"),
        )


@dataclass(frozen=True, slots=True)
class PeerInfo:
    name: str
    serial: str
    fingerprint: str
    addresses: list[str]
    groups: list[str]
    remote: str
    connected_since: str
    """ISO 8601 UTC."""
    bytes_in: int
    """From the peer into the tunnel."""
    bytes_out: int
    """Towards the peer."""
    packets_in: int
    packets_out: int
    drops: dict[str, int]
    cert_not_after: str
    cert_days_left: int

    def to_json(self) -> Json:
        return {
            "name": self.name,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "addresses": list(self.addresses),
            "groups": list(self.groups),
            "remote": self.remote,
            "connected_since": self.connected_since,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "drops": dict(self.drops),
            "cert_not_after": self.cert_not_after,
            "cert_days_left": self.cert_days_left,
        }

    @classmethod
    def from_json(cls, doc: object, what: str = "peer") -> PeerInfo:
        r = _Reader(doc, what)
        return cls(
            name=r.text("name"),
            serial=r.text("serial"),
            fingerprint=r.text("fingerprint"),
            addresses=r.texts("addresses"),
            groups=r.texts("groups"),
            remote=r.text("remote"),
            connected_since=r.text("connected_since"),
            bytes_in=r.integer("bytes_in"),
            bytes_out=r.integer("bytes_out"),
            packets_in=r.integer("packets_in"),
            packets_out=r.integer("packets_out"),
            drops=r.counts("drops"),
            cert_not_after=r.text("cert_not_after"),
            cert_days_left=r.integer("cert_days_left"),
        )


def peers_to_json(peers: list[PeerInfo]) -> Json:
    """The ``peers`` result: an object, so every result is one."""
    return {"peers": [p.to_json() for p in peers]}


def peers_from_json(doc: object) -> list[PeerInfo]:
    r = _Reader(doc, "result")
    items = r._get("peers")
    if not isinstance(items, list):
        raise ProtocolError("result.peers is not a list")
    return [PeerInfo.from_json(item, f"peers[{i}]") for i, item in enumerate(items)]


@dataclass(frozen=True, slots=True)
class KickResult:
    name: str
    closed: int
    """Sessions closed (a name may have several certificates connected)."""

    def to_json(self) -> Json:
        return {"name": self.name, "closed": self.closed}

    @classmethod
    def from_json(cls, doc: object) -> KickResult:
        r = _Reader(doc, "kick")
        return cls(r.text("name"), r.integer("closed"))


@dataclass(frozen=True, slots=True)
class ReloadReport:
    changed: list[str] = field(default_factory=list)
    """Human lines, e.g. ``policy: 3 rules -> 2 rules``."""
    closed: list[str] = field(default_factory=list)
    """Peers dropped because the new config no longer allows them."""
    errors: list[str] = field(default_factory=list)
    """Parts that could not be applied (the rest was)."""

    def to_json(self) -> Json:
        return {
            "changed": list(self.changed),
            "closed": list(self.closed),
            "errors": list(self.errors),
        }

    @classmethod
    def from_json(cls, doc: object) -> ReloadReport:
        r = _Reader(doc, "reload")
        return cls(r.texts("changed"), r.texts("closed"), r.texts("errors"))
