"""Load generator for the scale bench: N simulated vpnd clients in one asyncio process.

Each client has its own certificate (issued here with ``vpnd.pki`` from the bench CA,
in memory, then written as one key+cert PEM for ``ssl``), does the real TLS 1.3
handshake with ``vpnd.transport.connection.connect``, sends HELLO and answers
keepalives through ``vpnd.proto.Session`` driven by ``SessionDriver``. No TUN: packets
received are counted and dropped.

Controlled over stdin/stdout, one JSON object per line::

    {"cmd": "ramp", "total": 1000, "concurrency": 16}  -> {"ok": true, "established": ...}
    {"cmd": "status"}                                   -> {"ok": true, "victim_closed_at": ...}
    {"cmd": "quit"}

``--victim PEM`` is connected first, so the orchestrator can revoke it by name.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpnd.pki.authority import ca_networks, issue_certificate
from vpnd.pki.identity import Role
from vpnd.pki.keys import (
    certificate_pem,
    generate_key,
    load_certificate,
    load_private_key,
    private_key_pem,
)
from vpnd.proto import ConfigReceived, Event, Session, SessionConfig
from vpnd.transport.connection import connect
from vpnd.transport.driver import SessionDriver
from vpnd.transport.tlsctx import client_context

CONNECT_TIMEOUT = 15.0
RAMP_TIMEOUT = 600.0
MAX_CLIENTS = 20_000


@dataclass
class Sim:
    """One simulated client."""

    index: int
    pem: Path
    driver: SessionDriver | None = None
    established_at: float | None = None
    closed_at: float | None = None
    close_reason: str = ""


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir: Path = args.workdir
        self.ca_path: Path = args.ca
        self.ca_cert = load_certificate(args.ca)
        self.ca_key = load_private_key(args.ca_key, None)
        self.sims: list[Sim] = []
        self.failures: Counter[str] = Counter()
        self.victim: Sim | None = None
        self._addresses = self._address_pool()
        if args.victim is not None:
            self.victim = Sim(-1, args.victim)

    def _address_pool(self) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        net = ca_networks(self.ca_cert)[0]
        skip = int(self.args.skip_addresses)
        for i, addr in enumerate(net.hosts()):
            if i >= skip:
                yield ipaddress.ip_address(str(addr))

    def _issue(self, index: int) -> Sim:
        """A fresh key and certificate, written as one PEM (key first) for ssl."""
        key = generate_key("ecdsa-p256")
        now = dt.datetime.now(dt.UTC)
        cert = issue_certificate(
            ca_cert=self.ca_cert,
            ca_key=self.ca_key,
            name=f"lg{index}",
            public_key=key.public_key(),
            role=Role.PEER,
            addresses=[next(self._addresses)],
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=1),
        )
        pem = self.workdir / f"lg{index}.pem"
        pem.write_bytes(private_key_pem(key) + certificate_pem(cert))
        pem.chmod(0o600)
        return Sim(index, pem)

    def established(self) -> int:
        return sum(1 for s in self._all() if s.established_at and s.closed_at is None)

    def _all(self) -> list[Sim]:
        return ([self.victim] if self.victim else []) + self.sims

    async def _run_one(self, sim: Sim) -> None:
        ctx = client_context(ca=self.ca_path, cert=sim.pem, key=sim.pem)
        try:
            conn = await connect(self.args.server, self.args.port, ctx,
                                 server_hostname=self.args.server_name,
                                 timeout=CONNECT_TIMEOUT)  # fmt: skip
        except Exception as err:  # every failure (TCP, TLS, alert, timeout) is counted
            self.failures[type(err).__name__] += 1
            sim.closed_at = time.time()
            sim.close_reason = f"connect: {err}"
            return
        up: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_event(event: Event) -> None:
            if isinstance(event, ConfigReceived) and sim.established_at is None:
                sim.established_at = time.time()
                if not up.done():
                    up.set_result(None)

        def on_lost(code: int, message: str, exc: BaseException | None) -> None:
            sim.closed_at = time.time()
            sim.close_reason = f"{code}: {message}"
            if not up.done():
                up.set_exception(ConnectionError(message))

        loop_now = asyncio.get_running_loop().time()  # the driver's (monotonic) timebase
        session = Session(SessionConfig(role="client", config_timeout=CONNECT_TIMEOUT), loop_now)
        sim.driver = SessionDriver(conn, session, on_event=on_event, on_lost=on_lost)
        sim.driver.start()
        try:
            await asyncio.wait_for(up, CONNECT_TIMEOUT)
        except (TimeoutError, ConnectionError) as err:
            self.failures[f"setup: {type(err).__name__}: {err}"[:80]] += 1

    async def ramp(self, total: int, concurrency: int) -> dict[str, Any]:
        """Connect clients until ``total`` are up (or every attempt was made)."""
        total = min(total, MAX_CLIENTS)
        pending: list[Sim] = []
        if self.victim is not None and self.victim.driver is None:
            pending.append(self.victim)
        need = total - self.established() - len(pending)
        t_issue = time.monotonic()
        for _ in range(max(0, need)):
            sim = self._issue(len(self.sims))
            self.sims.append(sim)
            pending.append(sim)
        issue_s = time.monotonic() - t_issue
        failures_before = sum(self.failures.values())
        sem = asyncio.Semaphore(concurrency)

        async def one(sim: Sim) -> None:
            async with sem:
                await self._run_one(sim)

        start = time.monotonic()
        try:
            async with asyncio.timeout(RAMP_TIMEOUT):
                await asyncio.gather(*(one(s) for s in pending))
        except TimeoutError:
            self.failures["ramp timeout"] += 1
        elapsed = time.monotonic() - start
        done = sum(1 for s in pending if s.established_at is not None)
        return {
            "ok": True,
            "established": self.established(),
            "new": done,
            "failed": sum(self.failures.values()) - failures_before,
            "failures": dict(self.failures.most_common(5)),
            "elapsed": elapsed,
            "rate": done / elapsed if elapsed > 0 else None,
            "issue_s": issue_s,
        }

    def status(self) -> dict[str, Any]:
        v = self.victim
        return {
            "ok": True,
            "established": self.established(),
            "closed": sum(1 for s in self._all() if s.closed_at is not None),
            "victim_established": bool(v and v.established_at),
            "victim_closed_at": v.closed_at if v else None,
            "victim_close_reason": v.close_reason if v else "",
        }

    def close_all(self) -> None:
        for sim in self._all():
            if sim.driver is not None:
                sim.driver.conn.abort()


async def serve(args: argparse.Namespace) -> None:
    gen = LoadGen(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ok": True, "ready": True})
    try:
        while True:
            line = await reader.readline()
            if not line:
                return  # orchestrator went away
            try:
                cmd = json.loads(line)
                name = cmd["cmd"]
            except (json.JSONDecodeError, KeyError, TypeError):
                reply({"ok": False, "error": f"bad command line: {line[:80]!r}"})
                continue
            if name == "ramp":
                reply(await gen.ramp(int(cmd["total"]), int(cmd.get("concurrency", 16))))
            elif name == "status":
                reply(gen.status())
            elif name == "quit":
                reply({"ok": True})
                return
            else:
                reply({"ok": False, "error": f"unknown command {name!r}"})
    finally:
        gen.close_all()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen", description="vpnd scale-bench clients")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-name", required=True)
    p.add_argument("--ca", type=Path, required=True, help="CA certificate (trust anchor)")
    p.add_argument("--ca-key", type=Path, required=True, help="CA key, to issue client certs")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--victim", type=Path, help="key+cert PEM of the client to be revoked")
    p.add_argument("--skip-addresses", type=int, default=16, help="first hosts left unused")
    args = p.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
