"""HELLO/CONFIG codecs and the user-facing close descriptions."""

from __future__ import annotations

import ipaddress

import pytest

from vpnd.proto import (
    CloseCode,
    Hello,
    LocalProtocolError,
    RemoteProtocolError,
    TunnelConfig,
    describe_close,
)


def make_config(**changes: object) -> TunnelConfig:
    fields: dict[str, object] = {
        "address": ipaddress.ip_interface("10.8.0.5/24"),
        "gateway": ipaddress.ip_address("10.8.0.1"),
        "routes": (ipaddress.ip_network("10.8.0.0/24"), ipaddress.ip_network("fd00:8::/64")),
        "mtu": 1400,
        "keepalive_interval": 10.0,
        "keepalive_timeout": 30.0,
        "offload": True,
        "extra_addresses": (ipaddress.ip_interface("fd00:8::5/64"),),
    }
    fields.update(changes)
    return TunnelConfig(**fields)  # type: ignore[arg-type]


def test_tunnel_config_round_trips() -> None:
    cfg = make_config()
    data = cfg.to_json()
    assert TunnelConfig.from_json(data) == cfg
    assert TunnelConfig.from_json(memoryview(data)) == cfg
    assert b'"address":"10.8.0.5/24"' in data


def test_hello_round_trips() -> None:
    hello = Hello(offload=True, software="vpnd/9.9")
    assert Hello.from_json(hello.to_json()) == hello


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mtu": 575}, "'mtu' must be in 576..65535"),
        ({"mtu": True}, "'mtu' must be an integer"),
        ({"keepalive_timeout": 5.0}, "must exceed"),
        ({"keepalive_interval": float("inf")}, "'keepalive_interval' must be between"),
        ({"address": "10.8.0.5/24"}, "'address' must be an IPv4Interface"),
        ({"routes": [ipaddress.ip_network("10.0.0.0/8")]}, "'routes' must be a tuple"),
        ({"offload": 1}, "'offload' must be a boolean"),
    ],
)
def test_invalid_local_config_is_our_error(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        make_config(**changes)


def test_oversized_config_cannot_be_sent() -> None:
    routes = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(800))
    with pytest.raises(LocalProtocolError, match="limit is 8192"):
        make_config(routes=routes).to_json()


def test_remote_errors_are_one_line_and_typed() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        TunnelConfig.from_json(b'{"address": "x\\ny/24"}')
    assert "\n" not in str(info.value)
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_invalid_hello_is_our_error() -> None:
    with pytest.raises(LocalProtocolError, match="unsupported version 2"):
        Hello(version=2)
    with pytest.raises(LocalProtocolError, match="printable"):
        Hello(software="x" * 65)


def test_close_codes_are_stable() -> None:
    assert [(c.name, c.value) for c in CloseCode] == [
        ("NORMAL", 0),
        ("PROTOCOL_ERROR", 1),
        ("KEEPALIVE_TIMEOUT", 2),
        ("CERT_EXPIRED", 3),
        ("REVOKED", 4),
        ("KICKED", 5),
        ("REPLACED", 6),
        ("ADDRESS_CONFLICT", 7),
        ("POLICY", 8),
        ("SHUTDOWN", 9),
        ("AUTH_FAILED", 10),
        ("FRAME_TOO_LARGE", 11),
        ("RESOURCE_LIMIT", 12),
        ("CONFIG_TIMEOUT", 13),
    ]


def test_describe_close_speaks_plainly() -> None:
    assert describe_close(CloseCode.REVOKED, "key compromise") == (
        "the gateway revoked your certificate: key compromise; ask your admin for a new one"
    )
    assert describe_close(CloseCode.CERT_EXPIRED, "2027-01-01 00:00 UTC") == (
        "your certificate expired at 2027-01-01 00:00 UTC; ask your admin for a new one"
    )
    assert describe_close(CloseCode.NORMAL, "") == "the session was closed normally"
    assert describe_close(99, "") == "the session was closed with unknown code 99"
    for code in CloseCode:
        text = describe_close(code, "detail\x1b[31m\n")
        assert "\n" not in text and "\x1b" not in text
        assert text[0].islower() and "{" not in text
