"""Config keys of the certificate lifecycle: pki.issuer/inventory, renewal, enrollment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_config import client, gateway, make_pki, parse, parse_error, with_value

from vpnd.config import ClientConfig, GatewayConfig
from vpnd.config.durations import DurationError, format_duration, parse_duration


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    make_pki(tmp_path)
    (tmp_path / "issuer.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    key = tmp_path / "issuer.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    (tmp_path / "inventory.sqlite").write_bytes(b"SQLite format 3\0")
    return tmp_path


def online(**extra: Any) -> dict[str, Any]:
    data = gateway()
    data["pki"]["issuer"] = {"cert": "issuer.pem", "key": "issuer.key"}
    data["pki"]["inventory"] = "inventory.sqlite"
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("24h", 86400.0), ("7d", 604800.0),
     ("2w", 1209600.0), ("1.5h", 5400.0), (" 7D ", 604800.0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "7 days", "-1d", "1e9999", "3y", "1d2h"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(DurationError, match="24h"):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (604800.0, 86400.0, 5400.0, 90.0, 0.5, 1209600.0):
        assert parse_duration(format_duration(seconds)) == seconds


def test_defaults_are_off_on_the_gateway_and_on_for_the_client(pki_dir: Path) -> None:
    gw = parse(gateway(), pki_dir)
    assert isinstance(gw, GatewayConfig)
    assert gw.pki.issuer is None and gw.pki.inventory is None
    assert gw.renewal.enabled is False and gw.renewal.quarantine_grace == 0
    assert gw.renewal.lifetime == 7 * 86400
    assert gw.enrollment.enabled is False
    cl = parse(client(), pki_dir)
    assert isinstance(cl, ClientConfig)
    assert cl.renewal.enabled is True and cl.renewal.at == 0.67


def test_online_gateway(pki_dir: Path) -> None:
    data = online(
        renewal={"enabled": True, "lifetime": "2d", "quarantine_grace": "14d"},
        enrollment={"enabled": True, "rate": 2, "burst": 3},
    )
    cfg = parse(data, pki_dir)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.pki.issuer is not None
    assert cfg.pki.issuer.key == pki_dir / "issuer.key"
    assert cfg.pki.issuer.crl == pki_dir / "issuer-crl.pem"  # default: beside the cert
    assert cfg.pki.inventory == pki_dir / "inventory.sqlite"
    assert cfg.renewal.lifetime == 2 * 86400 and cfg.renewal.quarantine_grace == 14 * 86400
    assert (cfg.enrollment.rate, cfg.enrollment.burst) == (2, 3)
    assert cfg.warnings == ()


@pytest.mark.parametrize("section", ["renewal", "enrollment"])
def test_online_signing_needs_issuer_and_inventory(pki_dir: Path, section: str) -> None:
    err = parse_error(with_value(gateway(), f"{section}.enabled", True), pki_dir)
    assert f"{section}.enabled" in str(err) and "vpnctl ca issuer" in str(err)
    data = online(**{section: {"enabled": True}})
    del data["pki"]["inventory"]
    assert "pki.inventory" in str(parse_error(data, pki_dir))


def test_world_readable_issuer_key_is_refused(pki_dir: Path) -> None:
    (pki_dir / "issuer.key").chmod(0o644)
    err = parse_error(online(), pki_dir)
    assert "pki.issuer.key" in str(err) and "chmod 600" in str(err)


def test_quarantine_needs_renewal(pki_dir: Path) -> None:
    err = parse_error(online(renewal={"quarantine_grace": "1d"}), pki_dir)
    assert "renewal.quarantine_grace" in str(err)


@pytest.mark.parametrize(
    ("dotted", "value", "expect"),
    [
        ("renewal.lifetime", "7 days", "renewal.lifetime"),
        ("renewal.lifetime", "5s", "renewal.lifetime"),
        ("renewal.lifetime", "2y", "renewal.lifetime"),
        ("renewal.quarantine_grace", -1, "renewal.quarantine_grace"),
        ("renewal.enabled", "yes", "renewal.enabled"),
        ("renewal.surprise", 1, "renewal.surprise"),
        ("enrollment.rate", 0, "enrollment.rate"),
        ("pki.inventory_poll", "2h", "pki.inventory_poll"),
        ("pki.issuer.cert", "missing.pem", "pki.issuer.cert"),
    ],
)
def test_bad_values_name_their_path(pki_dir: Path, dotted: str, value: object, expect: str) -> None:
    assert expect in str(parse_error(with_value(online(), dotted, value), pki_dir))


@pytest.mark.parametrize("key", ["issuer", "inventory", "inventory_poll"])
def test_client_refuses_gateway_pki_keys(pki_dir: Path, key: str) -> None:
    data = client()
    data["pki"][key] = {"cert": "issuer.pem", "key": "issuer.key"} if key == "issuer" else "1s"
    err = parse_error(data, pki_dir)
    assert f"pki.{key}" in str(err) and "gateway" in str(err)


@pytest.mark.parametrize(("value", "ok"), [(0.5, True), (0.95, True), (0.05, False), (1, False)])
def test_client_renewal_at(pki_dir: Path, value: float, ok: bool) -> None:
    data = with_value(client(), "renewal.at", value)
    if ok:
        cfg = parse(data, pki_dir)
        assert isinstance(cfg, ClientConfig) and cfg.renewal.at == value
    else:
        assert "renewal.at" in str(parse_error(data, pki_dir))


def test_client_may_not_set_gateway_renewal_keys(pki_dir: Path) -> None:
    err = parse_error(with_value(client(), "renewal.lifetime", "7d"), pki_dir)
    assert "renewal.lifetime" in str(err)


def test_gateway_refuses_enrollment_in_client_mode(pki_dir: Path) -> None:
    err = parse_error(with_value(client(), "enrollment", {"enabled": True}), pki_dir)
    assert "enrollment" in str(err)


def test_an_issuer_needs_the_inventory(pki_dir: Path) -> None:
    data = online()
    del data["pki"]["inventory"]
    err = parse_error(data, pki_dir)
    assert "pki.issuer" in str(err) and "pki.inventory" in str(err)
