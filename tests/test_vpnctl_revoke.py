"""vpnctl revoke, crl and list: CRL numbers, reasons, statuses, --expiring, JSON."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl
from cryptography import x509

from vpnd.pki.crl import load_crls
from vpnd.pki.identity import Reason, Role, VerifyError
from vpnd.pki.keys import load_certificate
from vpnd.pki.pkidir import PkiDir
from vpnd.pki.verify import load_trust_store, verify_peer

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def crl_of(pki: Path) -> x509.CertificateRevocationList:
    [crl] = load_crls(pki / "crl.pem")
    ca = load_certificate(pki / "ca.pem")
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    return crl


def number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def serial_of(path: Path) -> int:
    return load_certificate(path).serial_number


def test_revoke_by_name_resigns_the_crl_with_reason(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "alice", "--out", str(out))[0] == 0
    cert = load_certificate(out / "alice.pem")
    assert number(crl_of(pki)) == 1
    trust = load_trust_store(pki / "ca.pem", pki / "crl.pem")
    verify_peer([cert], now=dt.datetime.now(dt.UTC), role=Role.PEER, trust=trust)

    code, text, err = run_vpnctl("revoke", "alice", "--reason", "keyCompromise")
    assert code == 0, err
    assert f"revoked alice serial {cert.serial_number:x}" in text
    crl = crl_of(pki)
    assert number(crl) == 2
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert crl.next_update_utc is not None
    assert (crl.next_update_utc - crl.last_update_utc) == dt.timedelta(days=7)
    # The gateway, reloading the CRL, now refuses the certificate.
    trust = load_trust_store(pki / "ca.pem", pki / "crl.pem")
    with pytest.raises(VerifyError) as info:
        verify_peer([cert], now=dt.datetime.now(dt.UTC), role=Role.PEER, trust=trust)
    assert info.value.reason is Reason.REVOKED


def test_revoke_by_serial_leaves_the_others(pki: Path, out: Path) -> None:
    for name in ("alice", "bob"):
        assert run_vpnctl("issue", name, "--out", str(out))[0] == 0
    alice, bob = serial_of(out / "alice.pem"), serial_of(out / "bob.pem")
    code, _, err = run_vpnctl("revoke", "--serial", f"0x{alice:X}")
    assert code == 0, err
    crl = crl_of(pki)
    assert crl.get_revoked_certificate_by_serial_number(alice) is not None
    assert crl.get_revoked_certificate_by_serial_number(bob) is None
    entry = crl.get_revoked_certificate_by_serial_number(alice)
    assert entry is not None
    assert not [e for e in entry.extensions if isinstance(e.value, x509.CRLReason)]


def test_revoke_by_name_covers_every_valid_certificate(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "alice", "--out", str(out))[0] == 0
    first = serial_of(out / "alice.pem")
    assert run_vpnctl("issue", "alice", "--out", str(out))[0] == 0  # renewal
    second = serial_of(out / "alice.pem")
    assert run_vpnctl("revoke", "alice", "--reason", "superseded")[0] == 0
    crl = crl_of(pki)
    assert {e.serial_number for e in crl} == {first, second}


def test_revoking_twice_reports_already_revoked(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "alice", "--out", str(out))[0] == 0
    serial = serial_of(out / "alice.pem")
    assert run_vpnctl("revoke", "alice")[0] == 0
    before = (pki / "crl.pem").read_bytes()
    for argv in (["revoke", "alice"], ["revoke", "--serial", f"{serial:x}"]):
        code, text, err = run_vpnctl(*argv)
        assert code == 0, err
        assert "already revoked" in text
    assert (pki / "crl.pem").read_bytes() == before  # nothing new: CRL not re-signed


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["revoke", "carol"], 1, "no certificate was ever issued to 'carol'"),
        (["revoke", "--serial", "abcdef"], 1, "no certificate with serial abcdef"),
        (["revoke", "--serial", "xyz"], 2, "hexadecimal"),
        (["revoke"], 2, "exactly one"),
        (["revoke", "alice", "--serial", "ab"], 2, "exactly one"),
        (["revoke", "alice", "--reason", "boredom"], 2, "invalid choice"),
        (["revoke", "al/ice"], 2, "invalid"),
    ],
)
def test_revoke_refusals(pki: Path, argv: list[str], code: int, needle: str) -> None:
    before = (pki / "crl.pem").read_bytes()
    got, _, err = run_vpnctl(*argv)
    assert got == code
    assert_one_error_line(err)
    assert needle in err
    assert (pki / "crl.pem").read_bytes() == before


def test_revoke_by_name_with_only_expired_certs(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
    PkiDir(pki, clock=lambda: past).init_ca(
        name="test-ca", networks=[ipaddress.ip_network("10.8.0.0/24")]
    )
    PkiDir(pki, clock=lambda: past).issue("old", out_dir=out, days=10)
    code, _, err = run_vpnctl("--pki", str(pki), "revoke", "old")
    assert code == 1
    assert_one_error_line(err)
    assert "expired" in err and "--serial" in err
    code, _, err = run_vpnctl(
        "--pki", str(pki), "revoke", "--serial", f"{serial_of(out / 'old.pem'):x}"
    )
    assert code == 0, err


def test_crl_refresh_increments_and_honours_days(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "alice", "--out", str(out))[0] == 0
    assert run_vpnctl("revoke", "alice", "--reason", "cessationOfOperation")[0] == 0
    code, text, err = run_vpnctl("crl", "--days", "2")
    assert code == 0, err
    crl = crl_of(pki)
    assert number(crl) == 3 and "CRL number 3" in text
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=2)
    assert len(list(crl)) == 1  # the revoked entry survives re-signing
    assert run_vpnctl("crl")[0] == 0
    assert number(crl_of(pki)) == 4
    code, _, err = run_vpnctl("crl", "--days", "0")
    assert code == 2
    assert_one_error_line(err)
    assert number(crl_of(pki)) == 4


def test_configured_crl_days(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    args = ["--pki", str(pki)]
    assert (
        run_vpnctl(
            *args, "ca", "init", "--name", "x", "--network", "10.8.0.0/24", "--crl-days", "3"
        )[0]
        == 0
    )
    assert run_vpnctl(*args, "crl")[0] == 0
    crl = crl_of(pki)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=3)


def test_list_table_and_json(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "alice", "--out", str(out), "--groups", "dev")[0] == 0
    assert run_vpnctl("issue", "bob", "--out", str(out), "--days", "10")[0] == 0
    assert (
        run_vpnctl("issue", "gw", "--out", str(out), "--gateway", "--dns", "vpn.example.com")[0]
        == 0
    )
    assert run_vpnctl("revoke", "bob")[0] == 0
    code, text, _ = run_vpnctl("list")
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == [
        "NAME",
        "SERIAL",
        "GEN",
        "ADDRESSES",
        "GROUPS",
        "NOT-AFTER",
        "DAYS",
        "RENEWS",
        "STATUS",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["alice"][1] == f"{serial_of(out / 'alice.pem'):x}"
    assert rows["alice"][2:5] == ["1", "10.8.0.2", "dev"]
    assert rows["alice"][-1] == "valid" and rows["bob"][-1] == "revoked"
    assert rows["bob"][-2] == "-"  # a revoked certificate does not renew
    assert rows["gw"][3] == "10.8.0.1"
    # Columns are aligned: every STATUS starts at the same offset.
    starts = {line.rindex(line.split()[-1]) for line in lines}
    assert len(starts) == 1

    code, text, _ = run_vpnctl("list", "--json")
    data = json.loads(text)
    keys = {
        "name", "serial", "role", "addresses", "groups", "routes", "dns_names", "not_before",
        "not_after", "days_left", "status", "fingerprint", "issued_at", "revoked_at",
        "revoke_reason", "delivered", "generation", "issuer_fp", "superseded_at",
        "superseded_by", "next_renewal",
    }  # fmt: skip
    assert all(set(d) == keys for d in data)
    by_name = {d["name"]: d for d in data}
    assert by_name["gw"]["role"] == "gateway" and by_name["gw"]["dns_names"] == ["vpn.example.com"]
    assert by_name["bob"]["status"] == "revoked" and by_name["bob"]["revoked_at"]
    assert by_name["alice"]["days_left"] in (89, 90)


def test_list_expiring_shows_only_valid_certs_due_for_renewal(pki: Path, out: Path) -> None:
    assert run_vpnctl("issue", "soon", "--out", str(out), "--days", "5")[0] == 0
    assert run_vpnctl("issue", "later", "--out", str(out), "--days", "60")[0] == 0
    assert run_vpnctl("issue", "gone", "--out", str(out), "--days", "3")[0] == 0
    assert run_vpnctl("revoke", "gone")[0] == 0
    code, text, _ = run_vpnctl("list", "--expiring", "30", "--json")
    assert code == 0
    assert [d["name"] for d in json.loads(text)] == ["soon"]
    code, text, _ = run_vpnctl("list", "--expiring", "90")
    names = [line.split()[0] for line in text.splitlines()[1:]]
    assert sorted(names) == ["later", "soon"]
    code, _, err = run_vpnctl("list", "--expiring", "-1")
    assert code == 2
    assert_one_error_line(err)


def test_list_shows_expired(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    now = dt.datetime(2031, 6, 1, tzinfo=dt.UTC)
    clock = [now]
    d = PkiDir(pki, clock=lambda: clock[0])
    d.init_ca(name="test-ca", networks=[ipaddress.ip_network("10.8.0.0/24")])
    d.issue("alice", out_dir=out, days=10)
    clock[0] = now + dt.timedelta(days=9, hours=12)
    [c] = d.list_certificates(expiring_within_days=1)
    assert (c.status, c.days_left) == ("valid", 0)
    clock[0] = now + dt.timedelta(days=11)
    [c] = d.list_certificates()
    assert (c.status, c.days_left) == ("expired", -1)
    assert d.list_certificates(expiring_within_days=30) == []
