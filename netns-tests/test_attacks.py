"""Attacks against the real daemons: spoofed sources from a verified peer, packets from
the physical side aimed at overlay addresses, and a handshake flood beside a busy tunnel.

All traffic stays inside the lab's namespaces; every loop is bounded in count and time;
the probe nft table is deleted in ``finally`` and the lab fixture removes the rest.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nslib import PYTHON, wait_until
from vpnlab import GW_OVERLAY, GW_WAN, LAN_HOST, PORT, SERVER_NAME, VPNCTL, Lab

pytestmark = pytest.mark.netns
HERE = Path(__file__).resolve().parent
UDP_PORT = 9999

# Counts UDP datagrams for a bounded time, then prints their payloads as JSON.
UDP_COUNTER = """
import json, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {port})); s.settimeout(0.2); print("ready", flush=True)
got = []; end = time.monotonic() + {seconds}
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(2048)
        got.append(data.decode(errors="replace"))
    except socket.timeout:
        pass
print(json.dumps(got), flush=True)
"""

# Reads a TCP stream to EOF and reports bytes and seconds from first byte to EOF.
SINK = """
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(1); s.settimeout(30); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30); n = 0; first = None
while True:
    b = c.recv(262144)
    if not b: break
    if first is None: first = time.monotonic()
    n += len(b)
print(n, time.monotonic() - (first or time.monotonic()), flush=True)
"""
SOURCE = """
import socket, time
s = socket.create_connection(("{ip}", {port}), timeout=10); chunk = b"x" * 65536
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    s.sendall(chunk)
s.close()
"""

# Bounded flood: {total} attempts, at most {concurrency} at once, over at most {deadline} s:
# silent TCP, garbage bytes, and TLS ClientHellos without a client certificate.
FLOOD = """
import asyncio, json, os, ssl, time
HOST, PORT = "{host}", {port}
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(["vpnd/1"])
stats = {{"silent": 0, "garbage": 0, "tls": 0, "failed": 0}}
async def one(i):
    kind = ("silent", "garbage", "tls")[i % 3]
    try:
        if kind == "tls":
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, PORT, ssl=ctx,
                server_hostname="x"), 5)
            try:
                await asyncio.wait_for(r.read(100), 2)
            except Exception:
                pass
        else:
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, PORT), 5)
            if kind == "garbage":
                w.write(os.urandom(512)); await w.drain()
            await asyncio.sleep(1.0 if kind == "silent" else 0.05)
        w.close()
        stats[kind] += 1
    except Exception:
        stats["failed"] += 1
async def main():
    sem = asyncio.Semaphore({concurrency}); start = time.monotonic()
    async def guarded(i):
        async with sem:
            if time.monotonic() - start < {deadline}:
                await one(i)
    try:
        await asyncio.wait_for(asyncio.gather(*(guarded(i) for i in range({total}))),
                               {deadline} + 10)
    except asyncio.TimeoutError:
        pass
    stats["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(stats), flush=True)
asyncio.run(main())
"""


def control(lab: Lab, *args: str) -> Any:
    res = subprocess.run(
        [VPNCTL, "--socket", str(lab.workdir / "gw.sock"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(res.stdout)


def _counter(lab: Lab, where: str, seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    log = lab.workdir / f"udp-{where}.log"
    proc = lab.ns_of(where).popen(
        [PYTHON, "-c", UDP_COUNTER.format(port=UDP_PORT, seconds=seconds)], log
    )
    assert lab.wait_for(lambda: "ready" in log.read_text(), timeout=10)
    return proc, log


def _counted(proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    proc.wait(30)
    got: list[str] = json.loads(log.read_text().splitlines()[-1])
    return got


def _udp(src: str, dst: str, payload: str) -> str:
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP

    return raw(IP(src=src, dst=dst) / UDP(sport=5555, dport=UDP_PORT) / payload.encode()).hex()


def test_spoofed_sources_from_a_verified_peer_arrive_nowhere(lab: Lab) -> None:
    lab.issue("alice", "--ip", "10.8.0.2")
    lab.issue("bob", "--ip", "10.8.0.3")
    carol = lab.issue("carol", "--ip", "10.8.0.4")
    # With the nft mirror on (the lab default): CONFIG is sent only once carol's
    # sources are in the set, so her control packets, sent at once, must arrive.
    lab.start_gateway()
    for name in ("alice", "bob"):
        lab.start_client(name)
        lab.wait_up(name)
    lan, lan_log = _counter(lab, "lan", 8)
    bob, bob_log = _counter(lab, "bob", 8)
    packets = [
        _udp("10.8.0.1", LAN_HOST, "spoof-gateway"),
        _udp("10.8.0.3", LAN_HOST, "spoof-bob"),
        _udp("203.0.113.5", LAN_HOST, "spoof-outside"),
        _udp("10.8.0.2", "10.8.0.3", "spoof-alice-to-bob"),
        # Controls with carol's own address: they must arrive, or the test proves nothing.
        _udp("10.8.0.4", LAN_HOST, "own-to-lan"),
        _udp("10.8.0.4", "10.8.0.3", "own-to-bob"),
    ]
    res = lab.hosts["mallory"].ns.python(
        [
            str(HERE / "rogue_peer.py"),
            str(carol / "ca.pem"),
            str(carol / "carol.pem"),
            str(carol / "carol.key"),
            f"{GW_WAN}:{PORT}",
            SERVER_NAME,
            *packets,
        ],
        timeout=60,
    )
    assert json.loads(res.stdout)["config"]["address"] == "10.8.0.4/24", res.stdout
    assert _counted(lan, lan_log) == ["own-to-lan"]
    assert _counted(bob, bob_log) == ["own-to-bob"]
    # The gateway says why: carol has hung up, so her drops sit in the gateway total.
    assert lab.wait_for(lambda: control(lab, "status")["drops"].get("spoofed_source") == 4)


def test_packets_from_the_physical_side_never_reach_an_overlay_address(lab: Lab) -> None:
    lab.issue("alice", "--ip", "10.8.0.2")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    gw = lab.hosts["gw"].ns
    probe = (
        "table inet vpnt_probe {\n"
        "  chain probe_forward { type filter hook forward priority -5; policy accept;\n"
        '    iifname "eth0" oifname "vpn0" counter\n'
        "  }\n"
        "}\n"
    )
    gw.run(["nft", "-f", "-"], input=probe)
    try:
        alice, alice_log = _counter(lab, "alice", 5)
        mallory = lab.hosts["mallory"].ns
        mallory.run(["ip", "route", "add", "10.8.0.0/24", "via", GW_WAN])
        sender = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(5):\n"
            f"    s.sendto(b'from-the-wire', ('10.8.0.2', {UDP_PORT}))\n"
        )
        mallory.python(["-c", sender])
        assert not lab.ping("mallory", "10.8.0.2", count=2, timeout=1)
        assert _counted(alice, alice_log) == []
        listing = gw.run(["nft", "list", "table", "inet", "vpnt_probe"]).stdout
        match = re.search(r"counter packets (\d+)", listing)
        assert match is not None and int(match.group(1)) >= 5, listing  # they did get in
        # The gateway dropped them as unsolicited traffic from its side of the tunnel.
        drops = control(lab, "status")["drops"]
        assert sum(drops.values()) >= 5, drops
        assert lab.ping("alice", GW_OVERLAY)  # and alice is unaffected
    finally:
        gw.run(["nft", "delete", "table", "inet", "vpnt_probe"], check=False)


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match is not None
    return int(match.group(1))


def _throughput(lab: Lab, seconds: float) -> float:
    """Bytes per second of one TCP stream alice -> LAN host through the tunnel."""
    port = 7000 + lab._tcp_runs
    lab._tcp_runs += 1
    log = lab.workdir / f"sink-{port}.log"
    sink = lab.ns_of("lan").popen([PYTHON, "-c", SINK.format(port=port)], log)
    try:
        assert lab.wait_for(lambda: "ready" in log.read_text(), timeout=10)
        lab.hosts["alice"].ns.python(
            ["-c", SOURCE.format(ip=LAN_HOST, port=port, seconds=seconds)],
            timeout=seconds + 30,
        )
        sink.wait(30)
        size, elapsed = log.read_text().splitlines()[-1].split()
        return int(size) / max(float(elapsed), 1e-3)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)


def _refused(lab: Lab) -> int:
    handshakes = control(lab, "status")["handshakes"]
    return sum(v for k, v in handshakes.items() if k.startswith("refused_"))


def test_handshake_flood_leaves_an_established_tunnel_working(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    gw = lab.hosts["gw"].proc
    assert gw is not None
    _throughput(lab, 1)  # warm up
    unloaded = _throughput(lab, 4)
    rss_before = _rss_kib(gw.pid)
    flood_log = lab.workdir / "flood.log"
    flood = lab.hosts["mallory"].ns.popen(
        [
            PYTHON,
            "-c",
            FLOOD.format(host=GW_WAN, port=PORT, total=2000, concurrency=64, deadline=20),
        ],
        flood_log,
    )
    try:
        wait_until(lambda: _refused(lab) >= 50, 15, "the flood to reach the gateway")
        loaded = _throughput(lab, 4)
        flood.wait(40)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(5)
    stats = json.loads(flood_log.read_text().splitlines()[-1])
    attempts = stats["silent"] + stats["garbage"] + stats["tls"] + stats["failed"]
    assert attempts >= 1000, stats  # the flood really happened
    assert loaded >= unloaded / 2, f"{loaded * 8e-6:.0f} vs {unloaded * 8e-6:.0f} Mbit/s"
    rss_after = _rss_kib(gw.pid)
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    handshakes = control(lab, "status")["handshakes"]
    assert _refused(lab) >= 500, handshakes
    # alice never dropped: one tunnel up, no tunnel down, and she still pings.
    log = lab.hosts["alice"].log_text()
    assert log.count("tunnel up: tun0") == 1 and "tunnel down" not in log, log
    assert lab.ping("alice", GW_OVERLAY)
