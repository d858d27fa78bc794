"""Operating a running gateway: vpnctl status/peers/kick/reload, SIGHUP, metrics, socket."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
import yaml
from nslib import wait_until
from vpnlab import GW_OVERLAY, LAN, LAN_HOST, VPNCTL, Lab

pytestmark = pytest.mark.netns


def ctl(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """vpnctl against the gateway's control socket (a unix socket: no namespace needed)."""
    res = subprocess.run(
        [VPNCTL, "--socket", str(lab.workdir / "gw.sock"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"vpnctl {args}: {res.returncode} {res.stderr}")
    return res


def peers(lab: Lab) -> dict[str, Any]:
    return {p["name"]: p for p in json.loads(ctl(lab, "peers", "--json").stdout)}


def test_status_and_peers_counters_grow_after_pings(lab: Lab) -> None:
    lab.issue("alice", "--groups", "eng")
    lab.issue("bob")
    lab.start_gateway()
    lab.start_client("alice")
    lab.start_client("bob")
    lab.wait_up("alice")
    lab.wait_up("bob")
    status = json.loads(ctl(lab, "status", "--json").stdout)
    assert status["role"] == "gateway" and status["sessions"] == 2
    assert status["tun"] == "vpn0" and status["cert"]["name"] == "gw"
    assert status["crl"]["number"] >= 1 and status["crl"]["stale"] is False
    before = peers(lab)
    assert set(before) == {"alice", "bob"}
    assert before["alice"]["addresses"] == ["10.8.0.2"] and before["alice"]["groups"] == ["eng"]
    assert lab.ping("alice", GW_OVERLAY, count=5)
    after = peers(lab)
    assert after["alice"]["packets_in"] >= before["alice"]["packets_in"] + 5
    assert after["alice"]["packets_out"] >= before["alice"]["packets_out"] + 5
    assert after["alice"]["bytes_in"] > before["alice"]["bytes_in"]
    assert after["bob"]["packets_in"] == before["bob"]["packets_in"]
    table = ctl(lab, "peers").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "ADDRESS", "GROUPS"]
    print(ctl(lab, "status").stdout)
    print(table)


def test_kick_drops_a_peer_within_a_second(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice", reconnect={"initial_delay": 5.0, "max_delay": 10.0})
    lab.wait_up("alice")
    t0 = time.monotonic()
    out = ctl(lab, "kick", "alice", "--reason", "maintenance")
    assert "alice" in out.stdout
    assert lab.wait_log("alice", r"an administrator disconnected this session: maintenance", 5)
    assert lab.wait_link("alice", "tun0", present=False, timeout=5)
    print(f"kick to client tear-down observed after {time.monotonic() - t0:.2f}s")
    assert "alice" not in peers(lab)
    missing = ctl(lab, "kick", "nobody", check=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr


def _ping_flow(lab: Lab) -> subprocess.Popen[bytes]:
    return lab.hosts["alice"].ns.popen(
        ["ping", "-n", "-D", "-i", "0.1", "-W", "1", "-c", "60", LAN_HOST],
        lab.workdir / "ping.log",
    )


def test_reload_with_a_tightened_policy_cuts_the_flow_but_keeps_the_peer(lab: Lab) -> None:
    lab.issue("alice", "--groups", "eng")
    open_policy = {"rules": [{"from": "any", "to": "any", "proto": "any"}]}
    lab.start_gateway(policy=open_policy)
    lab.start_client("alice")
    lab.wait_up("alice")
    assert lab.ping("alice", LAN_HOST)
    gw = lab.hosts["gw"]
    assert gw.config is not None
    # An invalid config is refused and the old one keeps running.
    good = gw.config.read_text()
    gw.config.write_text(good.replace("mode: gateway", "mode: gateway\nbogus_key: 1"))
    bad = ctl(lab, "reload", check=False)
    assert bad.returncode == 1 and "invalid_config" in bad.stderr and "bogus_key" in bad.stderr
    assert lab.ping("alice", LAN_HOST)
    # Tighten: only the gateway's address remains reachable.
    cfg = yaml.safe_load(good)
    cfg["policy"] = {"rules": [{"from": "any", "to": f"{GW_OVERLAY}/32", "proto": "icmp"}]}
    gw.config.write_text(yaml.safe_dump(cfg))
    report = json.loads(ctl(lab, "reload", "--json").stdout)
    assert any(line.startswith("policy: 1 rules -> 1 rules") for line in report["changed"])
    assert report["closed"] == []
    assert not lab.ping("alice", LAN_HOST, count=2, timeout=1), "the flow must be cut"
    assert lab.ping("alice", GW_OVERLAY), "the peer stays connected"
    assert "alice" in peers(lab)
    # SIGHUP does the same: loosen again and the LAN is back.
    cfg["policy"] = {"rules": [{"from": "any", "to": LAN, "proto": "icmp"}]}
    gw.config.write_text(yaml.safe_dump(cfg))
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert lab.wait_log("gw", r"SIGHUP reload: policy")
    assert lab.ping("alice", LAN_HOST)


def test_metrics_endpoint_on_loopback_with_expiry_gauges(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway(metrics={"listen": "127.0.0.1:9469"})
    lab.start_client("alice")
    lab.wait_up("alice")
    assert lab.ping("alice", GW_OVERLAY, count=2)
    probe = (
        "import urllib.request\n"
        "print(urllib.request.urlopen('http://127.0.0.1:9469/metrics', timeout=5).read().decode())"
    )
    text = lab.hosts["gw"].ns.python(["-c", probe]).stdout
    assert "vpnd_up 1.0" in text
    assert "vpnd_sessions 1.0" in text
    assert 'vpnd_certificate_expiry_seconds{kind="own",name="gw"}' in text
    assert 'vpnd_certificate_expiry_seconds{kind="peer",name="alice"}' in text
    assert 'vpnd_certificate_expiry_seconds{kind="ca"' in text
    assert "vpnd_crl_next_update_seconds" in text


def _vpnctl_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run vpnctl's main() in a forked child that dropped to uid/gid 65534 (nobody).

    Forked, not exec'd: the venv's interpreter lives under /root, which nobody cannot
    execute, but the code under test is vpnctl itself, already imported here.
    """
    from vpnctl.cli import main

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out, err = io.StringIO(), io.StringIO()
            code = main(argv, out, err)
            os.write(write_fd, err.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        err_text = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err_text


def test_control_socket_refuses_a_non_root_user(lab: Lab) -> None:
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on")
    sock = lab.workdir / "gw.sock"
    assert (sock.stat().st_mode & 0o777) == 0o600
    os.chmod(lab.workdir, 0o755)  # nobody may reach the socket file, not use it
    code, err = _vpnctl_as_nobody(["--socket", str(sock), "status"])
    assert code == 1, err
    assert "permission denied" in err and "Traceback" not in err
    # Even a socket opened up by mistake (0666) refuses by peer credentials.
    os.chmod(sock, 0o666)
    code, err = _vpnctl_as_nobody(["--socket", str(sock), "status"])
    assert code == 1 and "forbidden" in err, err
    os.chmod(sock, 0o600)
    assert json.loads(ctl(lab, "status", "--json").stdout)["role"] == "gateway"


def test_renewed_client_certificate_rotates_without_dropping_the_tunnel(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    old_serial = peers(lab)["alice"]["serial"]
    pinger = lab.hosts["alice"].ns.popen(
        ["ping", "-n", "-i", "0.05", "-W", "1", "-c", "120", GW_OVERLAY],
        lab.workdir / "ping-rotate.log",
    )
    wait_until(
        lambda: "bytes from" in (lab.workdir / "ping-rotate.log").read_text(),
        10,
        "the first ping reply before the renewal",
    )
    lab.issue("alice")  # the admin renews: new key and certificate in the client's files
    assert lab.wait_log("alice", r"switched to the renewed certificate; the tunnel stayed up", 20)
    pinger.wait(30)
    summary = (lab.workdir / "ping-rotate.log").read_text()
    print(summary.splitlines()[-2])
    received = int(summary.split(" received")[0].rsplit(",", 1)[-1])
    assert received >= 118, summary  # at most a packet or two in flight at the switch
    assert "tunnel down" not in lab.hosts["alice"].log_text()
    new = peers(lab)["alice"]
    assert new["serial"] != old_serial
    assert lab.wait_log("gw", r"alice replaced by a renewed certificate")


def test_client_status_shows_its_tunnel_and_gateway(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    sock = str(lab.workdir / "alice.sock")
    res = subprocess.run([VPNCTL, "--socket", sock, "status", "--json"],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    status = json.loads(res.stdout)
    assert status["role"] == "client" and status["sessions"] == 1
    assert status["tun"] == "tun0" and status["cert"]["name"] == "alice"
    assert lab.ping("alice", GW_OVERLAY, count=3)
    res = subprocess.run([VPNCTL, "--socket", sock, "peers", "--json"],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    (gw,) = json.loads(res.stdout)
    assert gw["name"] == "gw" and gw["addresses"] == [GW_OVERLAY]
    assert gw["packets_in"] >= 3 and gw["packets_out"] >= 3
    print(subprocess.run([VPNCTL, "--socket", sock, "status"], capture_output=True,
                         text=True, timeout=30, check=True).stdout)  # fmt: skip
    kick = subprocess.run([VPNCTL, "--socket", sock, "kick", "x"],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert kick.returncode == 1 and "gateway command" in kick.stderr


def test_gateway_certificate_renewed_by_reload_keeps_live_tunnels(lab: Lab) -> None:
    lab.issue("alice")
    lab.issue("bob")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    before = json.loads(ctl(lab, "status", "--json").stdout)["cert"]["serial"]
    # The admin renews the gateway's certificate in place, then reloads.
    lab.issue("gw", "--gateway", "--dns", "gw.vpn.test", "--ip", GW_OVERLAY)
    report = json.loads(ctl(lab, "reload", "--json").stdout)
    assert any(line.startswith("gateway certificate: now serial") for line in report["changed"])
    assert report["closed"] == []
    status = json.loads(ctl(lab, "status", "--json").stdout)
    assert status["cert"]["serial"] != before
    assert lab.ping("alice", GW_OVERLAY), "the live tunnel was kept"
    assert "tunnel down" not in lab.hosts["alice"].log_text()
    # A new client handshakes against the renewed certificate.
    lab.start_client("bob")
    lab.wait_up("bob")
    assert lab.ping("bob", GW_OVERLAY)
