"""The gateway service's enrollment wiring, on a PKI made with vpnctl (root + issuer)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_vpnctl
from cryptography import x509

from vpnd.client.enroll import enroll
from vpnd.config import ClientConfig, GatewayConfig, load_config, parse_config
from vpnd.gateway.enrollment import EnrollmentHandler
from vpnd.pki.enrollment_token import parse_token
from vpnd.pki.inventory import Inventory
from vpnd.pki.keys import fingerprint, load_certificate, load_certificates
from vpnd.pki.profile import generation_of
from vpnd.service.enrollment_setup import build_enrollment, enrolled_lifetime, server_name_of
from vpnd.service.startup import StartupError
from vpnd.transport.memory import memory_pipe
from vpnd.transport.stream import Stream

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    for argv in (
        ("ca", "init", "--name", "corp", "--network", "10.8.0.0/24"),
        ("ca", "issuer"),
        ("issue", "gw", "--gateway", "--dns", "gw.test", "--out", str(tmp_path)),
        ("issue", "alice", "--out", str(tmp_path)),
    ):
        code, _, err = run_vpnctl("--pki", str(pki), *argv)
        assert code == 0, err
    return tmp_path


def gateway_config(site: Path, **extra: Any) -> GatewayConfig:
    pki = site / "pki"
    data: dict[str, Any] = {
        "mode": "gateway",
        "pki": {
            "ca": str(pki / "ca.pem"),
            "cert": str(site / "gw.pem"),
            "key": str(site / "gw.key"),
            "crl": str(pki / "crl.pem"),
            "issuer": {"cert": str(pki / "issuer.pem"), "key": str(pki / "issuer.key")},
            "inventory": str(pki / "inventory.sqlite"),
        },
        "enrollment": {"enabled": True},
        **extra,
    }
    cfg = parse_config(data, source="gw.yaml", base_dir=site)
    assert isinstance(cfg, GatewayConfig)
    return cfg


def build(site: Path, cfg: GatewayConfig | None = None, own: str = "gw.pem") -> EnrollmentHandler:
    cfg = cfg or gateway_config(site)
    return build_enrollment(
        cfg,
        load_certificate(site / own),
        load_certificates(site / "pki" / "ca.pem"),
        wall=time.time,
        mono=time.monotonic,
    )


async def test_invite_then_enroll_through_the_configured_issuer(site: Path) -> None:
    handler = build(site)
    code, out, err = run_vpnctl(
        "--pki", str(site / "pki"), "invite", "bob", "--groups", "dev", "--server", "gw.test:4443"
    )
    assert code == 0, err
    token = parse_token(out.splitlines()[0])

    async def dial(_pinned: bytes | None) -> Stream:
        client, server = memory_pipe()
        handler.accept(server)
        return client

    got = await enroll(token, site / "bob", dial=dial)
    cfg = load_config(got.config)
    assert isinstance(cfg, ClientConfig) and cfg.server_name == "gw.test"
    chain = x509.load_pem_x509_certificates(cfg.pki.cert.read_bytes())
    issuer = load_certificate(site / "pki" / "issuer.pem")
    assert chain[0].issuer == issuer.subject and chain[1] == issuer
    assert generation_of(chain[0]) == 1
    with Inventory.open(site / "pki" / "inventory.sqlite") as inv:
        rec = inv.get(chain[0].serial_number)
        assert rec is not None and rec.issuer_fp == fingerprint(issuer)
        assert rec.groups == ("dev",)
    # No renewal: the usual peer lifetime, capped by the issuer's own expiry.
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert life <= dt.timedelta(days=90, minutes=5)


def test_lifetime_follows_renewal(site: Path) -> None:
    assert enrolled_lifetime(gateway_config(site)) == 90 * 86400.0
    cfg = gateway_config(site, renewal={"enabled": True, "lifetime": "3d"})
    assert enrolled_lifetime(cfg) == 3 * 86400.0


def test_gateway_certificate_without_dns_name_is_refused(site: Path) -> None:
    with pytest.raises(StartupError, match="DNS name"):
        server_name_of(load_certificate(site / "alice.pem"))
    assert server_name_of(load_certificate(site / "gw.pem")) == "gw.test"


def test_a_bad_issuer_stops_start_up_with_one_line(site: Path) -> None:
    cfg = gateway_config(site)
    (site / "pki" / "issuer.key").write_bytes((site / "gw.key").read_bytes())
    with pytest.raises(StartupError) as info:
        build(site, cfg)
    assert "\n" not in str(info.value) and "issuer" in str(info.value)
