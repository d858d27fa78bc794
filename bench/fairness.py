"""Fairness bench: another peer's ping RTT through the gateway while one peer floods it
with tiny packets (issue #11, "tiny packets").

No root, no namespaces: a real ``Gateway`` in this process with a TUN fake that answers
packets sent to the echo address (192.168.50.1) by swapping source and destination, real
TLS on 127.0.0.1. ``bob`` (in this process) sends one ping packet at a time and waits for
its echo; ``alice`` (a subprocess, so it has its own CPU) sends 28-byte packets in frames
of 64, as fast as TCP takes them, for the whole measurement. Rows: without the per-peer
budget (``limits.peer_turn_packets`` set to 10**9, the old behaviour) and with it.

    .venv/bin/python -m bench.fairness [--pings 200] [--interval 0.02] [--budgets 256]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpnd.config import AnyMatch, PolicyConfig, Proto, RuleConfig
from vpnd.gateway.shell import Gateway, GatewaySettings
from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.pki import load_trust_store
from vpnd.pki.authority import create_ca, issue_certificate
from vpnd.pki.crl import build_crl, crl_pem
from vpnd.pki.identity import Role
from vpnd.pki.keys import certificate_pem, generate_key, private_key_pem
from vpnd.proto import ConfigReceived, Event, PacketsReceived, Session, SessionConfig
from vpnd.telemetry.logsetup import setup_logging
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.driver import SessionDriver
from vpnd.transport.tlsctx import client_context, server_context

OVERLAY = ipaddress.ip_network("10.8.0.0/24")
ECHO = "192.168.50.1"
NO_BUDGET = 10**9
ALLOW_ALL = PolicyConfig(rules=(RuleConfig(from_=AnyMatch(), to=AnyMatch(), proto=Proto.ANY),))


def udp_packet(src: str, dst: str, payload: bytes, sport: int = 40000) -> bytes:
    udp = struct.pack("!HHHH", sport, 7, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + udp


class EchoTun(FakeTun):
    """The LAN host ECHO answers bob's pings (addresses and ports swapped); the rest is
    counted."""

    def __init__(self, net: FakeNetConfigurator) -> None:
        super().__init__("vpn0", vnet_hdr=False, net=net)
        self.sunk = 0

    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int:
        for pkt in packets:
            raw = bytes(pkt)
            if raw[16:20] == ipaddress.IPv4Address(ECHO).packed and raw[20:22] == b"\x9c\x40":
                addrs = raw[16:20] + raw[12:16]
                ports = raw[22:24] + raw[20:22]
                self.inject(raw[:12] + addrs + ports + raw[24:])
            else:
                self.sunk += 1
        return len(packets)


def make_pki(d: Path) -> dict[str, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = generate_key("ecdsa-p256")
    ca = create_ca(
        name="bench-ca",
        networks=[OVERLAY],
        key=ca_key,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=2),
    )
    out = {"ca": d / "ca.pem", "crl": d / "crl.pem"}
    out["ca"].write_bytes(certificate_pem(ca))
    crl = build_crl(
        ca_cert=ca,
        ca_key=ca_key,
        revoked=[],
        crl_number=1,
        this_update=now - dt.timedelta(hours=1),
        next_update=now + dt.timedelta(days=1),
    )
    out["crl"].write_bytes(crl_pem(crl))
    for name, addr, role in (
        ("gw", "10.8.0.1", Role.GATEWAY),
        ("alice", "10.8.0.2", Role.PEER),
        ("bob", "10.8.0.3", Role.PEER),
    ):
        key = generate_key("ecdsa-p256")
        cert = issue_certificate(
            ca_cert=ca,
            ca_key=ca_key,
            name=name,
            public_key=key.public_key(),
            role=role,
            addresses=[ipaddress.ip_address(addr)],
            dns_names=["gw.bench"] if role is Role.GATEWAY else [],
            not_before=now - dt.timedelta(hours=1),
            not_after=now + dt.timedelta(days=1),
        )
        out[name] = d / f"{name}.pem"
        out[name].write_bytes(private_key_pem(key) + certificate_pem(cert))
    return out


async def open_session(
    port: int, ca: Path, pem: Path, on_packets: Any = None
) -> tuple[SessionDriver, TlsConnection]:
    ctx = client_context(ca=ca, cert=pem, key=pem)
    conn = await connect("127.0.0.1", port, ctx, server_hostname="gw.bench", timeout=10)
    loop = asyncio.get_running_loop()
    up: asyncio.Future[None] = loop.create_future()

    def on_event(event: Event) -> None:
        if isinstance(event, ConfigReceived) and not up.done():
            up.set_result(None)
        elif isinstance(event, PacketsReceived) and on_packets is not None:
            on_packets(event.packets)

    def on_lost(code: int, message: str, exc: BaseException | None) -> None:
        if not up.done():
            up.set_exception(ConnectionError(message))

    session = Session(SessionConfig(role="client"), loop.time())
    driver = SessionDriver(conn, session, on_event=on_event, on_lost=on_lost, mono=loop.time)
    driver.start()
    await asyncio.wait_for(up, 10)
    return driver, conn


async def flood(port: int, ca: Path, pem: Path, seconds: float) -> None:
    """alice: tiny packets, 64 per frame, as fast as the connection takes them."""
    driver, conn = await open_session(port, ca, pem)
    batch = [udp_packet("10.8.0.2", "192.168.50.10", b"", sport=1000 + i) for i in range(64)]
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    sent = 0
    print("flooding", flush=True)
    while loop.time() < end and not driver.session.closed:
        for _ in range(16):
            driver.session.send_packets(batch, loop.time())
        sent += 16 * 64
        driver.flush()
        if conn.write_buffer_size > 1 << 20:
            await conn.wait_writable()
        else:
            await asyncio.sleep(0)
    conn.abort()
    print(json.dumps({"sent": sent}), flush=True)


async def pings(
    driver: SessionDriver, replies: asyncio.Queue[bytes], n: int, gap: float
) -> list[float]:
    loop = asyncio.get_running_loop()
    rtts: list[float] = []
    for i in range(n):
        payload = b"ping%06d" % i
        start = time.perf_counter()
        driver.session.send_packets([udp_packet("10.8.0.3", ECHO, payload)], loop.time())
        driver.flush()
        while True:
            got = await asyncio.wait_for(replies.get(), 10)
            if got.endswith(payload):
                break
        rtts.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(gap)
    return rtts


def summary(rtts: list[float]) -> dict[str, float]:
    ordered = sorted(rtts)
    return {
        "median_ms": statistics.median(ordered),
        "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max_ms": ordered[-1],
    }


async def one_row(pki: dict[str, Path], budget: int, args: argparse.Namespace) -> dict[str, Any]:
    net = FakeNetConfigurator()
    tun = EchoTun(net)
    settings = GatewaySettings(
        tun_name="vpn0",
        mtu=1400,
        overlay_networks=(OVERLAY,),
        gateway_addresses=(ipaddress.ip_interface("10.8.0.1/24"),),
        keepalive_interval=30,
        keepalive_timeout=90,
        peer_turn_packets=budget,
    )
    gateway = Gateway(
        settings,
        tun=tun,
        net=net,
        trust=load_trust_store(pki["ca"], pki["crl"]),
        policy=ALLOW_ALL,
    )
    await gateway.start()
    ctx = server_context(ca=pki["ca"], cert=pki["gw"], key=pki["gw"], crl=pki["crl"])
    server = await serve("127.0.0.1", 0, ctx, gateway.on_connection, on_refused=gateway.on_refused)
    port = server.sockets[0].getsockname()[1]
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    def on_packets(packets: Sequence[bytes | memoryview]) -> None:
        for p in packets:
            replies.put_nowait(bytes(p))

    proc: asyncio.subprocess.Process | None = None
    try:
        bob, _ = await open_session(port, pki["ca"], pki["bob"], on_packets)
        idle = await pings(bob, replies, max(20, args.pings // 4), args.interval)
        seconds = args.pings * (args.interval + 0.01) + 30
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fairness", "--flood", str(port),
            str(pki["ca"]), str(pki["alice"]), str(seconds),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 20)  # "flooding"
        sunk0, t0 = tun.sunk, time.perf_counter()
        await asyncio.sleep(1.0)  # let the flood reach its steady state
        loaded = await pings(bob, replies, args.pings, args.interval)
        rate = (tun.sunk - sunk0) / (time.perf_counter() - t0)
        alice = next((p for p in gateway.peers.values() if p.identity.name == "alice"), None)
        return {
            "budget": budget,
            "idle": summary(idle),
            "flood": summary(loaded),
            "alice_pps": rate,
            "alice_yields": alice.turn_yields if alice is not None else -1,
        }
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await gateway.stop()
        tun.close()


def render(rows: list[dict[str, Any]]) -> str:
    head = (
        "| per-peer budget | idle ping median | flood ping median | flood p95 | flood max "
        "| alice delivered | alice yields |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "none (old)" if r["budget"] == NO_BUDGET else f"{r['budget']} packets/turn"
        f = r["flood"]
        lines.append(
            f"| {name} | {r['idle']['median_ms']:.2f} ms | {f['median_ms']:.2f} ms "
            f"| {f['p95_ms']:.2f} ms | {f['max_ms']:.2f} ms "
            f"| {r['alice_pps'] / 1000:.0f} kpkt/s | {r['alice_yields']} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="vpnd-fair-") as tmp:
        pki = make_pki(Path(tmp))
        rows = []
        for budget in [NO_BUDGET, *args.budgets]:
            rows.append(await one_row(pki, budget, args))
        return rows


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "--flood":
        port, ca, pem, seconds = argv[1:5]
        asyncio.run(flood(int(port), Path(ca), Path(pem), float(seconds)))
        return 0
    p = argparse.ArgumentParser(prog="bench.fairness", description=__doc__.split("\n")[0])
    p.add_argument("--pings", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between pings")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 64, 32])
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    rows = asyncio.run(main_async(args))
    print(render(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    load = os.getloadavg()[0]
    if load > 1:
        print(f"note: load average {load:.1f} during the run; numbers are noisy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
