"""vpnd touches only what it created (issue #11): a foreign interface named like the TUN
is refused and kept, a second instance is refused before it touches the kernel, a TUN
that vanishes ends the daemon once (no traceback storm), and after SIGKILL ``vpnd
cleanup`` (or the next start) puts addresses, routes, nft tables and the forwarding
sysctls back to what they were before vpnd. Plus IPv6 forwarding for an IPv6 LAN.

Every test keeps its runtime state under the lab's own directory (VPND_RUNTIME_DIR)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from nslib import Netns
from vpnlab import GW_OVERLAY, LAN, OVERLAY, SERVER_NAME, VPND, Lab

pytestmark = pytest.mark.netns

SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


@pytest.fixture(autouse=True)
def _runtime_dir(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited by every vpnd the lab starts (and by `vpnd cleanup` below).
    monkeypatch.setenv("VPND_RUNTIME_DIR", str(lab.workdir / "run"))


def _sysctl(ns: Netns, key: str) -> str:
    return ns.run(["sysctl", "-n", key]).stdout.strip()


def _snapshot(ns: Netns) -> str:
    nft = ns.run(["nft", "list", "ruleset"]).stdout
    sysctls = "".join(f"{k}={_sysctl(ns, k)}\n" for k in SYSCTLS)
    return ns.snapshot() + "nft:\n" + nft + sysctls


def _exited(lab: Lab, name: str, timeout: float = 20) -> int:
    proc = lab.hosts[name].proc
    assert proc is not None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"vpnd on {name} did not exit:\n{lab.hosts[name].log_text()}"
        ) from None


def _kill(lab: Lab, name: str) -> None:
    proc = lab.hosts[name].proc
    assert proc is not None
    proc.kill()
    proc.wait(10)
    lab.hosts[name].proc = None


def _cleanup(lab: Lab, name: str) -> subprocess.CompletedProcess[str]:
    host = lab.hosts[name]
    assert host.config is not None
    return host.ns.run([VPND, "cleanup", "--config", str(host.config)], check=False)


def test_a_foreign_interface_named_like_the_tun_is_refused_and_kept(lab: Lab) -> None:
    gw = lab.hosts["gw"].ns
    gw.run(["ip", "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn0peer"])
    lab.start_gateway()
    assert _exited(lab, "gw") != 0
    text = lab.hosts["gw"].log_text()
    assert "was not created by vpnd" in text, text
    assert "Traceback" not in text, text
    assert lab.has_link("gw", "vpn0"), "vpnd deleted an interface it did not create"
    gw.run(["ip", "link", "del", "vpn0"])


def test_a_stale_link_marked_by_a_dead_vpnd_is_replaced(lab: Lab) -> None:
    gw = lab.hosts["gw"].ns
    dead = subprocess.run(["true"], check=True)
    del dead
    probe = subprocess.Popen(["true"])
    probe.wait()
    gw.run(["ip", "tuntap", "add", "mode", "tun", "name", "vpn0"])
    gw.run(["ip", "link", "set", "vpn0", "alias", f"vpnd:{probe.pid}"])
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), lab.hosts["gw"].log_text()
    alias = gw.run(["cat", "/sys/class/net/vpn0/ifalias"], check=False).stdout.strip()
    assert re.fullmatch(r"vpnd:\d+", alias) and alias != f"vpnd:{probe.pid}", alias


def test_a_second_instance_is_refused_and_the_first_loses_no_ping(lab: Lab) -> None:
    lab.issue("alice")
    gw = lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), gw.log_text()
    lab.start_client("alice")
    lab.wait_up("alice")
    alice = lab.hosts["alice"].ns
    pinger = alice.popen(
        ["ping", "-n", "-c", "40", "-i", "0.1", "-W", "2", GW_OVERLAY], lab.workdir / "ping.log"
    )
    assert gw.config is not None
    second_log = lab.workdir / "gw-second.log"
    second = gw.ns.popen([VPND, "--config", str(gw.config)], second_log)
    assert second.wait(30) == 1
    pinger.wait(30)
    text = second_log.read_text()
    lines = [ln for ln in text.splitlines() if "ERROR" in ln or "error" in ln]
    assert len(lines) == 1 and "another vpnd" in lines[0], text
    assert "Traceback" not in text, text
    ping = (lab.workdir / "ping.log").read_text()
    assert " 0% packet loss" in ping, ping
    assert lab.ping("alice", GW_OVERLAY), "the first gateway lost its tunnel"
    assert "Traceback" not in gw.log_text()


def test_a_tun_deleted_under_a_running_gateway_exits_once_without_traceback(lab: Lab) -> None:
    gw = lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), gw.log_text()
    gw.ns.run(["ip", "link", "del", "vpn0"])
    assert _exited(lab, "gw") != 0
    lab.hosts["gw"].proc = None
    text = gw.log_text()
    assert "Traceback" not in text, text
    assert len(re.findall(r"TUN vpn0 is gone", text)) == 1, text
    assert len(re.findall(r" ERROR ", text)) == 1, text


def test_a_tun_deleted_under_a_running_client_exits_once_without_traceback(lab: Lab) -> None:
    lab.issue("alice")
    assert lab.wait_log("gw", r"listening on") if lab.start_gateway() else False
    alice = lab.start_client("alice")
    lab.wait_up("alice")
    alice.ns.run(["ip", "link", "del", "tun0"])
    assert _exited(lab, "alice") != 0
    lab.hosts["alice"].proc = None
    text = alice.log_text()
    assert "Traceback" not in text, text
    assert len(re.findall(r"TUN tun0 is gone", text)) == 1, text
    assert len(re.findall(r" ERROR ", text)) == 1, text


def test_sigkill_then_vpnd_cleanup_restores_the_snapshot(lab: Lab) -> None:
    lab.issue("alice")
    gw = lab.hosts["gw"]
    gw.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    before = {n: _snapshot(lab.hosts[n].ns) for n in ("gw", "alice")}
    lab.start_gateway(nat="masquerade")
    assert lab.wait_log("gw", r"listening on"), gw.log_text()
    lab.start_client("alice")
    lab.wait_up("alice")
    assert _sysctl(gw.ns, "net.ipv4.ip_forward") == "1"
    _kill(lab, "gw")
    _kill(lab, "alice")
    assert _snapshot(gw.ns) != before["gw"]  # the dead gateway left its table and sysctls
    for name in ("gw", "alice"):
        res = _cleanup(lab, name)
        assert res.returncode == 0, res.stdout + res.stderr
    out = _cleanup(lab, "gw")
    assert out.returncode == 0 and "nothing to undo" in out.stdout, out.stdout
    for name in ("gw", "alice"):
        assert _snapshot(lab.hosts[name].ns) == before[name], name
    assert not list((lab.workdir / "run").glob("*.json")), "state files left behind"


def test_restart_after_sigkill_keeps_the_pre_vpnd_forwarding_value(lab: Lab) -> None:
    gw = lab.hosts["gw"]
    gw.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), gw.log_text()
    _kill(lab, "gw")
    assert _sysctl(gw.ns, "net.ipv4.ip_forward") == "1"  # what the crash left
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), gw.log_text()
    assert "cleaned up after a previous vpnd" in gw.log_text()
    assert lab.stop("gw") == 0
    assert _sysctl(gw.ns, "net.ipv4.ip_forward") == "0"
    assert not gw.ns.run(["nft", "list", "tables"]).stdout.strip()


def _ifname_with(ns: Netns, addr: str) -> str:
    for line in ns.run(["ip", "-o", "addr", "show"]).stdout.splitlines():
        if f" {addr}/" in line:
            return line.split()[1]
    raise AssertionError(f"no interface with {addr}")


def test_an_ipv6_lan_host_behind_the_gateway_is_reachable_from_a_peer(lab: Lab) -> None:
    pki6 = lab.workdir / "pki6"
    lab.vpnctl("ca", "init", "--name", "corp6", "--network", OVERLAY,
               "--network", "fd00:8::/64", pki=pki6)  # fmt: skip
    lab.issue("gw", "--gateway", "--dns", SERVER_NAME, "--ip", GW_OVERLAY, "fd00:8::1", pki=pki6)
    lab.issue("alice", "--ip", "10.8.0.2", "fd00:8::2", pki=pki6)
    gw, lan = lab.hosts["gw"].ns, lab.ns_of("lan")
    gw_if, lan_if = _ifname_with(gw, "192.168.50.1"), _ifname_with(lan, "192.168.50.10")
    for ns, ifname, addr in ((gw, gw_if, "fd00:50::1/64"), (lan, lan_if, "fd00:50::10/64")):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0"])
        ns.run(["ip", "addr", "add", addr, "dev", ifname, "nodad"])
    lan.run(["ip", "-6", "route", "add", "fd00:8::/64", "via", "fd00:50::1"])
    certs = lab.workdir / "certs" / "gw"
    pki = {"ca": str(pki6 / "ca.pem"), "cert": str(certs / "gw.pem"),
           "key": str(certs / "gw.key"), "crl": str(pki6 / "crl.pem")}  # fmt: skip
    lab.start_gateway(pki=pki, push_routes=[LAN, "fd00:50::/64"])
    assert lab.wait_log("gw", r"listening on"), lab.hosts["gw"].log_text()
    lab.start_client("alice")
    lab.wait_up("alice")
    assert _sysctl(gw, "net.ipv6.conf.all.forwarding") == "1"
    alice = lab.hosts["alice"].ns

    def ping6() -> bool:
        res = alice.run(["ping", "-6", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2",
                         "fd00:50::10"], check=False, timeout=15)  # fmt: skip
        return res.returncode == 0

    assert lab.wait_for(ping6, timeout=15), lab.hosts["gw"].log_text()
    assert lab.stop("gw") == 0
    assert _sysctl(gw, "net.ipv6.conf.all.forwarding") == "0"


def test_vpnd_cleanup_with_nothing_to_do_exits_0(lab: Lab) -> None:
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on")
    assert lab.stop("gw") == 0
    res = _cleanup(lab, "gw")
    assert res.returncode == 0 and "nothing to undo" in res.stdout, res.stdout + res.stderr
    assert Path(lab.workdir / "run").is_dir()
