"""CA and issuer expiry: the 90/30/7-day stages, said once each, and `vpnctl ca status`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cli_helpers import run_vpnctl

from vpnd.pki.ca_forecast import ExpiryWarner, ca_expiry
from vpnd.pki.keys import load_certificate

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def pki_with_issuer(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    assert run_vpnctl("--pki", str(pki), "ca", "init", "--name", "corp",
                      "--network", "10.8.0.0/24")[0] == 0  # fmt: skip
    assert run_vpnctl("--pki", str(pki), "ca", "issuer", "--days", "90")[0] == 0
    return pki


def test_stages_and_once_each(tmp_path: Path) -> None:
    pki = pki_with_issuer(tmp_path)
    root = load_certificate(pki / "ca.pem")
    issuer = load_certificate(pki / "issuer.pem")
    now = issuer.not_valid_before_utc + dt.timedelta(minutes=5)
    # A fresh 90-day issuer is not "within 90 days" noise; a 10-year root is far away.
    assert ca_expiry("issuer", issuer, now).stage is None
    assert ca_expiry("root", root, now).stage is None
    warner = ExpiryWarner()
    at = {d: issuer.not_valid_after_utc - dt.timedelta(days=d, hours=1) for d in (29, 6)}
    first = warner.due([ca_expiry("issuer", issuer, at[29])])
    assert [e.stage for e in first] == [30] and "renewals and enrollments stop" in first[0].line()
    assert warner.due([ca_expiry("issuer", issuer, at[29])]) == []  # said once
    assert [e.stage for e in warner.due([ca_expiry("issuer", issuer, at[6])])] == [7]
    gone = ca_expiry("issuer", issuer, issuer.not_valid_after_utc + dt.timedelta(days=1))
    assert warner.due([gone]) and "EXPIRED" in gone.line()
    late = ca_expiry("root", root, root.not_valid_after_utc - dt.timedelta(days=80))
    assert late.stage == 90 and "every certificate it signed stops working" in late.line()


def test_vpnctl_ca_status_counts_certificates_per_ca(tmp_path: Path) -> None:
    pki = pki_with_issuer(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in ("alice", "bob"):
        assert run_vpnctl("--pki", str(pki), "issue", name, "--out", str(out_dir))[0] == 0
    assert run_vpnctl("--pki", str(pki), "revoke", "bob")[0] == 0
    code, out, err = run_vpnctl("--pki", str(pki), "ca", "status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    root, issuer = doc["cas"]
    assert (root["kind"], root["peers"], root["gateways"]) == ("root", 1, 0)
    assert (issuer["kind"], issuer["peers"]) == ("issuer", 0)
    code, text, _ = run_vpnctl("--pki", str(pki), "ca", "status")
    assert code == 0 and "PEERS" in text and "issuer" in text
