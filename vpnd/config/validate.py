"""Typed readers for YAML values: each one checks a value found at a YAML path and
returns it as the type the schema wants, or raises a ConfigError naming that path."""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import re
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vpnd.config.durations import DurationError, format_duration, parse_duration
from vpnd.config.errors import ConfigError
from vpnd.config.files import FileProblem, check_readable
from vpnd.config.schema import HostPort, IPNetwork
from vpnd.config.strict_yaml import join_index, join_key

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)


@dataclass
class Context:
    """Where values come from, and where warnings go."""

    source: str
    base_dir: Path
    check_files: bool = True
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, detail: str) -> ConfigError:
        return ConfigError(self.source, path, detail)

    def warn(self, path: str, detail: str) -> None:
        self.warnings.append(str(ConfigError(self.source, path, detail)))


Reader = Callable[[Context, str, object], T]
"""Checks the value at a YAML path and converts it, or raises ConfigError."""

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def describe(value: object) -> str:
    """A short, one-line, YAML-flavoured description of what was found."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return _repr.repr(value)
    if isinstance(value, str):
        if _looks_scalar(value):
            return f"{_repr.repr(value)} (a quoted string)"
        return _repr.repr(value)
    if isinstance(value, list):
        return f"a list {_repr.repr(value)}"
    if isinstance(value, dict):
        return f"a mapping {_repr.repr(value)}"
    return f"a {type(value).__name__} {_repr.repr(value)}"


def _looks_scalar(text: str) -> bool:
    if text.lower() in {"true", "false", "yes", "no", "on", "off", "null", "~"}:
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


class Section:
    """A YAML mapping whose keys have all been checked against the allowed ones."""

    def __init__(
        self, ctx: Context, path: str, value: object, allowed: Sequence[str], *, what: str
    ) -> None:
        if not isinstance(value, dict):
            raise ctx.error(path, f"expected a mapping ({what}), got {describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise ctx.error(path, f"keys must be strings, got the key {describe(key)}")
            if key not in allowed:
                raise ctx.error(join_key(path, key), unknown_key(key, allowed))
        self.ctx = ctx
        self.path = path
        self.data: dict[str, object] = value

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def at(self, key: str) -> str:
        return join_key(self.path, key)

    def get(self, key: str, read: Reader[T], default: T) -> T:
        if key not in self.data:
            return default
        return read(self.ctx, self.at(key), self.data[key])

    def require(self, key: str, read: Reader[T], expected: str) -> T:
        if key not in self.data:
            raise self.ctx.error(self.at(key), f"required key missing; expected {expected}")
        return read(self.ctx, self.at(key), self.data[key])

    def section(self, key: str, read: Reader[T], default: T) -> T:
        """An optional sub-mapping; an explicit null (``tun:`` with nothing under it)
        means all its defaults, like leaving it out."""
        if self.data.get(key) is None:
            return default
        return read(self.ctx, self.at(key), self.data[key])


def unknown_key(key: str, allowed: Sequence[str]) -> str:
    lowered = key.lower()
    close = difflib.get_close_matches(lowered, allowed, n=1, cutoff=0.6)
    if not close and lowered:
        # difflib misses abbreviations such as `tcp` for `tcp_timeout`.
        close = [k for k in allowed if k.startswith(lowered) or lowered.startswith(k)][:1]
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}(valid keys: {', '.join(allowed)})"


# --- scalars ---------------------------------------------------------------------------


def integer(lo: int, hi: int) -> Reader[int]:
    def read(ctx: Context, path: str, value: object) -> int:
        # bool is an int subclass in Python, but `mtu: true` is a mistake.
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ctx.error(path, f"expected an integer {lo}..{hi}, got {describe(value)}")
        return value

    return read


def seconds(lo: float, hi: float, *, lo_inclusive: bool = False) -> Reader[float]:
    """A duration in seconds; ints are accepted, NaN and infinities are not."""
    expected = f"a number of seconds {'>=' if lo_inclusive else '>'} {lo:g} and <= {hi:g}"

    def read(ctx: Context, path: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.error(path, f"expected {expected}, got {describe(value)}")
        # float() of a huge YAML int would raise OverflowError; it is out of range anyway.
        number = float(value) if abs(value) <= hi else math.inf
        low_ok = number >= lo if lo_inclusive else number > lo
        if not (math.isfinite(number) and low_ok and number <= hi):
            raise ctx.error(path, f"expected {expected}, got {describe(value)}")
        return number

    return read


def duration(lo: float, hi: float, *, lo_inclusive: bool = False) -> Reader[float]:
    """Seconds as a number, or a string such as ``90s``, ``30m``, ``24h``, ``7d``."""
    as_seconds = seconds(lo, hi, lo_inclusive=lo_inclusive)
    shown = f"{'>=' if lo_inclusive else '>'} {format_duration(lo)} and <= {format_duration(hi)}"

    def read(ctx: Context, path: str, value: object) -> float:
        if not isinstance(value, str):
            return as_seconds(ctx, path, value)
        try:
            number = parse_duration(value)
        except DurationError as err:
            raise ctx.error(path, str(err)) from None
        low_ok = number >= lo if lo_inclusive else number > lo
        if not (low_ok and number <= hi):
            raise ctx.error(path, f"expected a duration {shown}, got {describe(value)}")
        return number

    return read


def boolean(ctx: Context, path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(path, f"expected true or false, got {describe(value)}")
    return value


def choice(kind: type[E]) -> Reader[E]:
    names = [member.value for member in kind]

    def read(ctx: Context, path: str, value: object) -> E:
        if isinstance(value, str) and value in names:
            return kind(value)
        raise ctx.error(path, f"expected one of {' | '.join(names)}, got {describe(value)}")

    return read


def text(ctx: Context, path: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(path, f"expected a non-empty string, got {describe(value)}")
    return value


def nullable(read: Reader[T]) -> Reader[T | None]:
    def wrapped(ctx: Context, path: str, value: object) -> T | None:
        return None if value is None else read(ctx, path, value)

    return wrapped


def list_of(read: Reader[T], *, allow_empty: bool = True) -> Reader[tuple[T, ...]]:
    def wrapped(ctx: Context, path: str, value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ctx.error(path, f"expected a list, got {describe(value)}")
        if not value and not allow_empty:
            raise ctx.error(path, "expected a non-empty list, got []")
        return tuple(read(ctx, join_index(path, i), item) for i, item in enumerate(value))

    return wrapped


# --- files -----------------------------------------------------------------------------


def file_path(ctx: Context, path: str, value: object) -> Path:
    """A path; a relative one is taken relative to the config file's directory."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ctx.error(path, f"expected a file path, got {describe(value)}")
    return ctx.base_dir / value


def existing_file(*, secret: bool = False) -> Reader[Path]:
    """A path to a readable, non-empty regular file (checked only if ``ctx.check_files``).

    A ``secret`` (private key, passphrase) readable by everyone is an error; readable
    by the group is a warning.
    """

    def read(ctx: Context, path: str, value: object) -> Path:
        resolved = file_path(ctx, path, value)
        if not ctx.check_files:
            return resolved
        try:
            st = check_readable(resolved)
        except FileProblem as err:
            raise ctx.error(path, str(err)) from None
        if secret and st.st_mode & 0o004:
            raise ctx.error(
                path,
                f"{resolved} is readable by every user (mode {st.st_mode & 0o777:04o}); "
                f"run: chmod 600 {resolved}",
            )
        if secret and st.st_mode & 0o040:
            ctx.warn(
                path,
                f"{resolved} is readable by its group (mode {st.st_mode & 0o777:04o}); "
                f"consider: chmod 600 {resolved}",
            )
        return resolved

    return read


# --- names and addresses ----------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


def dns_name_problem(name: str) -> str | None:
    """Why ``name`` is not a usable DNS name, or None if it is one."""
    if not name.isascii():
        return "is not ASCII (use the punycode xn-- form)"
    if len(name) > 253:
        return "is longer than 253 characters"
    labels = name.lower().split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return "is not a valid DNS name (labels of a-z, 0-9 and '-', separated by dots)"
    if labels[-1].isdigit():
        return "is neither a valid IP address nor a DNS name"
    return None


def dns_name(ctx: Context, path: str, value: object) -> str:
    expected = "a DNS name such as gw.example.net"
    if not isinstance(value, str) or not value:
        raise ctx.error(path, f"expected {expected}, got {describe(value)}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ctx.error(path, f"expected {expected}, got the IP address {value!r}")
    problem = dns_name_problem(value)
    if problem:
        raise ctx.error(path, f"expected {expected}, got {describe(value)}, which {problem}")
    return value.lower()


class _BadEndpoint(Exception):
    """Why a ``host:port`` string is wrong: the tail of the error message."""


def _split_endpoint(value: str) -> tuple[str, str, bool]:
    """(host, port, bracketed) of ``host:port`` or ``[v6]:port``."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise _BadEndpoint(", which has no ]:port")
        return host, port, True
    host, sep, port = value.rpartition(":")
    if not sep:
        raise _BadEndpoint(", which has no :port")
    if ":" in host:
        raise _BadEndpoint(", an IPv6 address must be in brackets")
    return host, port, False


def _endpoint_host(host: str, *, bracketed: bool, ip_only: bool) -> str:
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _BadEndpoint(", whose [...] does not hold an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if ip_only:
        raise _BadEndpoint(f", whose host {host!r} is not an IP address")
    problem = dns_name_problem(host) if host else "is empty"
    if problem:
        raise _BadEndpoint(f", whose host {problem}")
    return host.lower()


def _endpoint_port(port: str) -> int:
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _BadEndpoint(", whose port is not 1..65535")
    return int(port)


def host_port(*, ip_only: bool) -> Reader[HostPort]:
    """``host:port`` or ``[v6]:port``. With ``ip_only`` the host must be an IP literal
    (an address to bind), else a DNS name is allowed too (an address to connect to)."""
    host_kind = "an IP address" if ip_only else "a host name or IP address"
    expected = f'"host:port" with {host_kind} and a port 1..65535 (IPv6: "[::1]:4443")'

    def read(ctx: Context, path: str, value: object) -> HostPort:
        try:
            if not isinstance(value, str):
                raise _BadEndpoint("")
            host, port, bracketed = _split_endpoint(value)
            name = _endpoint_host(host, bracketed=bracketed, ip_only=ip_only)
            return HostPort(name, _endpoint_port(port))
        except _BadEndpoint as why:
            raise ctx.error(path, f"expected {expected}, got {describe(value)}{why}") from None

    return read


def network(ctx: Context, path: str, value: object) -> IPNetwork:
    """A CIDR such as 192.168.50.0/24 (a bare address means a single host)."""
    expected = "a network such as 192.168.50.0/24"
    if not isinstance(value, str):
        raise ctx.error(path, f"expected {expected}, got {describe(value)}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        if "has host bits set" in str(err):
            loose = ipaddress.ip_network(value, strict=False)
            raise ctx.error(
                path, f"{value!r} has host bits set; did you mean {str(loose)!r}?"
            ) from None
        raise ctx.error(path, f"expected {expected}, got {describe(value)}") from None
