"""vpnctl issue: files, address allocation, renewal, refusals, atomicity, concurrency."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl

from vpnctl import cli
from vpnd.pki import file_set
from vpnd.pki.identity import PkiError, Role
from vpnd.pki.keys import load_certificate, load_private_key
from vpnd.pki.pkidir import PkiDir
from vpnd.pki.profile import describe_certificate
from vpnd.pki.verify import load_trust_store, verify_peer

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime.now(dt.UTC)


def issue(name: str, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_vpnctl("issue", name, "--out", str(out), *extra)


def addresses(cert_path: Path) -> list[str]:
    return [str(a) for a in describe_certificate(load_certificate(cert_path)).addresses]


def inventory(pki: Path) -> list[dict[str, object]]:
    code, text, err = run_vpnctl("--pki", str(pki), "list", "--json")
    assert code == 0, err
    result: list[dict[str, object]] = json.loads(text)
    return result


def test_issue_writes_key_cert_and_ca(pki: Path, out: Path) -> None:
    code, text, err = issue("Alice", out, "--groups", "dev,ops", "--routes", "192.168.7.0/24")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["alice.key", "alice.pem", "ca.pem"]
    assert (out / "alice.key").stat().st_mode & 0o777 == 0o600
    assert (out / "alice.pem").stat().st_mode & 0o777 == 0o644
    assert (out / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    cert = load_certificate(out / "alice.pem")
    key = load_private_key(out / "alice.key")
    assert cert.public_key() == key.public_key()
    info = describe_certificate(cert)
    assert (info.name, info.role, info.eku) == ("alice", "peer", ("clientAuth",))
    assert [str(a) for a in info.addresses] == ["10.8.0.2"]
    assert info.groups == ("dev", "ops")
    assert [str(r) for r in info.routes] == ["192.168.7.0/24"]
    assert (info.not_after - NOW).days in (89, 90)  # default peer lifetime
    assert f"serial {cert.serial_number:x}" in text
    # The certificate passes the gateway's own verification against the PKI dir.
    trust = load_trust_store(pki / "ca.pem", pki / "crl.pem")
    ident = verify_peer([cert], now=dt.datetime.now(dt.UTC), role=Role.PEER, trust=trust)
    assert ident.name == "alice" and ident.groups == frozenset({"dev", "ops"})
    [row] = inventory(pki)
    assert row["name"] == "alice" and row["addresses"] == ["10.8.0.2"]
    assert row["serial"] == f"{cert.serial_number:x}" and row["status"] == "valid"
    assert not [f for f in os.listdir(pki) if f.endswith((".tmp", ".staged"))]


def test_gateway_gets_first_usable_address_dns_and_longer_lifetime(pki: Path, out: Path) -> None:
    code, _, err = issue("gw", out, "--gateway", "--dns", "vpn.example.com")
    assert code == 0, err
    cert = load_certificate(out / "gw.pem")
    info = describe_certificate(cert)
    assert info.role == "gateway" and info.eku == ("serverAuth",)
    assert [str(a) for a in info.addresses] == ["10.8.0.1"]
    assert info.dns_names == ("vpn.example.com",)
    assert (info.not_after - NOW).days in (364, 365)
    trust = load_trust_store(pki / "ca.pem", None)
    verify_peer([cert], now=NOW, role=Role.GATEWAY, trust=trust, server_name="vpn.example.com")


def test_allocation_skips_reserved_and_held_addresses(pki: Path, out: Path) -> None:
    assert issue("pinned", out, "--ip", "10.8.0.3")[0] == 0
    got = []
    for name in ("a", "b", "c"):
        code, _, err = issue(name, out)
        assert code == 0, err
        got += addresses(out / f"{name}.pem")
    # .0 network, .1 gateway (even though none was issued), .3 held by "pinned".
    assert got == ["10.8.0.2", "10.8.0.4", "10.8.0.5"]


def test_address_held_by_another_valid_cert_is_refused(pki: Path, out: Path) -> None:
    assert issue("alice", out, "--ip", "10.8.0.5")[0] == 0
    serial = inventory(pki)[0]["serial"]
    code, _, err = issue("bob", out, "--ip", "10.8.0.5")
    assert code == 1
    assert_one_error_line(err)
    assert f"10.8.0.5 is already held by alice (serial {serial}, valid until " in err
    assert not (out / "bob.key").exists() and not (out / "bob.pem").exists()
    assert len(inventory(pki)) == 1


def test_gateway_address_taken_explains_the_reservation(pki: Path, out: Path) -> None:
    assert issue("gw1", out, "--gateway", "--dns", "a.example.com")[0] == 0
    code, _, err = issue("gw2", out, "--gateway", "--dns", "b.example.com")
    assert code == 1
    assert_one_error_line(err)
    assert "held by gw1" in err and "--ip" in err
    code, _, err = issue("gw2", out, "--gateway", "--dns", "b.example.com", "--ip", "10.8.0.254")
    assert code == 0, err


def test_renewal_keeps_the_address(pki: Path, out: Path) -> None:
    assert issue("alice", out, "--ip", "10.8.0.9")[0] == 0
    first = load_certificate(out / "alice.pem")
    assert issue("bob", out)[0] == 0
    code, _, err = issue("alice", out)  # renewal without --ip keeps .9
    assert code == 0, err
    assert addresses(out / "alice.pem") == ["10.8.0.9"]
    code, _, err = issue("alice", out, "--ip", "10.8.0.9")  # and with it, too
    assert code == 0, err
    second = load_certificate(out / "alice.pem")
    assert second.serial_number != first.serial_number
    rows = [r for r in inventory(pki) if r["name"] == "alice"]
    assert len(rows) == 3 and all(r["addresses"] == ["10.8.0.9"] for r in rows)


def test_revoked_and_expired_addresses_are_free_again(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    past = NOW - dt.timedelta(days=200)
    PkiDir(pki, clock=lambda: past).init_ca(
        name="test-ca", networks=[ipaddress.ip_network("10.8.0.0/24")]
    )
    old = tmp_path / "old"
    old.mkdir()
    PkiDir(pki, clock=lambda: past).issue("old", out_dir=old, days=30)  # expired long ago
    assert addresses(old / "old.pem") == ["10.8.0.2"]
    assert run_vpnctl("--pki", str(pki), "issue", "alice", "--out", str(out))[0] == 0
    assert addresses(out / "alice.pem") == ["10.8.0.2"]
    assert run_vpnctl("--pki", str(pki), "revoke", "alice")[0] == 0
    assert run_vpnctl("--pki", str(pki), "issue", "bob", "--out", str(out))[0] == 0
    assert addresses(out / "bob.pem") == ["10.8.0.2"]
    statuses = {r["name"]: r["status"] for r in inventory(pki)}
    assert statuses == {"old": "expired", "alice": "revoked", "bob": "valid"}


def test_full_network_is_refused(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    args = ["--pki", str(pki)]
    assert run_vpnctl(*args, "ca", "init", "--name", "small", "--network", "10.9.0.0/29")[0] == 0
    for i in range(5):  # .2 .. .6
        code, _, err = run_vpnctl(*args, "issue", f"p{i}", "--out", str(out))
        assert code == 0, err
    code, _, err = run_vpnctl(*args, "issue", "p5", "--out", str(out))
    assert code == 1
    assert_one_error_line(err)
    assert "no free address" in err


def test_ipv6_overlay_allocation(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    args = ["--pki", str(pki)]
    assert run_vpnctl(*args, "ca", "init", "--name", "v6", "--network", "fd00:8::/64")[0] == 0
    assert (
        run_vpnctl(*args, "issue", "gw", "--gateway", "--dns", "gw.example", "--out", str(out))[0]
        == 0
    )
    assert run_vpnctl(*args, "issue", "alice", "--out", str(out))[0] == 0
    assert addresses(out / "gw.pem") == ["fd00:8::1"]
    assert addresses(out / "alice.pem") == ["fd00:8::2"]


@pytest.mark.parametrize(
    ("ip", "needle"),
    [
        ("10.9.0.5", "outside the CA's overlay network"),
        ("10.8.0.0", "network address"),
        ("10.8.0.255", "broadcast address"),
    ],
)
def test_unusable_addresses_are_refused(pki: Path, out: Path, ip: str, needle: str) -> None:
    code, _, err = issue("alice", out, "--ip", ip)
    assert code == 1
    assert_one_error_line(err)
    assert needle in err
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["issue", "a/b"], "invalid"),
        (["issue", "a\nb"], "invalid"),
        (["issue", "x" * 200], "at most 63"),
        (["issue", "a.b"], "no dots"),
        (["issue", "alice", "--ip", "10.8.0.300"], "not an IP address"),
        (["issue", "alice", "--routes", "bogus"], "CIDR"),
        (["issue", "alice", "--groups", "dev,,ops"], "empty group"),
        (["issue", "alice", "--groups", "Dev Ops"], "group name"),
        (["issue", "alice", "--days", "0"], "at least 1"),
        (["issue", "alice", "--days", "-5"], "at least 1"),
        (["issue", "alice", "--days", "ten"], "whole number"),
        (["issue", "alice", "--dns", "vpn.example.com"], "add --gateway"),
        (["issue", "alice", "--gateway"], "--dns"),
        (["issue", "alice", "--key-type", "rsa"], "invalid choice"),
        (["issue", "alice", "--gateway", "--dns", "*.example.com"], "DNS name"),
    ],
)
def test_usage_errors(pki: Path, out: Path, argv: list[str], needle: str) -> None:
    code, _, err = run_vpnctl(*argv, "--out", str(out))
    assert code == 2, err
    assert_one_error_line(err)
    assert needle in err
    assert os.listdir(out) == []
    assert inventory(pki) == []


def test_missing_out_dir_and_out_required(pki: Path, tmp_path: Path) -> None:
    code, _, err = run_vpnctl("issue", "alice", "--out", str(tmp_path / "nope"))
    assert code == 1
    assert_one_error_line(err)
    assert "does not exist" in err
    code, _, err = run_vpnctl("issue", "alice")
    assert code == 2
    assert_one_error_line(err)
    assert "--out" in err
    assert inventory(pki) == []


def test_refuses_writing_into_the_pki_dir_or_the_name_ca(pki: Path, out: Path) -> None:
    key_before = (pki / "ca.key").read_bytes()
    code, _, err = run_vpnctl("issue", "ca", "--out", str(pki))
    assert code == 1
    assert_one_error_line(err)
    assert (pki / "ca.key").read_bytes() == key_before
    code, _, err = run_vpnctl("issue", "ca", "--out", str(out))
    assert code == 1 and "reserved" in err


def test_lifetime_is_capped_to_the_ca_expiry(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    args = ["--pki", str(pki)]
    assert (
        run_vpnctl(
            *args, "ca", "init", "--name", "short", "--network", "10.8.0.0/24", "--days", "30"
        )[0]
        == 0
    )
    code, _, err = run_vpnctl(*args, "issue", "alice", "--out", str(out))
    assert code == 0
    ca = load_certificate(pki / "ca.pem")
    assert f"capped to the CA's expiry {ca.not_valid_after_utc:%Y-%m-%d}" in err
    assert load_certificate(out / "alice.pem").not_valid_after_utc == ca.not_valid_after_utc


def test_expired_ca_refuses_to_issue(tmp_path: Path, out: Path) -> None:
    pki = tmp_path / "pki"
    PkiDir(pki, clock=lambda: NOW - dt.timedelta(days=10)).init_ca(
        name="old-ca", networks=[ipaddress.ip_network("10.8.0.0/24")], days=2
    )
    code, _, err = run_vpnctl("--pki", str(pki), "issue", "alice", "--out", str(out))
    assert code == 1
    assert_one_error_line(err)
    assert "the CA expired on" in err
    assert os.listdir(out) == []


def test_failed_write_changes_nothing(
    pki: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert issue("alice", out)[0] == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    real = file_set.stage_file

    def failing(path: Path, data: bytes, mode: int) -> Path:
        if path.name == "alice.pem":
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, mode)

    monkeypatch.setattr(file_set, "stage_file", failing)
    code, _, err = issue("alice", out)  # a renewal that cannot be written
    assert code == 1
    assert_one_error_line(err)
    assert "No space left" in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # old key+cert kept
    assert len(inventory(pki)) == 1  # nothing recorded for what was never produced


def test_pkidir_api_refusals(pki: Path, out: Path) -> None:
    d = PkiDir(pki)
    with pytest.raises(PkiError, match="needs at least one DNS"):
        d.issue("gw", out_dir=out, role=Role.GATEWAY)
    with pytest.raises(PkiError, match="at least 1 day"):
        d.issue("alice", out_dir=out, days=0)
    with pytest.raises(PkiError, match="empty"):
        PkiDir(pki, passphrase=b"")


def test_concurrent_issue_hands_out_distinct_addresses(pki: Path, out: Path) -> None:
    env = {**os.environ, cli.ENV_PKI: str(pki), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vpnctl", "issue", f"peer{i}", "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    results = []
    try:
        for p in procs:
            _stdout, stderr = p.communicate(timeout=120)
            results.append((p.returncode, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(code == 0 for code, _ in results), results
    got = [addresses(out / f"peer{i}.pem")[0] for i in range(6)]
    assert len(set(got)) == 6
    assert sorted(got, key=ipaddress.ip_address) == [f"10.8.0.{i}" for i in range(2, 8)]
    rows = inventory(pki)
    assert sorted(r["name"] for r in rows) == [f"peer{i}" for i in range(6)]  # type: ignore[type-var]
    assert {r["addresses"][0] for r in rows} == set(got)  # type: ignore[index]
    assert not [f for f in os.listdir(out) if f.startswith(".")]
    assert not [f for f in os.listdir(pki) if f.endswith((".tmp", ".staged"))]


@pytest.mark.parametrize("victim", ["ca.key", "ca.pem", "inventory.sqlite"])
def test_garbled_pki_files_are_refused(pki: Path, out: Path, victim: str) -> None:
    (pki / victim).write_bytes(b"-----BEGIN GARBAGE-----\nzzzz\n" * 50)
    code, _, err = issue("alice", out)
    assert code == 1
    assert_one_error_line(err)
    assert victim in err or "inventory" in err
    assert os.listdir(out) == []
