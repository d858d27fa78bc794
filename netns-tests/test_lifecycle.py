"""Certificates that manage themselves (issue 13), on the real daemons in namespaces.

Enrolled laptops renew inside the tunnel when the gateway asks (twenty times under a
10 ms ping, not one lost); the renewed certificate's first use supersedes the old one
and publishes it in the issuer's CRL, so a stale copy is refused and a clone of an
older generation is audited as a possible copy; `vpnctl update --groups --now` changes
what a peer reaches within seconds; and an expired laptop is quarantined to renew,
while a revoked one is refused. (Invite/enroll refusals: test_enrollment.py.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nslib import NetnsFactory, wait_until
from vpnlab import GW_WAN, LAN, LAN_HOST, PORT, VPNCTL, VPND, Lab

from vpnd.pki.crl import load_crls
from vpnd.pki.keys import load_certificates

pytestmark = pytest.mark.netns

LAN_FOR_GROUP = {"rules": [{"from": {"group": "lan"}, "to": LAN, "proto": "any"}]}


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


def start_gateway(lab: Lab, *, lifetime: str = "1h", grace: str = "0s", **extra: object) -> None:
    lab.start_gateway(
        pki=lab.issuing_pki(),
        renewal={"enabled": True, "lifetime": lifetime, "quarantine_grace": grace},
        enrollment={"enabled": True},
        **extra,
    )
    assert lab.wait_log("gw", r"listening on"), lab.hosts["gw"].log_text()


def gateway_ctl(lab: Lab, *args: str) -> str:
    res = subprocess.run(
        [VPNCTL, "--socket", str(lab.workdir / "gw.sock"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def peers(lab: Lab) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in json.loads(gateway_ctl(lab, "peers", "--json"))}


def enrolled(lab: Lab, host: str, name: str, *groups: str) -> Path:
    """`vpnctl invite` on the admin side, `vpnd enroll` on the laptop."""
    args = ["--groups", ",".join(groups)] if groups else []
    out = lab.vpnctl("invite", name, "--server", f"{GW_WAN}:{PORT}", *args)
    token = next(line for line in out.splitlines() if line.startswith("vpnd1-"))
    target = lab.workdir / f"{host}-etc"
    res = lab.hosts[host].ns.run(
        [VPND, "enroll", "-", "--dir", str(target), "--timeout", "10"],
        check=False,
        input=token + "\n",
    )
    assert res.returncode == 0, res.stderr
    return target


def start_from(lab: Lab, host: str, files: Path, **extra: object) -> None:
    """Start a client from the client.yaml `vpnd enroll` wrote, with the lab's timings."""
    cfg = yaml.safe_load((files / "client.yaml").read_text())
    for key in ("ca", "cert", "key"):
        cfg["pki"][key] = str(files / Path(cfg["pki"][key]).name)
    cfg.update(
        tun={"name": "tun0", "mtu": 1400},
        keepalive={"interval": 2, "timeout": 6},
        reconnect={"initial_delay": 0.5, "max_delay": 2},
        control_socket=str(lab.workdir / f"{host}.sock"),
        **extra,
    )
    lab._start(lab.hosts[host], cfg)


def hint(lab: Lab, name: str, *groups: str) -> None:
    """The admin (re)states the groups and asks the gateway to make the peer renew now."""
    lab.vpnctl(
        "update", name, "--groups", ",".join(groups), "--now",
        "--socket", str(lab.workdir / "gw.sock"),
    )  # fmt: skip


def test_twenty_hinted_renewals_lose_no_ping_and_old_certificates_are_refused(lab: Lab) -> None:
    start_gateway(lab)
    files = enrolled(lab, "alice", "alice", "lan")
    stale = lab.workdir / "stolen-gen1"
    shutil.copytree(files, stale)  # what a thief copies off the laptop before any renewal
    start_from(lab, "alice", files)
    lab.wait_up("alice")
    assert lab.ping("alice", LAN_HOST, count=2)
    first = peers(lab)["alice"]
    pings = lab.workdir / "pings.log"
    pinger = lab.hosts["alice"].ns.popen(
        ["ping", "-n", "-i", "0.01", "-W", "1", "-c", "2000", LAN_HOST], pings
    )
    serials = [first["serial"]]
    mid_copy = lab.workdir / "stolen-gen11"
    for i in range(20):
        hint(lab, "alice", "lan")
        wait_until(
            lambda: peers(lab).get("alice", {}).get("serial") not in serials,
            15,
            f"renewal {i + 1} to take over",
        )
        serials.append(peers(lab)["alice"]["serial"])
        if i == 9:
            shutil.copytree(files, mid_copy)  # a copy of an issuer-signed generation
    try:
        pinger.wait(60)
    except subprocess.TimeoutExpired:
        pinger.kill()
        raise
    summary = pings.read_text()
    print(summary.strip().splitlines()[-2])
    assert re.search(r"2000 packets transmitted, 2000 received", summary), summary
    assert len(set(serials)) == 21
    now = peers(lab)["alice"]
    assert now["generation"] == first["generation"] + 20
    log = lab.hosts["alice"].log_text()
    assert log.count("tunnel up: tun0") == 1 and "tunnel down" not in log, log
    # Every predecessor is superseded in the inventory and published in the issuer CRL.
    listed = json.loads(lab.vpnctl("list", "--json"))
    superseded = {c["serial"] for c in listed if c["status"] == "superseded"}
    assert set(serials[:-1]) <= superseded, listed
    crl = load_crls(lab.workdir / "issuer-crl.pem")[-1]
    issuer_signed = set(serials[:-1])  # generation 1 came from enrollment: the issuer too
    assert issuer_signed <= {f"{r.serial_number:x}" for r in crl}

    # The stale copies are refused, and the genuine laptop keeps its tunnel.
    for copy in (mid_copy, stale):
        start_from(lab, "bob", copy)
        assert lab.wait_log("gw", r"possible copy", 15), lab.hosts["gw"].log_text()
        assert not lab.wait_log("bob", r"tunnel up", 3), lab.hosts["bob"].log_text()
        lab.stop("bob")
    gw_log = lab.hosts["gw"].log_text()
    assert gw_log.count("possible copy") >= 2 and "Traceback" not in gw_log
    assert lab.ping("alice", LAN_HOST, count=2)
    assert peers(lab)["alice"]["serial"] == serials[-1]


def test_update_groups_now_changes_what_the_peer_reaches_within_5_s(lab: Lab) -> None:
    start_gateway(lab, policy=LAN_FOR_GROUP)
    files = enrolled(lab, "alice", "alice", "lan")
    start_from(lab, "alice", files)
    lab.wait_up("alice")
    assert lab.ping("alice", LAN_HOST, count=2)
    # A removal applies at once on the gateway (the inventory is a ceiling), no renewal.
    lab.vpnctl("update", "alice", "--groups", "eng")
    started = time.monotonic()
    assert lab.wait_for(lambda: not lab.ping("alice", LAN_HOST, count=1, timeout=1), 5)
    print(f"group removal effective after {time.monotonic() - started:.1f}s")
    assert peers(lab)["alice"]["groups"] == []
    # An addition with --now: the hint brings a renewed certificate carrying it.
    serial = peers(lab)["alice"]["serial"]
    hint(lab, "alice", "eng", "lan")
    started = time.monotonic()
    assert lab.wait_for(lambda: lab.ping("alice", LAN_HOST, count=1, timeout=1), 5)
    assert lab.wait_for(lambda: peers(lab)["alice"]["serial"] != serial, 5)
    print(f"group addition with --now effective after {time.monotonic() - started:.1f}s")
    assert peers(lab)["alice"]["groups"] == ["eng", "lan"]
    cert = load_certificates(files / "client.pem")[0]
    assert f"{cert.serial_number:x}" == peers(lab)["alice"]["serial"]


def test_quarantine_lets_an_expired_laptop_renew_and_refuses_a_revoked_one(lab: Lab) -> None:
    # Enrolled certificates live as long as renewed ones: 12 s here, so they expire while
    # the laptops are "asleep" (their renewal off, as if the lid were shut).
    start_gateway(lab, lifetime="12s", grace="1h")
    alice = enrolled(lab, "alice", "alice", "lan")
    bob = enrolled(lab, "bob", "bob")
    lab.vpnctl("revoke", "bob")
    not_after = load_certificates(alice / "client.pem")[0].not_valid_after_utc.timestamp()
    wait_until(lambda: time.time() > not_after + 1, 20, "the certificates to expire")
    # The laptop wakes up: its expired certificate gets it only as far as a renewal.
    start_from(lab, "alice", alice)
    assert lab.wait_log("gw", r"quarantined alice", 15), lab.hosts["alice"].log_text()
    assert "admitted only to renew" in lab.hosts["gw"].log_text()
    lab.wait_up("alice", timeout=20)
    assert lab.ping("alice", LAN_HOST, count=2)
    renewed = load_certificates(alice / "client.pem")[0]
    assert renewed.not_valid_after_utc.timestamp() > time.time()
    assert peers(lab)["alice"]["generation"] == 2
    # A revoked certificate is never quarantined: refused, no tunnel.
    start_from(lab, "bob", bob)
    assert lab.wait_log("gw", r"refused .*bob.*revoked", 15), lab.hosts["gw"].log_text()
    assert not lab.wait_log("bob", r"tunnel up", 3)
    assert "bob" not in peers(lab)
    status = json.loads(gateway_ctl(lab, "status", "--json"))
    assert status["issuer"]["not_after"]
    assert "Traceback" not in lab.hosts["gw"].log_text()


def test_scheduled_renewals_at_two_thirds_of_the_lifetime_lose_no_ping(lab: Lab) -> None:
    # 12 s certificates: the client renews by itself at about 8 s, with no hint at all.
    start_gateway(lab, lifetime="12s")
    files = enrolled(lab, "alice", "alice", "lan")
    start_from(lab, "alice", files)
    lab.wait_up("alice")
    first = peers(lab)["alice"]
    pings = lab.workdir / "scheduled-pings.log"
    pinger = lab.hosts["alice"].ns.popen(
        ["ping", "-n", "-i", "0.01", "-W", "1", "-c", "2500", LAN_HOST], pings
    )
    wait_until(
        lambda: peers(lab).get("alice", {}).get("generation", 0) >= first["generation"] + 3,
        40,
        "three scheduled renewals",
    )
    try:
        pinger.wait(60)
    except subprocess.TimeoutExpired:
        pinger.kill()
        raise
    summary = pings.read_text()
    print(summary.strip().splitlines()[-2])
    assert re.search(r"2500 packets transmitted, 2500 received", summary), (
        lab.hosts["alice"].log_text() + lab.hosts["gw"].log_text()
    )
    log = lab.hosts["alice"].log_text()
    assert log.count("tunnel up: tun0") == 1 and "tunnel down" not in log, log
    assert "hint" not in lab.hosts["gw"].log_text().lower()
