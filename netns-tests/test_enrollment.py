"""Invite -> `vpnd enroll` on the laptop -> connected, on the real daemons.

The key is made on the laptop (its scalar never appears in anything the admin side
holds); a reused token, an expired one and a wrong pin are each refused with one line
and leave no files behind.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from nslib import NetnsFactory
from vpnlab import GW_OVERLAY, GW_WAN, PORT, VPND, Lab

from vpnd.pki.enrollment_token import ca_pin, parse_token
from vpnd.pki.keys import load_certificate, load_private_key

pytestmark = pytest.mark.netns


@pytest.fixture
def lab(netns_factory: NetnsFactory) -> Iterator[Lab]:
    lab = Lab(netns_factory)
    lab.build(clients=("alice", "bob"))
    lab.make_pki()
    lab.vpnctl("ca", "issuer")
    try:
        yield lab
    finally:
        problems = lab.cleanup()
        assert not problems, problems


def start_gateway(lab: Lab) -> None:
    lab.start_gateway(
        pki=lab.issuing_pki(),
        enrollment={"enabled": True},
    )
    assert lab.wait_log("gw", r"listening on"), lab.hosts["gw"].log_text()


def invite(lab: Lab, name: str, *extra: str) -> str:
    out = lab.vpnctl("invite", name, "--server", f"{GW_WAN}:{PORT}", *extra)
    return next(line for line in out.splitlines() if line.startswith("vpnd1-"))


def enroll(lab: Lab, host: str, token: str, target: Path) -> subprocess.CompletedProcess[str]:
    return lab.hosts[host].ns.run(
        [VPND, "enroll", "-", "--dir", str(target), "--timeout", "10"],
        check=False,
        input=token + "\n",
    )


def start_enrolled(lab: Lab, host: str, target: Path) -> None:
    """Start the client from the client.yaml enroll wrote, with the lab's timings."""
    cfg = yaml.safe_load((target / "client.yaml").read_text())
    for key in ("ca", "cert", "key"):
        cfg["pki"][key] = str(target / cfg["pki"][key])
    cfg.update(
        tun={"name": "tun0", "mtu": 1400},
        keepalive={"interval": 2, "timeout": 6},
        control_socket=str(lab.workdir / f"{host}.sock"),
    )
    lab._start(lab.hosts[host], cfg)


def test_invite_enroll_connect_and_refusals(lab: Lab) -> None:
    start_gateway(lab)
    token = invite(lab, "alice", "--groups", "staff")
    target = lab.workdir / "alice-etc"
    res = enroll(lab, "alice", token, target)
    assert res.returncode == 0, res.stderr
    assert "enrolled as alice" in res.stdout
    key = load_private_key(target / "client.key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert (target / "client.key").stat().st_mode & 0o777 == 0o600
    assert load_certificate(target / "client.pem").public_key() == key.public_key()
    # The key was made on the laptop: nothing on the admin's side holds it.
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    for path in lab.pki.rglob("*"):
        if path.is_file():
            assert scalar not in path.read_bytes(), path
    start_enrolled(lab, "alice", target)
    lab.wait_up("alice")
    assert lab.ping("alice", GW_OVERLAY)

    # The same token again (from another laptop): refused, one line, no files.
    again = enroll(lab, "bob", token, lab.workdir / "bob-etc")
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already used" in again.stderr
    assert not (lab.workdir / "bob-etc").exists()
    assert lab.wait_log("gw", r"enrollment refused .*invite .*already used")
    assert "vpnd1-" not in lab.hosts["gw"].log_text()


def test_expired_token_and_wrong_pin_are_refused(lab: Lab) -> None:
    start_gateway(lab)
    token = invite(lab, "bob")
    with sqlite3.connect(lab.pki / "inventory.sqlite") as db:
        db.execute("UPDATE invites SET expires_at = 1 WHERE invite_id = ?",
                   (parse_token(token).invite_id,))  # fmt: skip
    res = enroll(lab, "bob", token, lab.workdir / "bob-etc")
    assert res.returncode == 1 and "expired" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1

    other = lab.other_ca()
    fresh = parse_token(invite(lab, "bob2"))
    from dataclasses import replace

    wrong = replace(fresh, ca_pin=ca_pin(load_certificate(other / "ca.pem"))).encode()
    res = enroll(lab, "bob", wrong, lab.workdir / "bob-etc")
    assert res.returncode == 1 and "wrong pin" in res.stderr, res.stderr
    assert not (lab.workdir / "bob-etc").exists()
    # Nothing secret reached the gateway: it saw no redeem attempt for that invite.
    assert fresh.invite_id not in lab.hosts["gw"].log_text()
