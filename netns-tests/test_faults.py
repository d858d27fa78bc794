"""Faults against the real daemons: a gateway crash, a dead link, packet loss, a new
underlay address, and a full disk under vpnctl. Every namespace, process, nft table and
mount made here is removed in ``finally`` (or by the lab fixture) even on failure."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from nslib import Netns, holds_within, wait_until
from vpnlab import GW_OVERLAY, LAN_HOST, VPNCTL, Lab

pytestmark = pytest.mark.netns
FAST_RECONNECT = {"initial_delay": 0.5, "max_delay": 2}
TUNNEL_UP = re.compile(r"^(\S+ \S+) \S+ +vpnd\.client: tunnel up: tun0", re.M)


def _up(lab: Lab, name: str, count: int = 1, timeout: float = 20) -> list[float]:
    """Wait (bounded) for the ``count``-th "tunnel up" in ``name``'s log; return the
    wall-clock times of all of them (parsed from the log's own timestamps)."""
    holds_within(lambda: len(TUNNEL_UP.findall(lab.hosts[name].log_text())) >= count, timeout)
    stamps = TUNNEL_UP.findall(lab.hosts[name].log_text())
    assert len(stamps) >= count, f"{name}: tunnel up x{count}?\n{lab.hosts[name].log_text()}"
    return [dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps]


def _retries(lab: Lab, name: str) -> int:
    return lab.hosts[name].log_text().count("reconnecting in")


def test_gateway_sigkill_and_restart_every_client_is_back_within_5_s(lab: Lab) -> None:
    lab.issue("alice")
    lab.issue("bob")
    lab.start_gateway()
    for name in ("alice", "bob"):
        lab.start_client(name, reconnect=FAST_RECONNECT)
        _up(lab, name)
    gw = lab.hosts["gw"]
    assert gw.proc is not None
    retries_before = {name: _retries(lab, name) for name in ("alice", "bob")}
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(5)
    gw.proc = None
    assert lab.wait_link("gw", "vpn0", present=False)
    # Clients back off while the gateway is gone: 3 failed tries take them to max_delay.
    wait_until(
        lambda: all(_retries(lab, n) >= count + 3 for n, count in retries_before.items()),
        15,
        "alice and bob to retry 3 times",
    )
    restarted = time.time()
    lab.start_gateway()
    for name in ("alice", "bob"):
        back = _up(lab, name, count=2)[1]
        assert back - restarted < 5.0, f"{name} came back {back - restarted:.2f} s after restart"
        assert lab.ping(name, GW_OVERLAY)


def test_underlay_link_down_for_10_s_then_up_recovers(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice", reconnect=FAST_RECONNECT)
    _up(lab, "alice")
    assert lab.ping("alice", GW_OVERLAY)
    ns = lab.hosts["alice"].ns
    ns.run(["ip", "link", "set", "eth0", "down"])
    try:
        time.sleep(10)  # the outage under test: the link stays down for 10 s
    finally:
        ns.run(["ip", "link", "set", "eth0", "up"])
    # The session either survived (TCP retransmits) or the client reconnected.
    assert lab.wait_for(lambda: lab.ping("alice", GW_OVERLAY, count=1, timeout=1), timeout=30), (
        lab.hosts["alice"].log_text()
    )
    assert lab.ping("alice", LAN_HOST)


def test_two_percent_loss_on_the_underlay_a_4_mb_transfer_arrives_intact(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice", reconnect=FAST_RECONNECT)
    _up(lab, "alice")
    gw = lab.hosts["gw"].ns
    rules = (
        "table inet vpnt_loss {\n"
        "  chain input { type filter hook input priority -10; policy accept;\n"
        '    iifname "eth0" numgen random mod 1000 < 20 counter drop\n'
        "  }\n"
        "}\n"
    )
    gw.run(["nft", "-f", "-"], input=rules)
    try:
        # GRO makes the veth carry few, large packets, so one round may lose none of
        # them by chance: repeat (bounded) until the loss was real. Every transfer must
        # arrive intact.
        for _ in range(5):
            assert lab.tcp_transfer("alice", "lan", LAN_HOST, size=4_000_000)
            assert lab.tcp_transfer("alice", "lan", LAN_HOST, size=4_000_000, download=True)
            if _dropped(gw) > 0:
                break
        assert _dropped(gw) > 0, "the nft rule never dropped a packet"
    finally:
        gw.run(["nft", "delete", "table", "inet", "vpnt_loss"], check=False)


def _dropped(gw: Netns) -> int:
    listing = gw.run(["nft", "list", "table", "inet", "vpnt_loss"]).stdout
    match = re.search(r"counter packets (\d+)", listing)
    assert match is not None, listing
    return int(match.group(1))


def test_client_underlay_address_change_reconnects(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice", reconnect=FAST_RECONNECT)
    _up(lab, "alice")
    ns = lab.hosts["alice"].ns
    ns.run(["ip", "addr", "flush", "dev", "eth0"])
    ns.run(["ip", "addr", "add", "172.31.0.20/24", "dev", "eth0"])
    assert lab.wait_for(lambda: lab.ping("alice", GW_OVERLAY, count=1, timeout=1), timeout=30), (
        lab.hosts["alice"].log_text()
    )
    # The new session comes from the new address.
    remotes = [p["remote"] for p in peers(lab)]
    assert len(remotes) == 1 and remotes[0].startswith("172.31.0.20:"), remotes


def peers(lab: Lab) -> list[dict[str, Any]]:
    """The gateway's connected peers, from its control socket."""
    res = subprocess.run(
        [VPNCTL, "--socket", str(lab.workdir / "gw.sock"), "peers", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: list[dict[str, Any]] = json.loads(res.stdout)
    return result


# ---- a full disk under vpnctl --------------------------------------------------------


def _vpnctl(pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VPNCTL, "--pki", str(pki), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _listing(pki: Path) -> list[dict[str, Any]]:
    """The inventory, without days_left (it ticks down while the test runs)."""
    rows: list[dict[str, Any]] = json.loads(_vpnctl(pki, "list", "--json").stdout)
    return [{k: v for k, v in row.items() if k != "days_left"} for row in rows]


def _fill(directory: Path) -> None:
    """Write into ``directory`` until the file system is full (bounded by its size)."""
    chunk = b"\0" * 4096
    with open(directory / "filler", "wb", buffering=0) as f:
        for _ in range(100_000):
            try:
                f.write(chunk)
            except OSError:
                break


def _files(directory: Path) -> list[str]:
    # SQLite's own WAL/shm files may stay after a failed write: they are its journal
    # (replayed or removed on the next open), not a half-written vpnd file.
    return sorted(n for n in os.listdir(directory) if not n.endswith(("-wal", "-shm")))


def test_disk_full_leaves_the_old_crl_and_inventory_intact() -> None:
    mnt = Path(tempfile.mkdtemp(prefix="vpnt-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        pki, out = mnt / "pki", mnt / "out"
        assert _vpnctl(pki, "ca", "init", "--name", "t", "--network", "10.8.0.0/24").returncode == 0
        out.mkdir()
        assert _vpnctl(pki, "issue", "alice", "--out", str(out)).returncode == 0
        crl_before = (pki / "crl.pem").read_bytes()
        listing_before = _listing(pki)
        _fill(mnt)
        files_before = _files(pki), _files(out)

        res = _vpnctl(pki, "crl")
        assert res.returncode == 1, res
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("vpnctl: error:"), res
        assert "Traceback" not in res.stderr
        assert (pki / "crl.pem").read_bytes() == crl_before

        res = _vpnctl(pki, "issue", "bob", "--out", str(out))
        assert res.returncode == 1, res
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, res

        assert (_files(pki), _files(out)) == files_before  # no temp or half-written files
        assert (pki / "crl.pem").read_bytes() == crl_before
        (mnt / "filler").unlink()  # with room again, nothing was half-recorded
        assert _listing(pki) == listing_before
        assert _vpnctl(pki, "crl").returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        os.rmdir(mnt)
