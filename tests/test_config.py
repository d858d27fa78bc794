"""vpnd.config: every key's valid and invalid values, with the exact YAML path of each error."""

from __future__ import annotations

import copy
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpnd.config import (
    ClientConfig,
    ConfigError,
    CrlStale,
    DuplicatePolicy,
    GatewayConfig,
    HostPort,
    LogFormat,
    LogLevel,
    Mode,
    NatMode,
    load_config,
    parse_config,
)

SOURCE = "vpnd.yaml"
REPO = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------


def make_pki(directory: Path) -> None:
    """Non-empty stand-ins for the PKI files (the loader checks presence, not content)."""
    for name in ("ca.pem", "gw.pem", "crl.pem", "alice.pem"):
        (directory / name).write_text("-----BEGIN CERTIFICATE-----\n")
    for name in ("gw.key", "alice.key"):
        key = directory / name
        key.write_text("-----BEGIN PRIVATE KEY-----\n")
        key.chmod(0o600)


def gateway() -> dict[str, Any]:
    return {
        "mode": "gateway",
        "pki": {"ca": "ca.pem", "cert": "gw.pem", "key": "gw.key", "crl": "crl.pem"},
    }


def client() -> dict[str, Any]:
    return {
        "mode": "client",
        "server": "gw.example.net:4443",
        "server_name": "gw.example.net",
        "pki": {"ca": "ca.pem", "cert": "alice.pem", "key": "alice.key"},
    }


def base(mode: str) -> dict[str, Any]:
    return gateway() if mode == "gateway" else client()


def with_value(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    """A deep copy of ``data`` with ``a.b.c`` set to ``value`` (creating mappings)."""
    out = copy.deepcopy(data)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def without(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    del node[last]
    return out


def lookup(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    make_pki(tmp_path)
    return tmp_path


def parse(data: object, directory: Path) -> GatewayConfig | ClientConfig:
    return parse_config(data, source=SOURCE, base_dir=directory)


def parse_error(data: object, directory: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, directory)
    err = info.value
    assert "\n" not in str(err)
    assert str(err).startswith(f"{SOURCE}: ")
    return err


# --- minimal configs and defaults -------------------------------------------------------


def test_minimal_gateway_gets_every_default(pki_dir: Path) -> None:
    cfg = parse(gateway(), pki_dir)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.mode is Mode.GATEWAY
    assert cfg.listen == HostPort("0.0.0.0", 4443)
    assert cfg.push_routes == ()
    assert cfg.nat is NatMode.NONE
    assert cfg.forwarding is True
    assert cfg.duplicate is DuplicatePolicy.REPLACE
    assert cfg.policy.rules == ()
    assert cfg.nftables.anti_spoofing is False
    assert cfg.nftables.forward_filter is True
    assert cfg.pki.ca == pki_dir / "ca.pem"
    assert cfg.pki.crl == pki_dir / "crl.pem"
    assert cfg.pki.key_passphrase_file is None
    assert cfg.pki.crl_stale is CrlStale.DENY
    assert cfg.pki.expiry_warning_days == 14
    assert (cfg.tun.name, cfg.tun.mtu, cfg.tun.offload) == ("vpn0", 1400, True)
    assert (cfg.keepalive.interval, cfg.keepalive.timeout) == (10.0, 30.0)
    assert cfg.handshake_timeout == 10.0
    assert cfg.control_socket == Path("/run/vpnd/vpnd.sock")
    assert cfg.metrics.listen is None
    assert (cfg.log.level, cfg.log.format) == (LogLevel.INFO, LogFormat.TEXT)
    assert cfg.limits.max_sessions == 10000
    assert cfg.limits.max_pending_handshakes == 256
    assert cfg.limits.max_pending_per_source == 16
    assert cfg.limits.max_frame == 262144
    assert cfg.limits.peer_queue_bytes == 4194304
    assert cfg.warnings == ()
    assert cfg.source == SOURCE


def test_minimal_client(pki_dir: Path) -> None:
    cfg = parse(client(), pki_dir)
    assert isinstance(cfg, ClientConfig)
    assert cfg.mode is Mode.CLIENT
    assert cfg.server == HostPort("gw.example.net", 4443)
    assert cfg.server_name == "gw.example.net"
    assert (cfg.reconnect.initial_delay, cfg.reconnect.max_delay) == (1.0, 30.0)
    assert cfg.pki.crl is None


def test_config_is_frozen_and_hashable(pki_dir: Path) -> None:
    cfg = parse(gateway(), pki_dir)
    with pytest.raises(AttributeError):
        cfg.tun = cfg.tun  # type: ignore[misc]
    assert hash(cfg) == hash(parse(gateway(), pki_dir))


def test_null_section_means_its_defaults(pki_dir: Path) -> None:
    cfg = parse(with_value(gateway(), "tun", None), pki_dir)
    assert cfg.tun.mtu == 1400


# --- valid values, one key at a time ----------------------------------------------------

V4 = ipaddress.IPv4Network
VALID: list[tuple[str, str, object, str, object]] = [
    # mode, key, yaml value, attribute, expected
    ("gateway", "listen", "0.0.0.0:4443", "listen", HostPort("0.0.0.0", 4443)),
    ("gateway", "listen", "[::]:4443", "listen", HostPort("::", 4443)),
    ("gateway", "listen", "127.0.0.1:1", "listen", HostPort("127.0.0.1", 1)),
    ("gateway", "listen", "[::1]:65535", "listen", HostPort("::1", 65535)),
    ("gateway", "push_routes", [], "push_routes", ()),
    (
        "gateway",
        "push_routes",
        ["192.168.50.0/24", "10.0.0.0/8"],
        "push_routes",
        (V4("192.168.50.0/24"), V4("10.0.0.0/8")),
    ),
    (
        "gateway",
        "push_routes",
        ["2001:db8::/32"],
        "push_routes",
        (ipaddress.IPv6Network("2001:db8::/32"),),
    ),
    ("gateway", "nat", "masquerade", "nat", NatMode.MASQUERADE),
    ("gateway", "nat", "none", "nat", NatMode.NONE),
    ("gateway", "forwarding", False, "forwarding", False),
    ("gateway", "duplicate", "reject", "duplicate", DuplicatePolicy.REJECT),
    ("gateway", "nftables", {"anti_spoofing": True}, "nftables.anti_spoofing", True),
    ("gateway", "nftables", {}, "nftables.anti_spoofing", False),
    ("gateway", "nftables", {}, "nftables.forward_filter", True),
    ("gateway", "nftables", {"forward_filter": False}, "nftables.forward_filter", False),
    ("client", "server", "192.0.2.1:4443", "server", HostPort("192.0.2.1", 4443)),
    ("client", "server", "[2001:db8::1]:443", "server", HostPort("2001:db8::1", 443)),
    ("client", "server", "GW.Example.NET:4443", "server", HostPort("gw.example.net", 4443)),
    ("client", "server", "localhost:4443", "server", HostPort("localhost", 4443)),
    ("client", "server_name", "Gw.Example.Net", "server_name", "gw.example.net"),
    ("client", "server_name", "gateway", "server_name", "gateway"),
    ("client", "reconnect.initial_delay", 2, "reconnect.initial_delay", 2.0),
    ("client", "reconnect.initial_delay", 0.25, "reconnect.initial_delay", 0.25),
    ("client", "reconnect.max_delay", 1.0, "reconnect.max_delay", 1.0),
    ("client", "pki.crl", "crl.pem", "pki.crl", "crl.pem"),
    ("client", "pki.crl", None, "pki.crl", None),
    ("gateway", "pki.crl_stale", "allow", "pki.crl_stale", CrlStale.ALLOW),
    ("gateway", "pki.expiry_warning_days", 0, "pki.expiry_warning_days", 0),
    ("gateway", "pki.expiry_warning_days", 3650, "pki.expiry_warning_days", 3650),
    ("gateway", "pki.key_passphrase_file", None, "pki.key_passphrase_file", None),
    ("gateway", "tun.name", "tun-a.b_0", "tun.name", "tun-a.b_0"),
    ("gateway", "tun.name", "a" * 15, "tun.name", "a" * 15),
    ("gateway", "tun.mtu", 576, "tun.mtu", 576),
    ("gateway", "tun.mtu", 65535, "tun.mtu", 65535),
    ("gateway", "tun.offload", False, "tun.offload", False),
    ("gateway", "keepalive.interval", 1, "keepalive.interval", 1.0),
    ("gateway", "keepalive.interval", 0.5, "keepalive.interval", 0.5),
    ("gateway", "keepalive.timeout", 10.5, "keepalive.timeout", 10.5),
    ("client", "handshake_timeout", 3, "handshake_timeout", 3.0),
    ("client", "handshake_timeout", 2.5, "handshake_timeout", 2.5),
    ("gateway", "control_socket", "/tmp/v.sock", "control_socket", Path("/tmp/v.sock")),
    ("gateway", "metrics.listen", "127.0.0.1:9469", "metrics.listen", HostPort("127.0.0.1", 9469)),
    ("gateway", "metrics.listen", "[::1]:9469", "metrics.listen", HostPort("::1", 9469)),
    ("gateway", "metrics.listen", None, "metrics.listen", None),
    ("gateway", "log.level", "debug", "log.level", LogLevel.DEBUG),
    ("gateway", "log.level", "warning", "log.level", LogLevel.WARNING),
    ("gateway", "log.level", "error", "log.level", LogLevel.ERROR),
    ("gateway", "log.format", "json", "log.format", LogFormat.JSON),
    ("gateway", "limits.max_sessions", 1, "limits.max_sessions", 1),
    ("gateway", "limits.max_pending_handshakes", 16, "limits.max_pending_handshakes", 16),
    ("gateway", "limits.max_pending_per_source", 256, "limits.max_pending_per_source", 256),
    ("gateway", "limits.max_frame", 69632, "limits.max_frame", 69632),
    ("gateway", "limits.peer_queue_bytes", 262144, "limits.peer_queue_bytes", 262144),
]


@pytest.mark.parametrize("case", VALID, ids=lambda c: f"{c[1]}={c[2]!r}")
def test_valid_value(pki_dir: Path, case: tuple[str, str, object, str, object]) -> None:
    mode, key, value, attr, expected = case
    cfg = parse(with_value(base(mode), key, value), pki_dir)
    got = lookup(cfg, attr)
    if type(expected) is str and attr.startswith("pki."):
        expected = pki_dir / expected
    assert got == expected
    assert type(got) is type(expected)


# --- invalid values: the error names the exact path ------------------------------------

INVALID: list[tuple[str, str, object, str, str]] = [
    # mode, key set, bad value, expected error path, expected fragment of the detail
    ("gateway", "mode", "server", "mode", "expected one of gateway | client, got 'server'"),
    ("gateway", "mode", None, "mode", "got null"),
    ("gateway", "listen", "0.0.0.0", "listen", "which has no :port"),
    ("gateway", "listen", "0.0.0.0:0", "listen", "port is not 1..65535"),
    ("gateway", "listen", "0.0.0.0:65536", "listen", "port is not 1..65535"),
    ("gateway", "listen", "0.0.0.0:44a", "listen", "port is not 1..65535"),
    ("gateway", "listen", ":::4443", "listen", "IPv6 address must be in brackets"),
    ("gateway", "listen", "[::1]4443", "listen", "no ]:port"),
    ("gateway", "listen", "[1.2.3.4]:4443", "listen", "does not hold an IPv6 address"),
    ("gateway", "listen", "gw.example.net:4443", "listen", "is not an IP address"),
    ("gateway", "listen", 4443, "listen", "got 4443"),
    ("gateway", "push_routes", "10.0.0.0/8", "push_routes", "expected a list"),
    ("gateway", "push_routes", ["10.0.0.1/8"], "push_routes[0]", "did you mean '10.0.0.0/8'"),
    ("gateway", "push_routes", ["10.0.0.0/8", "bogus"], "push_routes[1]", "got 'bogus'"),
    ("gateway", "push_routes", ["10.0.0.0/33"], "push_routes[0]", "expected a network"),
    ("gateway", "push_routes", ["10.0.0.0/8", "10.0.0.0/8"], "push_routes[1]", "listed twice"),
    ("gateway", "push_routes", [17], "push_routes[0]", "got 17"),
    ("gateway", "nat", "snat", "nat", "expected one of none | masquerade, got 'snat'"),
    ("gateway", "nat", False, "nat", "got false (a boolean)"),
    ("gateway", "forwarding", "true", "forwarding", "expected true or false"),
    ("gateway", "forwarding", 1, "forwarding", "expected true or false, got 1"),
    ("gateway", "duplicate", "kick", "duplicate", "expected one of replace | reject"),
    ("gateway", "nftables", {"anti_spoof": True}, "nftables.anti_spoof", "'anti_spoofing'"),
    ("gateway", "nftables", {"anti_spoofing": "no"}, "nftables.anti_spoofing", "true or false"),
    ("gateway", "nftables", [], "nftables", "expected a mapping"),
    ("gateway", "nftables", {"forward_filter": "off"}, "nftables.forward_filter", "true or false"),
    ("client", "server", "gw.example.net", "server", "no :port"),
    ("client", "server", "gw..example.net:4443", "server", "is not a valid DNS name"),
    ("client", "server", "-gw.example.net:4443", "server", "is not a valid DNS name"),
    ("client", "server", "1.2.3:4443", "server", "neither a valid IP address nor a DNS name"),
    ("client", "server", ":4443", "server", "host is empty"),
    ("client", "server", "gw.example.net:99999", "server", "port is not 1..65535"),
    ("client", "server", "gw_1.example.net:1", "server", "not a valid DNS name"),
    ("client", "server_name", "192.0.2.1", "server_name", "got the IP address"),
    ("client", "server_name", "", "server_name", "expected a DNS name"),
    ("client", "server_name", "gw example", "server_name", "not a valid DNS name"),
    ("client", "server_name", "bücher.example", "server_name", "not ASCII"),
    ("client", "reconnect.initial_delay", 0, "reconnect.initial_delay", "> 0"),
    ("client", "reconnect.initial_delay", -1, "reconnect.initial_delay", "got -1"),
    ("client", "reconnect.initial_delay", "1s", "reconnect.initial_delay", "got '1s'"),
    ("client", "reconnect.max_delay", 0.5, "reconnect.max_delay", "at least reconnect.initial"),
    ("client", "reconnect.max_delay", float("inf"), "reconnect.max_delay", "got inf"),
    ("client", "reconnect.max_delay", float("nan"), "reconnect.max_delay", "got nan"),
    ("client", "reconnect.jitter", 0.1, "reconnect.jitter", "unknown key"),
    ("gateway", "pki.ca", None, "pki.ca", "expected a file path, got null"),
    ("gateway", "pki.ca", "", "pki.ca", "expected a file path, got ''"),
    ("gateway", "pki.ca", ["ca.pem"], "pki.ca", "expected a file path, got a list"),
    ("gateway", "pki.ca", "missing.pem", "pki.ca", "missing.pem: No such file or directory"),
    ("gateway", "pki.cert", ".", "pki.cert", "is not a regular file"),
    ("gateway", "pki.crl", None, "pki.crl", "got null"),
    ("gateway", "pki.crl_stale", "warn", "pki.crl_stale", "expected one of deny | allow"),
    ("gateway", "pki.expiry_warning_days", -1, "pki.expiry_warning_days", "0..3650"),
    ("gateway", "pki.expiry_warning_days", 1.5, "pki.expiry_warning_days", "got 1.5"),
    ("gateway", "pki.key_passphrase_file", "nope", "pki.key_passphrase_file", "No such file"),
    ("gateway", "pki.keyfile", "gw.key", "pki.keyfile", "did you mean 'key'?"),
    ("gateway", "pki", "pki/", "pki", "expected a mapping"),
    ("gateway", "tun.name", "", "tun.name", "expected an interface name"),
    ("gateway", "tun.name", "a" * 16, "tun.name", "1-15 characters"),
    ("gateway", "tun.name", "vpn 0", "tun.name", "got 'vpn 0'"),
    ("gateway", "tun.name", "vpn/0", "tun.name", "got 'vpn/0'"),
    ("gateway", "tun.name", "..", "tun.name", "got '..'"),
    ("gateway", "tun.name", 0, "tun.name", "got 0"),
    ("gateway", "tun.mtu", "big", "tun.mtu", "expected an integer 576..65535, got 'big'"),
    ("gateway", "tun.mtu", "1400", "tun.mtu", "got '1400' (a quoted string)"),
    ("gateway", "tun.mtu", True, "tun.mtu", "got true (a boolean)"),
    ("gateway", "tun.mtu", 1400.0, "tun.mtu", "got 1400.0"),
    ("gateway", "tun.mtu", 575, "tun.mtu", "got 575"),
    ("gateway", "tun.mtu", 65536, "tun.mtu", "got 65536"),
    ("gateway", "tun.offload", "auto", "tun.offload", "expected true or false, got 'auto'"),
    ("gateway", "tun.mut", 1400, "tun.mut", "did you mean 'mtu'?"),
    ("gateway", "keepalive.interval", 0, "keepalive.interval", "> 0"),
    ("gateway", "keepalive.interval", True, "keepalive.interval", "got true (a boolean)"),
    ("gateway", "keepalive.interval", "10", "keepalive.interval", "got '10' (a quoted string)"),
    ("gateway", "keepalive.timeout", 10, "keepalive.timeout", "greater than keepalive.interval"),
    ("gateway", "keepalive.timeout", 10**400, "keepalive.timeout", "<= 86400"),
    ("gateway", "handshake_timeout", 0, "handshake_timeout", "got 0"),
    ("gateway", "handshake_timeout", 301, "handshake_timeout", "<= 300"),
    ("gateway", "handshake_timeout", None, "handshake_timeout", "got null"),
    ("gateway", "control_socket", "/" + "s" * 200, "control_socket", "longer than the 107"),
    ("gateway", "control_socket", 5, "control_socket", "expected a file path, got 5"),
    ("gateway", "metrics.listen", "localhost:9469", "metrics.listen", "not an IP address"),
    ("gateway", "metrics.listen", True, "metrics.listen", "got true"),
    ("gateway", "metrics.port", 9469, "metrics.port", "unknown key"),
    ("gateway", "log.level", "INFO", "log.level", "got 'INFO'"),
    ("gateway", "log.level", "verbose", "log.level", "debug | info | warning | error"),
    ("gateway", "log.format", "xml", "log.format", "expected one of text | json"),
    ("gateway", "limits.max_sessions", 0, "limits.max_sessions", "1..1000000"),
    ("gateway", "limits.max_pending_handshakes", 0, "limits.max_pending_handshakes", "got 0"),
    (
        "gateway",
        "limits.max_pending_per_source",
        300,
        "limits.max_pending_per_source",
        "expected an integer 1..256 (at most max_pending_handshakes), got 300",
    ),
    ("gateway", "limits.max_frame", 4096, "limits.max_frame", "69632..16777216"),
    ("gateway", "limits.max_frame", "256k", "limits.max_frame", "got '256k'"),
    ("gateway", "limits.peer_queue_bytes", 1000, "limits.peer_queue_bytes", "262144.."),
    ("gateway", "limits.max_session", 1, "limits.max_session", "did you mean 'max_sessions'?"),
    ("gateway", "tls", {}, "tls", "unknown key"),
    ("gateway", "listne", "0.0.0.0:1", "listne", "did you mean 'listen'?"),
    ("client", "sever", "gw:1", "sever", "did you mean 'server'?"),
]


@pytest.mark.parametrize("case", INVALID, ids=lambda c: f"{c[1]}={c[2]!r}"[:60])
def test_invalid_value(pki_dir: Path, case: tuple[str, str, object, str, str]) -> None:
    mode, key, value, path, fragment = case
    err = parse_error(with_value(base(mode), key, value), pki_dir)
    assert err.path == path
    assert fragment in err.detail
    assert str(err) == f"{SOURCE}: {path}: {err.detail}"


def test_exact_message_for_the_documented_example(pki_dir: Path) -> None:
    err = parse_error(with_value(gateway(), "tun.mtu", "big"), pki_dir)
    assert str(err) == f"{SOURCE}: tun.mtu: expected an integer 576..65535, got 'big'"


def test_unknown_key_lists_the_valid_ones(pki_dir: Path) -> None:
    err = parse_error(with_value(gateway(), "tun.mut", 1400), pki_dir)
    assert err.detail == "unknown key; did you mean 'mtu'? (valid keys: name, mtu, offload)"


def test_unknown_key_without_a_close_match_has_no_suggestion(pki_dir: Path) -> None:
    err = parse_error(with_value(gateway(), "tun.zzzz", 1), pki_dir)
    assert "did you mean" not in err.detail


def test_non_string_key(pki_dir: Path) -> None:
    err = parse_error(with_value(gateway(), "tun", {1: 2}), pki_dir)
    assert err.path == "tun"
    assert "keys must be strings, got the key 1" in err.detail


# --- required keys and mode-specific keys ------------------------------------------------

MISSING = [
    ("gateway", "mode"),
    ("gateway", "pki"),
    ("gateway", "pki.ca"),
    ("gateway", "pki.cert"),
    ("gateway", "pki.key"),
    ("gateway", "pki.crl"),
    ("client", "server"),
    ("client", "server_name"),
    ("client", "pki.key"),
]


@pytest.mark.parametrize(("mode", "key"), MISSING)
def test_missing_required_key(pki_dir: Path, mode: str, key: str) -> None:
    err = parse_error(without(base(mode), key), pki_dir)
    assert err.path == key
    assert err.detail.startswith("required key missing; expected ")


WRONG_MODE = [
    ("client", "listen", "0.0.0.0:1"),
    ("client", "push_routes", []),
    ("client", "nat", "none"),
    ("client", "forwarding", True),
    ("client", "duplicate", "replace"),
    ("client", "policy", {}),
    ("client", "nftables", {}),
    ("gateway", "server", "gw:1"),
    ("gateway", "server_name", "gw"),
    ("gateway", "reconnect", {}),
]


@pytest.mark.parametrize(("mode", "key", "value"), WRONG_MODE)
def test_key_of_the_other_mode(pki_dir: Path, mode: str, key: str, value: object) -> None:
    err = parse_error(with_value(base(mode), key, value), pki_dir)
    other = "gateway" if mode == "client" else "client"
    assert err.path == key
    assert err.detail == f"valid only in {other} mode, but mode is {mode}; remove it"


# --- files: resolution, permissions, warnings --------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "vpnd"
    (etc / "pki").mkdir(parents=True)
    make_pki(etc / "pki")
    (etc / "gw.yaml").write_text(
        "mode: gateway\n"
        "pki: {ca: pki/ca.pem, cert: pki/gw.pem, key: pki/gw.key, crl: pki/crl.pem}\n"
        "control_socket: run/vpnd.sock\n"
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: resolution must not depend on the cwd
    cfg = load_config("etc/vpnd/gw.yaml")
    assert cfg.pki.cert == etc / "pki" / "gw.pem"
    assert cfg.pki.cert.is_absolute()
    assert cfg.control_socket == etc / "run" / "vpnd.sock"
    assert cfg.source == "etc/vpnd/gw.yaml"


def test_absolute_paths_are_kept(pki_dir: Path, tmp_path: Path) -> None:
    data = with_value(gateway(), "pki.ca", str(pki_dir / "ca.pem"))
    elsewhere = tmp_path / "elsewhere"
    cfg = parse_config(data, source=SOURCE, base_dir=elsewhere, check_files=False)
    assert cfg.pki.ca == pki_dir / "ca.pem"
    assert cfg.pki.cert == elsewhere / "gw.pem"


def test_world_readable_key_is_an_error(pki_dir: Path) -> None:
    (pki_dir / "gw.key").chmod(0o644)
    err = parse_error(gateway(), pki_dir)
    assert err.path == "pki.key"
    assert "readable by every user (mode 0644)" in err.detail
    assert f"chmod 600 {pki_dir / 'gw.key'}" in err.detail


def test_group_readable_key_is_a_warning(pki_dir: Path) -> None:
    (pki_dir / "gw.key").chmod(0o640)
    cfg = parse(gateway(), pki_dir)
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(f"{SOURCE}: pki.key: ")
    assert "readable by its group (mode 0640)" in cfg.warnings[0]


def test_world_readable_passphrase_file_is_an_error(pki_dir: Path) -> None:
    secret = pki_dir / "pass.txt"
    secret.write_text("hunter2\n")
    secret.chmod(0o604)
    err = parse_error(with_value(gateway(), "pki.key_passphrase_file", "pass.txt"), pki_dir)
    assert err.path == "pki.key_passphrase_file"
    assert "hunter2" not in str(err)


def test_empty_pki_file_is_an_error(pki_dir: Path) -> None:
    (pki_dir / "crl.pem").write_text("")
    err = parse_error(gateway(), pki_dir)
    assert err.path == "pki.crl"
    assert err.detail == f"{pki_dir / 'crl.pem'} is empty"


def test_fifo_is_refused_without_blocking(pki_dir: Path) -> None:
    os.mkfifo(pki_dir / "fifo.pem")
    err = parse_error(with_value(gateway(), "pki.ca", "fifo.pem"), pki_dir)
    assert err.path == "pki.ca"
    assert "is not a regular file" in err.detail


def test_nul_in_a_path_is_a_config_error(pki_dir: Path) -> None:
    err = parse_error(with_value(gateway(), "pki.ca", "ca\0.pem"), pki_dir)
    assert err.path == "pki.ca"


def test_check_files_false_skips_existence(tmp_path: Path) -> None:
    cfg = parse_config(gateway(), source=SOURCE, base_dir=tmp_path, check_files=False)
    assert cfg.pki.ca == tmp_path / "ca.pem"


def test_warnings_for_risky_choices(pki_dir: Path) -> None:
    data = with_value(gateway(), "pki.crl_stale", "allow")
    data = with_value(data, "metrics.listen", "0.0.0.0:9469")
    cfg = parse(data, pki_dir)
    paths = [w.split(": ")[1] for w in cfg.warnings]
    assert paths == ["pki.crl_stale", "metrics.listen"]


# --- whole files: YAML problems -------------------------------------------------------------


def load_text(tmp_path: Path, text: str | bytes) -> GatewayConfig | ClientConfig:
    make_pki(tmp_path)
    path = tmp_path / "vpnd.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return load_config(path)


def load_text_error(tmp_path: Path, text: str | bytes) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{tmp_path / 'vpnd.yaml'}: ")
    return info.value


GOOD_YAML = "mode: gateway\npki:\n  ca: ca.pem\n  cert: gw.pem\n  key: gw.key\n  crl: crl.pem\n"


def test_load_a_good_file(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, GOOD_YAML)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.pki.key == tmp_path / "gw.key"


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    err = load_text_error(tmp_path, GOOD_YAML + "tun:\n  mtu: 1400\n  name: a\n  mtu: 9000\n")
    assert err.path == "tun.mtu"
    assert err.detail == (
        "duplicate key 'mtu' at line 10 (first at line 8); "
        "YAML would silently keep only the last one"
    )


def test_duplicate_top_level_key_quoted_and_plain(tmp_path: Path) -> None:
    err = load_text_error(tmp_path, GOOD_YAML + "'mode': client\n")
    assert err.path == "mode"


def test_duplicate_key_inside_a_list(tmp_path: Path) -> None:
    text = GOOD_YAML + "policy:\n  rules:\n    - {from: any, to: any, proto: any, to: any}\n"
    err = load_text_error(tmp_path, text)
    assert err.path == "policy.rules[0].to"


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = GOOD_YAML + "log: &l {level: info}\nmetrics: {listen: null}\n"
    assert load_text(tmp_path, text).log.level is LogLevel.INFO


BAD_FILES: list[tuple[str, str | bytes, str]] = [
    ("empty", "", "the file is empty; expected a YAML mapping of settings"),
    ("comments only", "# nothing\n", "the file is empty"),
    ("a list", "- mode\n", "expected a mapping (the vpnd settings), got a list"),
    ("a scalar", "gateway\n", "expected a mapping (the vpnd settings), got 'gateway'"),
    ("null", "~\n", "expected a mapping (the vpnd settings), got null"),
    ("bad indent", "mode: gateway\n pki: x\n", "line 2, column 5: invalid YAML"),
    ("unclosed", "mode: [gateway\n", "invalid YAML"),
    (
        "two docs",
        "mode: gateway\n---\nmode: client\n",
        "line 2, column 1: invalid YAML: expected a single document",
    ),
    ("python tag", "mode: !!python/object:os.system x\n", "line 1, column 7: invalid YAML"),
    ("custom tag", "mode: !foo x\n", "invalid YAML"),
    ("bad date", "mode: 2024-13-45\n", "invalid YAML value"),
    ("not utf-8", b"mode: \xff\xfe gateway\n", "not valid UTF-8 (at byte 6)"),
    ("control char", "mode: \x01\n", "invalid YAML"),
    ("deep", "[" * 5000 + "]" * 5000, "invalid YAML"),
    ("unhashable key", "? [a, b]\n: 1\n", "invalid YAML"),
]


@pytest.mark.parametrize(
    ("text", "fragment"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file(tmp_path: Path, text: str | bytes, fragment: str) -> None:
    err = load_text_error(tmp_path, text)
    assert err.path == ""
    assert fragment in err.detail


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    err = load_text_error(tmp_path, GOOD_YAML + "tun:\n  mtu: 1400\n    name: x\n")
    assert err.detail.startswith("line 9, column ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "No such file or directory" in str(info.value)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(tmp_path)


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="more than the 1048576 allowed"):
        load_config(path)


# --- the shipped examples ----------------------------------------------------------------


def test_example_gateway_loads() -> None:
    cfg = load_config(REPO / "config" / "gateway.yaml", check_files=False)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.policy.rules, "the example gateway should use the example policy"
    assert cfg.policy.source == str(REPO / "config" / "policy.yaml")
    assert cfg.metrics.listen == HostPort("127.0.0.1", 9469)
    assert cfg.warnings == ()


def test_example_client_loads() -> None:
    cfg = load_config(REPO / "config" / "client.yaml", check_files=False)
    assert isinstance(cfg, ClientConfig)
    assert cfg.server == HostPort("gw.example.net", 4443)


@pytest.mark.parametrize("name", ["gateway.yaml", "client.yaml"])
def test_examples_show_every_key(name: str) -> None:
    import yaml

    from vpnd.config.loader import (
        CLIENT_KEYS,
        COMMON_KEYS,
        GATEWAY_KEYS,
        GATEWAY_PKI_KEYS,
        PKI_KEYS,
    )

    data = yaml.safe_load((REPO / "config" / name).read_text())
    expected = {*COMMON_KEYS, *(GATEWAY_KEYS if name == "gateway.yaml" else CLIENT_KEYS)}
    assert set(data) == expected
    pki_keys = set(PKI_KEYS) - (set() if name == "gateway.yaml" else set(GATEWAY_PKI_KEYS))
    assert set(data["pki"]) == pki_keys
    assert set(data["limits"]) == {
        "max_sessions",
        "max_pending_handshakes",
        "max_pending_per_source",
        "max_pending_per_subnet",
        "max_frame",
        "peer_queue_bytes",
        "peer_turn_packets",
    }


# --- fuzz: anything at all gives a ConfigError or a Config ---------------------------------

KEYS = [
    "mode", "pki", "ca", "cert", "key", "crl", "crl_stale", "tun", "name", "mtu", "offload",
    "listen", "server", "server_name", "policy", "rules", "from", "to", "proto", "ports",
    "groups", "group", "peer", "conntrack", "limits", "max_frame", "keepalive", "interval",
    "timeout", "metrics", "log", "level", "push_routes", "reconnect", "max_delay",
]  # fmt: skip
LITERALS = "gateway client any tcp icmp ca.pem 0.0.0.0:1 10.0.0.0/8 1-2 [::1]:9 eng /dev/zero ."
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", *LITERALS.split()]),
)
DATA = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=6
        ),
    ),
    max_leaves=30,
)


DOTTED = [
    *("mode", "listen", "push_routes", "nat", "forwarding", "duplicate", "policy", "nftables"),
    *(
        "nftables.anti_spoofing",
        "nftables.forward_filter",
        "server",
        "server_name",
        "reconnect",
        "reconnect.initial_delay",
    ),
    *("reconnect.max_delay", "pki", "pki.ca", "pki.cert", "pki.key", "pki.key_passphrase_file"),
    *("pki.crl", "pki.crl_stale", "pki.expiry_warning_days", "tun", "tun.name", "tun.mtu"),
    *("tun.offload", "keepalive", "keepalive.interval", "keepalive.timeout"),
    *("handshake_timeout", "control_socket", "metrics", "metrics.listen", "log", "log.level"),
    *("log.format", "limits", "limits.max_sessions", "limits.max_pending_handshakes"),
    *("limits.max_pending_per_source", "limits.max_frame", "limits.peer_queue_bytes"),
    *("policy.rules", "policy.conntrack", "policy.conntrack.tcp_timeout"),
]
VALUES = st.one_of(SCALARS, DATA)  # scalars twice as likely: they reach deeper checks
NAMES = st.one_of(st.sampled_from(["eng", "Eng", "a_b", "-x", ""]), VALUES)
SELECTOR = st.one_of(
    st.sampled_from(["any", "10.0.0.0/8", "10.0.0.1/8", "nope"]),
    st.fixed_dictionaries(
        {}, optional={"groups": st.lists(NAMES, max_size=3), "group": NAMES, "peer": NAMES}
    ),
    VALUES,
)
PORTS = st.lists(st.one_of(st.integers(-5, 70000), st.text("0123456789-", max_size=11), VALUES))
RULE = st.fixed_dictionaries(
    {
        "from": SELECTOR,
        "to": SELECTOR,
        "proto": st.one_of(st.sampled_from(["any", "icmp", "tcp", "udp"]), VALUES),
    },
    optional={"ports": st.one_of(PORTS, VALUES), "bogus": VALUES},
)
GOOD_RULE = {"from": {"groups": ["eng"]}, "to": {"peer": "bob"}, "proto": "tcp", "ports": [22]}
RULE_SPOTS = ["from", "to", "proto", "ports", "from.groups", "from.peer", "to.group", "ports[]"]


def rule_with(spot: str, value: object) -> dict[str, Any]:
    if spot == "ports[]":
        return {**GOOD_RULE, "ports": [22, value]}
    return overlay(GOOD_RULE, spot, value) if "." not in spot else _rule_sub(spot, value)


def _rule_sub(spot: str, value: object) -> dict[str, Any]:
    # A selector mapping must hold exactly one key: replace it rather than add to it.
    outer, inner = spot.split(".")
    return {**GOOD_RULE, outer: {inner: value}}


def overlay(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    """Like with_value, but replaces whatever non-mapping sits on the way."""
    out = copy.deepcopy(data)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return out


def assert_only_config_errors(data: object, directory: Path) -> None:
    try:
        parse_config(data, source=SOURCE, base_dir=directory)
    except ConfigError as err:
        assert "\n" not in str(err)
        assert err.path == "" or str(err).startswith(f"{SOURCE}: {err.path}: ")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(["gateway", "client"]),
    changes=st.lists(st.tuples(st.sampled_from(DOTTED), VALUES), min_size=1, max_size=6),
    rules=st.lists(RULE, max_size=3),
    rule_change=st.tuples(st.sampled_from(RULE_SPOTS), VALUES),
    raw=DATA,
)
def test_random_data_only_ever_raises_config_error(
    pki_dir: Path,
    *,
    mode: str,
    changes: list[tuple[str, object]],
    rules: list[object],
    rule_change: tuple[str, object],
    raw: object,
) -> None:
    # Shapes: anything at all; a valid base with one random value at a real key (so no
    # earlier error masks it), then with all of them; a gateway with random rules.
    assert_only_config_errors(raw, pki_dir)
    combined = base(mode)
    for dotted, value in changes:
        assert_only_config_errors(overlay(base(mode), dotted, value), pki_dir)
        combined = overlay(combined, dotted, value)
    assert_only_config_errors(combined, pki_dir)
    assert_only_config_errors({**gateway(), "policy": {"rules": rules}}, pki_dir)
    rule = rule_with(*rule_change)
    assert_only_config_errors({**gateway(), "policy": {"rules": [GOOD_RULE, rule]}}, pki_dir)
