"""vpnctl ca issuer / ca upgrade: the online issuing CA, made by the admin."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl

from vpnd.pki.authority import create_ca
from vpnd.pki.issuer import load_issuer, path_length
from vpnd.pki.keys import certificate_pem, load_certificate
from vpnd.pki.pkidir import PkiDir

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def init(pki: Path) -> None:
    code, _, err = run_vpnctl(
        "--pki", str(pki), "ca", "init", "--name", "corp", "--network", "10.8.0.0/24"
    )
    assert code == 0, err


def test_ca_issuer_writes_a_usable_issuer(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init(pki)
    code, out, err = run_vpnctl("--pki", str(pki), "ca", "issuer", "--days", "30")
    assert code == 0, err
    assert "10.8.0.0/24" in out and "next:" in out
    assert (pki / "issuer.key").stat().st_mode & 0o777 == 0o600
    root = load_certificate(pki / "ca.pem")
    issuer = load_issuer(
        pki / "issuer.pem", pki / "issuer.key", roots=[root], now=PkiDir(pki).now()
    )
    assert path_length(issuer.cert) == 0
    # A second one needs --replace, and the first stays untouched without it.
    before = (pki / "issuer.pem").read_bytes()
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "issuer")
    assert code == 1 and "--replace" in err
    assert_one_error_line(err)
    assert (pki / "issuer.pem").read_bytes() == before
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "issuer", "--replace")
    assert code == 0, err
    assert (pki / "issuer.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--days", "0"], "at least 1"),
        (["--days", "900"], "1..400"),
        (["--network", "10.9.0.0/24"], "outside the root CA's networks"),
        (["--out", "/nonexistent/dir"], "does not exist"),
        (["--key-type", "ed25519"], "invalid choice"),
    ],
)
def test_ca_issuer_bad_input(tmp_path: Path, args: list[str], expect: str) -> None:
    pki = tmp_path / "pki"
    init(pki)
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "issuer", *args)
    assert code in (1, 2) and expect in err
    assert_one_error_line(err)
    assert not (pki / "issuer.pem").exists()


def test_ca_upgrade_then_issuer(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init(pki)
    # Stand in for a PKI made before issuers: re-sign ca.pem with pathlen 0, same key.
    pkidir = PkiDir(pki)
    old = load_certificate(pki / "ca.pem")
    legacy = create_ca(
        name="corp",
        networks=[ipaddress.ip_network("10.8.0.0/24")],
        key=pkidir.signing_key(),
        not_before=old.not_valid_before_utc,
        not_after=old.not_valid_after_utc,
        path_length=0,
    )
    (pki / "ca.pem").write_bytes(certificate_pem(legacy))
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "issuer")
    assert code == 1 and "vpnctl ca upgrade" in err
    code, out, err = run_vpnctl("--pki", str(pki), "ca", "upgrade")
    assert code == 0, err
    assert path_length(load_certificate(pki / "ca.pem")) == 1
    assert load_certificate(pki / "ca.pem.pathlen0") == legacy
    assert "install the new ca.pem" in out
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "upgrade")
    assert code == 1 and "nothing to do" in err
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "issuer")
    assert code == 0, err
