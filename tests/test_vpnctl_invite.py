"""vpnctl invite / invites: pending identities, distinct addresses, tokens, no secrets shown."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl

from vpnctl.invite_cli import ENV_SERVER, qr_text
from vpnd.pki.enrollment_token import ca_pin, parse_token, secret_matches
from vpnd.pki.inventory import Inventory
from vpnd.pki.keys import load_certificate

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_SERVER, raising=False)


def invite(*argv: str) -> tuple[int, str, str]:
    return run_vpnctl("invite", *argv)


def test_invite_prints_one_token_and_records_pending_identity(pki: Path) -> None:
    code, out, err = invite("alice", "--groups", "staff,dev", "--server", "gw.example.net:4443")
    assert code == 0, err
    token = parse_token(out.strip().splitlines()[0])
    assert token.server == "gw.example.net:4443"
    assert token.ca_pin == ca_pin(load_certificate(pki / "ca.pem"))
    assert "alice" in err and "10.8.0.2" in err
    assert token.secret not in err
    with Inventory.open(pki / "inventory.sqlite") as inv:
        ident = inv.identity("alice")
        assert ident is not None and ident.state == "pending"
        assert set(ident.groups) == {"staff", "dev"}
        rec = inv.invite(token.invite_id)
        assert rec is not None and rec.name == "alice"
        assert token.secret not in rec.secret_hash
        assert secret_matches(token.invite_id, token.secret, rec.secret_hash)
        ttl = rec.expires_at - rec.created_at
        assert ttl == dt.timedelta(hours=24)


def test_thirty_invites_get_thirty_addresses(pki: Path) -> None:
    seen = set()
    for i in range(30):
        code, out, err = invite(f"laptop-{i}", "--server", "gw:4443", "--json")
        assert code == 0, err
        data = json.loads(out)
        seen.add(tuple(data["addresses"]))
    assert len(seen) == 30
    assert ("10.8.0.1",) not in seen  # the gateway's


def test_explicit_ip_and_conflict(pki: Path) -> None:
    assert invite("alice", "--ip", "10.8.0.50", "--server", "gw:1")[0] == 0
    code, _, err = invite("bob", "--ip", "10.8.0.50", "--server", "gw:1")
    assert code == 1
    assert "10.8.0.50" in assert_one_error_line(err)
    code, _, err = invite("carol", "--ip", "10.99.0.5", "--server", "gw:1")
    assert code == 1 and "outside" in assert_one_error_line(err)


def test_ttl_and_server_errors(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = invite("alice")
    assert code == 2 and "--server" in assert_one_error_line(err)
    code, _, err = invite("alice", "--server", "gw")
    assert code == 2 and "HOST:PORT" in assert_one_error_line(err)
    code, _, err = invite("alice", "--server", "gw:1", "--ttl", "soon")
    assert code == 2 and "duration" in assert_one_error_line(err)
    code, _, err = invite("alice", "--server", "gw:1", "--ttl", "90d")
    assert code == 1 and "30 days" in assert_one_error_line(err)
    monkeypatch.setenv(ENV_SERVER, "gw.env:4443")
    code, out, err = invite("alice", "--ttl", "30m", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["server"] == "gw.env:4443"
    created = dt.datetime.fromisoformat(data["expires_at"])
    assert created > dt.datetime.now(dt.UTC)


def test_name_with_a_certificate_is_refused(pki: Path, tmp_path: Path) -> None:
    code, _, err = run_vpnctl("issue", "alice", "--out", str(tmp_path))
    assert code == 0, err
    code, _, err = invite("alice", "--server", "gw:1")
    assert code == 1 and "already has a valid certificate" in assert_one_error_line(err)
    # Once revoked, the name may be invited again; its generation goes on counting.
    assert run_vpnctl("revoke", "alice")[0] == 0
    code, _, err = invite("alice", "--server", "gw:1")
    assert code == 0, err
    with Inventory.open(pki / "inventory.sqlite") as inv:
        ident = inv.identity("alice")
        assert ident is not None and ident.state == "pending" and ident.generation == 2


def test_invites_lists_states_without_secrets(pki: Path) -> None:
    tokens = []
    for name in ("alice", "bob"):
        code, out, _ = invite(name, "--server", "gw:1", "--ttl", "1h")
        tokens.append(parse_token(out.splitlines()[0]))
    with Inventory.open(pki / "inventory.sqlite") as inv, inv.transaction():
        inv.mark_invite_used(tokens[0].invite_id, dt.datetime.now(dt.UTC), 0x1F)
    code, out, err = run_vpnctl("invites")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert "used" in next(li for li in lines if "alice" in li)
    assert "1f" in next(li for li in lines if "alice" in li)
    assert "pending" in next(li for li in lines if "bob" in li)
    assert "10.8.0.3" in next(li for li in lines if "bob" in li)
    code, out, _ = run_vpnctl("invites", "--json")
    rows = json.loads(out)
    assert {r["state"] for r in rows} == {"used", "pending"}
    assert {tuple(r["addresses"]) for r in rows} == {("10.8.0.2",), ("10.8.0.3",)}
    for t in tokens:
        assert t.secret not in out
    assert "secret" not in out and "hash" not in out
    code, out, _ = run_vpnctl("invites", "--state", "pending", "--json")
    assert [r["name"] for r in json.loads(out)] == ["bob"]


def test_invites_empty(pki: Path) -> None:
    code, out, err = run_vpnctl("invites")
    assert code == 0 and out == "" and "no invites" in err


def test_qr_prints_a_block_code(pki: Path) -> None:
    code, out, err = invite("alice", "--server", "gw:1", "--qr")
    assert code == 0, err
    lines = out.splitlines()
    parse_token(lines[0])
    assert len(lines) > 20
    assert all(set(li) <= set(" █▀▄") for li in lines[1:])


def test_qr_text_encodes_the_token() -> None:
    import segno

    token = "vpnd1-abc"
    assert qr_text(token) != qr_text("vpnd1-abd")
    assert segno.make(token, error="l", micro=False).designator  # a normal QR, not micro
