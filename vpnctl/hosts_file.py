"""The ``vpnctl deploy`` hosts file: YAML, validated up front, errors naming the entry.

Format::

    gateway_address: vpn.example.net:4443   # defaults for every host (all optional)
    server_name: vpn.example.net
    known_hosts: ~/.ssh/known_hosts
    identity: ~/.ssh/id_ed25519
    jump: admin@bastion.example.net
    remote_dir: /etc/vpnd
    hosts:
      - name: web1
        ssh: root@web1.example.net:22
        groups: [web]
        ip: 10.8.0.10                        # or a list; default: next free address
        remote_dir: /etc/vpnd                # optional per host, like identity,
                                             # known_hosts, jump, gateway_address, server_name

Relative paths resolve against the hosts file's directory; ``~`` is expanded.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vpnctl.remote_layout import (
    DEFAULT_REMOTE_DIR,
    LayoutError,
    check_client_settings,
    check_remote_dir,
)
from vpnctl.ssh_target import SshTarget, TargetError, parse_ssh_target
from vpnd.config import ConfigError
from vpnd.config.strict_yaml import parse_yaml
from vpnd.pki.identity import IPAddress, PkiError
from vpnd.pki.names import canonical_group, canonical_name

MAX_HOSTS_FILE_BYTES = 4 * 1024 * 1024
DEFAULT_KEYS = ("gateway_address", "server_name", "known_hosts", "identity", "jump", "remote_dir")
TOP_KEYS = (*DEFAULT_KEYS, "hosts")
HOST_KEYS = ("name", "ssh", "groups", "ip", *DEFAULT_KEYS)

T = TypeVar("T")


class HostsFileError(ConfigError):
    """A hosts file problem: ``FILE: hosts[2] (web1).ssh: what is wrong``."""


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One host to provision, with the file's defaults already applied."""

    name: str
    ssh: SshTarget
    groups: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    """Empty: the next free address (renewals keep the current one)."""
    remote_dir: str = DEFAULT_REMOTE_DIR
    identity: Path | None = None
    known_hosts: Path | None = None
    """None: the caller's default (``--known-hosts`` or ``~/.ssh/known_hosts``)."""
    jump: SshTarget | None = None
    gateway_address: str | None = None
    server_name: str | None = None


def load_hosts_file(path: str | os.PathLike[str]) -> tuple[HostEntry, ...]:
    """Read and validate a hosts file; HostsFileError (one line) on any problem."""
    p = Path(path)
    source = str(p)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_HOSTS_FILE_BYTES + 1)
    except OSError as exc:
        raise HostsFileError(source, "", f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_HOSTS_FILE_BYTES:
        raise HostsFileError(source, "", f"larger than {MAX_HOSTS_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HostsFileError(source, "", f"not UTF-8 (byte {exc.start})") from None
    try:
        data = parse_yaml(text, source=source)
    except ConfigError as exc:
        raise HostsFileError(source, exc.path, exc.detail) from None
    return parse_hosts(data, source=source, base_dir=p.parent)


def parse_hosts(data: object, *, source: str, base_dir: Path) -> tuple[HostEntry, ...]:
    def fail(where: str, detail: str) -> HostsFileError:
        return HostsFileError(source, where, detail)

    if not isinstance(data, Mapping):
        raise fail("", "expected a mapping with a 'hosts:' list (and optional defaults)")
    _no_unknown(data, TOP_KEYS, "", fail)
    if "hosts" not in data:
        raise fail("", "no 'hosts:' list")
    hosts = data["hosts"]
    if not isinstance(hosts, list) or not hosts:
        raise fail("hosts", "expected a non-empty list of hosts")
    defaults = {k: data[k] for k in DEFAULT_KEYS if data.get(k) is not None}
    for key, value in defaults.items():
        _field(key, value, base_dir, key, fail)  # a bad default is named once, as itself

    entries: list[HostEntry] = []
    seen_names: dict[str, str] = {}
    seen_places: dict[tuple[str, str], str] = {}
    for index, item in enumerate(hosts):
        entry, where = _host_entry(item, f"hosts[{index}]", defaults, base_dir, fail)
        if entry.name in seen_names:
            raise fail(where, f"name {entry.name!r} is already used by {seen_names[entry.name]}")
        place = (entry.ssh.host_port, entry.remote_dir)
        if place in seen_places:
            raise fail(
                where,
                f"{entry.ssh.host_port}:{entry.remote_dir} is already provisioned by "
                f"{seen_places[place]}; give each host its own remote_dir",
            )
        seen_names[entry.name] = where
        seen_places[place] = where
        entries.append(entry)
    return tuple(entries)


def _host_entry(
    item: object,
    where: str,
    defaults: Mapping[str, object],
    base_dir: Path,
    fail: Callable[[str, str], HostsFileError],
) -> tuple[HostEntry, str]:
    """One host merged over the defaults, and where it is (for later messages)."""
    if not isinstance(item, Mapping):
        raise fail(where, "expected a mapping with at least name and ssh")
    label = item.get("name")
    if isinstance(label, str):
        where = f"{where} ({label})"
    _no_unknown(item, HOST_KEYS, where, fail)
    for required in ("name", "ssh"):
        if item.get(required) is None:
            raise fail(where, f"'{required}' is required")
    merged = {**defaults, **{k: v for k, v in item.items() if v is not None}}
    values = {
        ("addresses" if k == "ip" else k): _field(k, v, base_dir, f"{where}.{k}", fail)
        for k, v in merged.items()
    }
    entry = HostEntry(**values)  # type: ignore[arg-type]  # keys and types checked above
    try:
        check_client_settings(entry.gateway_address, entry.server_name)
    except LayoutError as exc:
        raise fail(where, str(exc)) from None
    return entry, where


def _no_unknown(
    item: Mapping[object, object],
    allowed: tuple[str, ...],
    where: str,
    fail: Callable[[str, str], HostsFileError],
) -> None:
    for key in item:
        if key not in allowed:
            raise fail(where, f"unknown key {key!r}; allowed: {', '.join(allowed)}")


def _field(
    key: str,
    value: object,
    base_dir: Path,
    where: str,
    fail: Callable[[str, str], HostsFileError],
) -> object:
    try:
        if key == "name":
            return canonical_name(_text(value))
        if key in ("ssh", "jump"):
            return parse_ssh_target(_text(value))
        if key == "groups":
            items = value if isinstance(value, list) else [value]
            return tuple(dict.fromkeys(canonical_group(_text(g)) for g in items))
        if key == "ip":
            items = value if isinstance(value, list) else [value]
            return tuple(dict.fromkeys(_address(v) for v in items))
        if key == "remote_dir":
            return check_remote_dir(_text(value))
        if key in ("identity", "known_hosts"):
            return base_dir / Path(_text(value)).expanduser()
        return _text(value)  # gateway_address, server_name: checked together per host
    except (PkiError, TargetError, LayoutError, _TypeProblem) as exc:
        raise fail(where, str(exc)) from None


class _TypeProblem(ValueError):
    pass


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _TypeProblem(f"expected text, got {type(value).__name__} {value!r}")
    text = str(value).strip()
    if not text:
        raise _TypeProblem("is empty")
    return text


def _address(value: object) -> IPAddress:
    text = _text(value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _TypeProblem(f"{text!r} is not an IP address such as 10.8.0.5") from None
