"""Control messages carried as JSON in HELLO and CONFIG frames, validated strictly.

Decoding rejects: bytes that are not UTF-8, JSON that is not one object, duplicate
keys, NaN/Infinity, missing keys, wrong types, out-of-range values and unknown
versions, each with a message naming the field. Unknown *extra* keys are ignored, so
a newer gateway can push an optional field (e.g. DNS) without breaking older clients;
anything that changes meaning bumps the HELLO version instead.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

from vpnd.proto.close import printable
from vpnd.proto.errors import LocalProtocolError, RemoteProtocolError
from vpnd.proto.frames import JSON_MAX

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

PROTOCOL_VERSION = 1
SOFTWARE = "vpnd/0.1.0"
SOFTWARE_MAX = 64
MTU_MIN = 576
MTU_MAX = 65535


class _FieldError(Exception):
    """Internal: a field failed validation; turned into a Local/Remote error by the caller."""


def _fail(what: str, message: str) -> NoReturn:
    raise _FieldError(f"{what}: {message}")


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _load_object(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    if len(payload) > JSON_MAX:
        raise RemoteProtocolError(f"{what}: {len(payload)} bytes exceeds the {JSON_MAX} limit")
    try:
        text = bytes(payload).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise RemoteProtocolError(f"{what}: not valid UTF-8 JSON ({detail})") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: expected a JSON object, got {_type_name(obj)}")
    return obj


def _dump_object(obj: dict[str, Any], what: str) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(data) > JSON_MAX:
        raise LocalProtocolError(f"{what}: encodes to {len(data)} bytes, limit is {JSON_MAX}")
    return data


def _field(obj: dict[str, Any], what: str, key: str) -> Any:
    if key not in obj:
        _fail(what, f"missing field {key!r}")
    return obj[key]


def _check_bool(what: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(what, f"field {key!r} must be a boolean, got {_type_name(value)}")
    return value


def _check_int(what: str, key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(what, f"field {key!r} must be an integer, got {_type_name(value)}")
    if not low <= value <= high:
        _fail(what, f"field {key!r} must be in {low}..{high}, got {value}")
    return value


def _check_seconds(what: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(what, f"field {key!r} must be a number of seconds, got {_type_name(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= 86400:
        _fail(what, f"field {key!r} must be between 0 and 86400 seconds, got {value}")
    return seconds


def _check_str(what: str, key: str, value: object) -> str:
    if not isinstance(value, str):
        _fail(what, f"field {key!r} must be a string, got {_type_name(value)}")
    return value


def _check_list(what: str, key: str, value: object) -> list[object]:
    if not isinstance(value, list | tuple):
        _fail(what, f"field {key!r} must be a list, got {_type_name(value)}")
    return list(value)


def _parse_interface(what: str, key: str, value: object) -> IPInterface:
    text = _check_str(what, key, value)
    if "/" not in text:
        _fail(what, f"field {key!r} must be an address with a prefix length, got {text!r}")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        _fail(what, f"field {key!r} is not an address/prefix: {printable(text)!r}")


def _parse_address(what: str, key: str, value: object) -> IPAddress:
    text = _check_str(what, key, value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        _fail(what, f"field {key!r} is not an IP address: {printable(text)!r}")


def _parse_network(what: str, key: str, value: object) -> IPNetwork:
    text = _check_str(what, key, value)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        _fail(what, f"field {key!r} is not a network with host bits clear: {printable(text)!r}")


def _check_hello(what: str, version: object, offload: object, software: object) -> None:
    version = _check_int(what, "version", version, 0, 2**31)
    if version != PROTOCOL_VERSION:
        _fail(what, f"unsupported version {version} (this end speaks {PROTOCOL_VERSION})")
    _check_bool(what, "offload", offload)
    software = _check_str(what, "software", software)
    if len(software) > SOFTWARE_MAX or not software.isprintable():
        _fail(what, f"field 'software' must be at most {SOFTWARE_MAX} printable characters")


def _check_tunables(
    what: str, mtu: object, interval: object, timeout: object, offload: object
) -> tuple[int, float, float, bool]:
    mtu = _check_int(what, "mtu", mtu, MTU_MIN, MTU_MAX)
    interval = _check_seconds(what, "keepalive_interval", interval)
    timeout = _check_seconds(what, "keepalive_timeout", timeout)
    if timeout <= interval:
        _fail(
            what,
            f"field 'keepalive_timeout' ({timeout:g}s) must exceed "
            f"'keepalive_interval' ({interval:g}s)",
        )
    return mtu, interval, timeout, _check_bool(what, "offload", offload)


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's opening message."""

    version: int = PROTOCOL_VERSION
    """Protocol version; only 1 exists."""
    offload: bool = False
    """The client can send and receive virtio_net_hdr (GSO) packets."""
    software: str = SOFTWARE
    """Free-form client software name, for logs only."""

    def __post_init__(self) -> None:
        try:
            _check_hello("HELLO", self.version, self.offload, self.software)
        except _FieldError as exc:
            raise LocalProtocolError(str(exc)) from None

    def to_json(self) -> bytes:
        """The HELLO payload."""
        obj = {"version": self.version, "offload": self.offload, "software": self.software}
        return _dump_object(obj, "HELLO")

    @classmethod
    def from_json(cls, payload: bytes | memoryview) -> Hello:
        """Parse a HELLO payload; raises ``RemoteProtocolError`` naming the bad field."""
        what = "HELLO"
        obj = _load_object(payload, what)
        try:
            values = [_field(obj, what, key) for key in ("version", "offload", "software")]
            _check_hello(what, *values)
        except _FieldError as exc:
            raise RemoteProtocolError(str(exc)) from None
        return cls(version=values[0], offload=values[1], software=values[2])


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """What the gateway pushes to a client in CONFIG."""

    address: IPInterface
    """The client's overlay address with the overlay prefix, e.g. 10.8.0.5/24."""
    gateway: IPAddress
    """The gateway's overlay address."""
    routes: tuple[IPNetwork, ...]
    """Networks the client routes into the tunnel."""
    mtu: int
    """Tunnel interface MTU, 576..65535."""
    keepalive_interval: float
    """Send a PING after this many seconds without sending anything."""
    keepalive_timeout: float
    """Declare the peer dead after this many seconds without receiving anything."""
    offload: bool
    """DATA frames may carry virtio_net_hdr (GSO) packets, in both directions."""
    extra_addresses: tuple[IPInterface, ...] = ()
    """Further overlay addresses from the client's certificate (e.g. IPv6)."""

    def __post_init__(self) -> None:
        what = "CONFIG"
        try:
            if not isinstance(self.address, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
                _fail(what, "field 'address' must be an IPv4Interface or IPv6Interface")
            if not isinstance(self.gateway, ipaddress.IPv4Address | ipaddress.IPv6Address):
                _fail(what, "field 'gateway' must be an IPv4Address or IPv6Address")
            if not isinstance(self.routes, tuple) or not all(
                isinstance(r, ipaddress.IPv4Network | ipaddress.IPv6Network) for r in self.routes
            ):
                _fail(what, "field 'routes' must be a tuple of IP networks")
            if not isinstance(self.extra_addresses, tuple) or not all(
                isinstance(a, ipaddress.IPv4Interface | ipaddress.IPv6Interface)
                for a in self.extra_addresses
            ):
                _fail(what, "field 'extra_addresses' must be a tuple of IP interfaces")
            _check_tunables(
                what, self.mtu, self.keepalive_interval, self.keepalive_timeout, self.offload
            )
        except _FieldError as exc:
            raise LocalProtocolError(str(exc)) from None

    def to_json(self) -> bytes:
        """The CONFIG payload; ``LocalProtocolError`` if it would exceed 8 KiB."""
        obj = {
            "address": str(self.address),
            "gateway": str(self.gateway),
            "routes": [str(r) for r in self.routes],
            "mtu": self.mtu,
            "keepalive_interval": float(self.keepalive_interval),
            "keepalive_timeout": float(self.keepalive_timeout),
            "offload": self.offload,
            "extra_addresses": [str(a) for a in self.extra_addresses],
        }
        return _dump_object(obj, "CONFIG")

    @classmethod
    def from_json(cls, payload: bytes | memoryview) -> TunnelConfig:
        """Parse a CONFIG payload; raises ``RemoteProtocolError`` naming the bad field."""
        what = "CONFIG"
        obj = _load_object(payload, what)
        try:
            address = _parse_interface(what, "address", _field(obj, what, "address"))
            gateway = _parse_address(what, "gateway", _field(obj, what, "gateway"))
            routes = tuple(
                _parse_network(what, "routes", item)
                for item in _check_list(what, "routes", _field(obj, what, "routes"))
            )
            extra = tuple(
                _parse_interface(what, "extra_addresses", item)
                for item in _check_list(what, "extra_addresses", obj.get("extra_addresses", []))
            )
            mtu, interval, timeout, offload = _check_tunables(
                what,
                *(
                    _field(obj, what, key)
                    for key in ("mtu", "keepalive_interval", "keepalive_timeout", "offload")
                ),
            )
        except _FieldError as exc:
            raise RemoteProtocolError(str(exc)) from None
        return cls(
            address=address,
            gateway=gateway,
            routes=routes,
            mtu=mtu,
            keepalive_interval=interval,
            keepalive_timeout=timeout,
            offload=offload,
            extra_addresses=extra,
        )
