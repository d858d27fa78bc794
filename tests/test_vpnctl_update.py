"""vpnctl update (identity terms, --now renew hint) and vpnctl list after renewals."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl
from cryptography.hazmat.primitives import serialization

from vpnd.pki import csr_for, generate_key, verify_peer
from vpnd.pki.identity import Role
from vpnd.pki.inventory import Inventory
from vpnd.pki.issuer import load_issuer
from vpnd.pki.keys import load_certificate, load_certificates
from vpnd.pki.renewal_signing import sign_renewal, supersede
from vpnd.pki.verify import load_trust_store

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def issue(out: Path, name: str, *extra: str) -> int:
    code, _, err = run_vpnctl("issue", name, "--out", str(out), *extra)
    assert code == 0, err
    return load_certificate(out / f"{name}.pem").serial_number


def identity_terms(pki: Path, name: str) -> tuple[tuple[str, ...], list[str], list[str]]:
    with Inventory.open(pki / "inventory.sqlite") as inv:
        ident = inv.identity(name)
    assert ident is not None
    return ident.groups, [str(a) for a in ident.addresses], [str(r) for r in ident.routes]


def test_update_groups(pki: Path, out: Path) -> None:
    issue(out, "alice", "--groups", "dev,ops")
    code, text, err = run_vpnctl("update", "alice", "--groups", "ops,Audit")
    assert code == 0, err
    assert identity_terms(pki, "alice")[0] == ("ops", "audit")
    assert text.startswith("updated alice\n")
    assert "dev, ops -> ops, audit" in text
    assert "removed group(s) dev apply on the gateway at once" in text
    assert "next renewal" in text
    code, text, err = run_vpnctl("update", "alice", "--no-groups", "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc["changed"] == ["groups"]
    assert doc["before"]["groups"] == ["ops", "audit"]
    assert doc["after"]["groups"] == []
    assert doc["renew_hint"] is None
    assert doc["next_renewal"]
    assert doc["generation"] == 1


def test_update_ip_and_routes(pki: Path, out: Path) -> None:
    issue(out, "alice")
    code, text, err = run_vpnctl(
        "update", "alice", "--ip", "10.8.0.50", "--routes", "192.168.9.0/24"
    )
    assert code == 0, err
    assert identity_terms(pki, "alice")[1:] == (["10.8.0.50"], ["192.168.9.0/24"])
    code, text, err = run_vpnctl("update", "alice", "--no-routes")
    assert code == 0, err
    assert identity_terms(pki, "alice")[2] == []
    code, text, err = run_vpnctl("update", "alice", "--no-routes")
    assert code == 0, err
    assert text == "alice: nothing changed\n"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--ip", "10.8.0.3"], "address of 'bob'"),
        (["--ip", "10.9.0.3"], "outside the CA's overlay"),
        (["--ip", "10.8.0.1"], "reserved for the gateway"),
        (["--ip", "10.8.0.255"], "broadcast"),
        (["--routes", "0.0.0.0/0"], "default route"),
    ],
)
def test_update_refusals_are_one_line(pki: Path, out: Path, argv: list[str], fragment: str) -> None:
    issue(out, "alice", "--groups", "dev")
    issue(out, "bob")
    before = identity_terms(pki, "alice")
    code, _, err = run_vpnctl("update", "alice", *argv)
    assert code == 1
    assert fragment in assert_one_error_line(err)
    assert identity_terms(pki, "alice") == before


def test_update_refuses_an_address_another_identity_will_get(pki: Path, out: Path) -> None:
    issue(out, "alice")
    issue(out, "bob")
    assert run_vpnctl("update", "bob", "--ip", "10.8.0.60")[0] == 0
    code, _, err = run_vpnctl("update", "alice", "--ip", "10.8.0.60")
    assert code == 1
    assert "already the address of 'bob'" in assert_one_error_line(err)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["update", "alice"], 2),
        (["update", "alice", "--groups", "a", "--no-groups"], 2),
        (["update", "alice", "--routes", "10.1.0.0/16", "--no-routes"], 2),
        (["update", "alice", "--groups", "bad group!"], 2),
        (["update", "alice", "--groups", "a,,b"], 2),
        (["update", "nobody", "--groups", "dev"], 1),
        (["update", "gw", "--groups", "dev"], 1),
    ],
)
def test_update_usage_and_unknown(pki: Path, out: Path, argv: list[str], code: int) -> None:
    issue(out, "alice")
    issue(out, "gw", "--gateway", "--dns", "vpn.example.com")
    got, _, err = run_vpnctl(*argv)
    assert got == code
    assert_one_error_line(err)


# --- --now: the renew hint over the control socket -----------------------------------------


class FakeGateway:
    """A control socket answering one fixed reply per request, recording the requests."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data)
                self.requests.append(request)
                conn.sendall(json.dumps({"id": request["id"], **self.reply}).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def gateway_socket(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "ctl.sock"


def test_update_now_sends_the_renew_hint(pki: Path, out: Path, gateway_socket: Path) -> None:
    issue(out, "alice", "--groups", "dev,ops")
    gw = FakeGateway(gateway_socket, {"ok": True, "result": {"name": "alice", "sessions": 1}})
    try:
        code, text, err = run_vpnctl(
            "update", "alice", "--groups", "ops", "--now", "--socket", str(gateway_socket)
        )
    finally:
        gw.close()
    assert code == 0, err
    assert "asked the gateway to renew alice now (1 session)" in text
    [request] = gw.requests
    assert request["cmd"] == "renew-hint"
    assert request["args"]["name"] == "alice"


def test_update_now_reports_a_refusing_gateway(pki: Path, out: Path, gateway_socket: Path) -> None:
    issue(out, "alice")
    reply = {"ok": False, "error": {"code": "not_found", "message": "alice is not connected"}}
    gw = FakeGateway(gateway_socket, reply)
    try:
        code, _, err = run_vpnctl(
            "update", "alice", "--groups", "ops", "--now", "--socket", str(gateway_socket), "--json"
        )
    finally:
        gw.close()
    assert code == 1
    line = assert_one_error_line(err)
    assert "the inventory is updated" in line
    assert "alice is not connected" in line
    assert identity_terms(pki, "alice")[0] == ("ops",)


def test_update_now_with_no_gateway(pki: Path, out: Path, tmp_path: Path) -> None:
    issue(out, "alice")
    code, text, err = run_vpnctl(
        "update", "alice", "--groups", "ops", "--now", "--socket", str(tmp_path / "none.sock")
    )
    assert code == 1
    line = assert_one_error_line(err)
    assert "is vpnd running?" in line
    assert "updated alice" in text
    assert identity_terms(pki, "alice")[0] == ("ops",)


# --- list after renewals --------------------------------------------------------------------


def test_list_shows_generation_superseded_and_next_renewal(pki: Path, out: Path) -> None:
    first = issue(out, "alice", "--groups", "dev")
    code, _, err = run_vpnctl("ca", "issuer", "--name", "issuer-1")
    assert code == 0, err
    trust = load_trust_store(pki / "ca.pem", None)
    now = dt.datetime.now(dt.UTC)
    issuer = load_issuer(pki / "issuer.pem", pki / "issuer.key", roots=trust.roots, now=now)
    assert run_vpnctl("update", "alice", "--groups", "ops")[0] == 0
    presented = verify_peer(
        load_certificates(out / "alice.pem"), now=now, role=Role.PEER, trust=trust
    )
    csr = csr_for(name="alice", key=generate_key("ecdsa-p256"))
    with Inventory.open(pki / "inventory.sqlite") as inv:
        signed = sign_renewal(
            inv,
            issuer,
            presented=presented,
            csr_der=csr.public_bytes(serialization.Encoding.DER),
            lifetime_s=3 * 86400,
            now=now,
        )
        assert supersede(inv, old_serial=first, new_serial=signed.serial, now=now)
    code, text, _ = run_vpnctl("list")
    assert code == 0
    rows = {line.split()[1]: line.split() for line in text.splitlines()[1:]}
    old, new = rows[f"{first:x}"], rows[f"{signed.serial:x}"]
    assert old[2] == "1" and old[-1] == "superseded" and old[-2] == "-"
    assert new[2] == "2" and new[-1] == "valid" and new[4] == "ops"
    expected = signed.not_after - (signed.not_after - now) * 0.33
    assert abs(dt.datetime.fromisoformat(new[-2]).date() - expected.date()) <= dt.timedelta(days=1)
    code, text, _ = run_vpnctl("list", "--json")
    by_serial = {d["serial"]: d for d in json.loads(text)}
    assert by_serial[f"{first:x}"]["status"] == "superseded"
    assert by_serial[f"{first:x}"]["superseded_by"] == f"{signed.serial:x}"
    assert by_serial[f"{first:x}"]["next_renewal"] is None
    assert by_serial[f"{signed.serial:x}"]["generation"] == 2
    assert by_serial[f"{signed.serial:x}"]["issuer_fp"] == issuer.fingerprint
    assert by_serial[f"{signed.serial:x}"]["next_renewal"]


def test_renew_hint_request_is_validated_like_kick() -> None:
    from vpnd.control.protocol import Command, ControlError, decode_request

    req = decode_request(b'{"id": 1, "cmd": "renew-hint", "args": {"name": "alice"}}')
    assert req.cmd is Command.RENEW_HINT
    assert req.args == {"name": "alice"}
    for bad in (b"{}", b'{"name": ""}', b'{"name": "a", "groups": 1}', b'{"name": "a\\nb"}'):
        with pytest.raises(ControlError):
            decode_request(b'{"id": 1, "cmd": "renew-hint", "args": ' + bad + b"}")


def test_update_now_refuses_a_malformed_reply(pki: Path, out: Path, gateway_socket: Path) -> None:
    issue(out, "alice")
    gw = FakeGateway(gateway_socket, {"ok": True, "result": {"name": "alice"}})
    try:
        code, _, err = run_vpnctl(
            "update", "alice", "--groups", "ops", "--now", "--socket", str(gateway_socket)
        )
    finally:
        gw.close()
    assert code == 1
    assert "the inventory is updated" in assert_one_error_line(err)


def test_update_now_against_the_real_control_server(pki: Path, out: Path, tmp_path: Path) -> None:
    from control_fixtures import ServerThread

    issue(out, "alice", "--groups", "dev")
    issue(out, "carol")
    with ServerThread(tmp_path / "vpnd.sock") as running:
        sock = str(tmp_path / "vpnd.sock")
        code, text, err = run_vpnctl(
            "update", "alice", "--groups", "ops", "--now", "--socket", sock
        )
        assert code == 0, err
        assert "(1 session)" in text
        assert running.handler.hinted == [("alice", "the admin changed this peer's terms")]
        code, _, err = run_vpnctl("update", "carol", "--groups", "ops", "--now", "--socket", sock)
        assert code == 1
        assert "no connected peer named 'carol'" in assert_one_error_line(err)
