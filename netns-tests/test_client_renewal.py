"""The client renews over its live tunnel on the real daemons: `vpnctl renew` twenty
times under a 10 ms ping to the LAN, not one ping lost, one TUN all along."""

from __future__ import annotations

import json
import re
import subprocess

from vpnlab import LAN_HOST, VPNCTL, Lab


def _renewing_gateway(lab: Lab) -> None:
    lab.vpnctl("ca", "issuer")
    lab.start_gateway(
        pki=lab.issuing_pki(inventory_poll="1s"),
        renewal={"enabled": True, "lifetime": "7d"},
    )


def _renew(lab: Lab, sock: str) -> dict[str, object]:
    res = subprocess.run([VPNCTL, "--socket", sock, "renew", "--json"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def test_twenty_renewals_over_the_tunnel_lose_no_ping_at_10ms(lab: Lab) -> None:
    lab.issue("alice")
    _renewing_gateway(lab)
    alice = lab.start_client("alice")
    lab.wait_up("alice")
    assert lab.ping("alice", LAN_HOST, count=2)
    sock = str(lab.workdir / "alice.sock")
    pings = lab.workdir / "alice-renew-pings.log"
    pinger = alice.ns.popen(["ping", "-n", "-i", "0.01", "-W", "1", "-c", "1500", LAN_HOST], pings)
    serials = []
    for _ in range(20):
        serials.append(_renew(lab, sock)["serial"])
    assert len(set(serials)) == 20
    try:
        pinger.wait(60)
    except subprocess.TimeoutExpired:
        pinger.kill()
        raise
    summary = pings.read_text()
    print(summary.splitlines()[-2])
    assert re.search(r"1500 packets transmitted, 1500 received", summary), summary
    log = alice.log_text()
    assert log.count("switched to the renewed certificate; the tunnel stayed up") == 20, log
    assert log.count("tunnel up: tun0") == 1 and "tunnel down" not in log, log
    assert "Traceback" not in log and "Traceback" not in lab.hosts["gw"].log_text()
    status = json.loads(
        subprocess.run([VPNCTL, "--socket", sock, "status", "--json"],
                       capture_output=True, text=True, timeout=30, check=True).stdout
    )  # fmt: skip
    renewal = status["renewal"]
    assert renewal["renewals"] == 20 and renewal["failures"] == 0
    assert renewal["generation"] in (None, 21)
    assert status["cert"]["serial"] == serials[-1]
