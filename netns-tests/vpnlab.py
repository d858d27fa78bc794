"""A whole vpnd deployment in network namespaces: used by the netns tests and `make demo`.

Topology (every address lives inside namespaces we create):

    alice ─┐                       ┌─ lan host 192.168.50.10
    bob   ─┼─ wan bridge 172.31.0/24 ─ gw ─┘ (192.168.50.1 on gw)
    mallory┘   (gw .1, alice .2, bob .3, mallory .4)

The PKI is made with the real `vpnctl`, the daemons are the real `vpnd` processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from nslib import PYTHON, Netns, NetnsFactory, holds_within, veth, wait_until

VPNCTL = str(Path(PYTHON).parent / "vpnctl")
VPND = str(Path(PYTHON).parent / "vpnd")
OVERLAY = "10.8.0.0/24"
LAN = "192.168.50.0/24"
LAN_HOST = "192.168.50.10"
GW_WAN = "172.31.0.1"
GW_OVERLAY = "10.8.0.1"
PORT = 4443
SERVER_NAME = "gw.vpn.test"
ALLOW_ALL = {"rules": [{"from": "any", "to": "any", "proto": "any"}]}

TCP_SINK = """
import socket, zlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(1); s.settimeout(30); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30); n = 0; crc = 0
while n < {size}:
    chunk = c.recv(65536)
    if not chunk: break
    n += len(chunk); crc = zlib.crc32(chunk, crc)
c.sendall(f"{{n}} {{crc}}".encode()); c.close()
"""
TCP_SOURCE = """
import socket, zlib
payload = bytes(i % 251 for i in range({size}))
s = socket.create_connection(("{ip}", {port}), timeout=5)
s.settimeout(30); s.sendall(payload); s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode(), zlib.crc32(payload))
"""

# The reverse direction: the listener sends, the connector receives and reports.
TCP_SERVE = """
import socket
payload = bytes(i % 251 for i in range({size}))
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(1); s.settimeout(30); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30); c.sendall(payload); c.close()
"""
TCP_FETCH = """
import socket, zlib
s = socket.create_connection(("{ip}", {port}), timeout=5)
s.settimeout(30); n = 0; crc = 0
while True:
    chunk = s.recv(65536)
    if not chunk: break
    n += len(chunk); crc = zlib.crc32(chunk, crc)
print(n, crc, zlib.crc32(bytes(i % 251 for i in range({size}))))
"""


@dataclass
class Host:
    name: str
    ns: Netns
    wan_ip: str
    config: Path | None = None
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    overlay_ip: str | None = None
    starts: int = 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


@dataclass
class Lab:
    factory: NetnsFactory
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vpnlab-")))
    hosts: dict[str, Host] = field(default_factory=dict)
    lan: Netns | None = None
    wan: Netns | None = None
    _tcp_runs: int = 0

    # ---- topology ------------------------------------------------------------------

    def build(self, clients: tuple[str, ...] = ("alice", "bob", "mallory")) -> None:
        self.wan = self.factory()
        self.wan.run(["ip", "link", "add", "br0", "type", "bridge"])
        self.wan.run(["ip", "link", "set", "br0", "up"])
        for i, name in enumerate(("gw", *clients), start=1):
            ns = self.factory()
            ip = f"172.31.0.{i}"
            self._bridge_port(ns, ip)
            self.hosts[name] = Host(name, ns, ip)
        gw = self.hosts["gw"].ns
        self.lan = self.factory()
        veth(gw, self.lan, "192.168.50.1/24", f"{LAN_HOST}/24")
        # The LAN host routes the overlay back through the gateway (no NAT needed).
        self.lan.run(["ip", "route", "add", OVERLAY, "via", "192.168.50.1"])

    def _bridge_port(self, ns: Netns, ip: str) -> None:
        assert self.wan is not None
        tag = ns.name[-6:]
        outer, inner = f"br{tag}", f"wn{tag}"
        self.wan.run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner,
                      "netns", ns.name])  # fmt: skip
        self.wan.run(["ip", "link", "set", outer, "master", "br0"])
        self.wan.run(["ip", "link", "set", outer, "up"])
        ns.run(["ip", "link", "set", inner, "name", "eth0"])
        # No IPv6 DAD on the underlay: its address would flip from "tentative" between
        # the before/after snapshots that prove the clean-up.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"])
        ns.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        ns.run(["ip", "link", "set", "eth0", "up"])

    # ---- PKI -----------------------------------------------------------------------

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def vpnctl(self, *args: str, pki: Path | None = None, check: bool = True) -> str:
        res = subprocess.run(
            [VPNCTL, "--pki", str(pki or self.pki), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"vpnctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout + res.stderr

    def make_pki(self) -> None:
        self.vpnctl("ca", "init", "--name", "corp-vpn", "--network", OVERLAY)
        self.issue("gw", "--gateway", "--dns", SERVER_NAME, "--ip", GW_OVERLAY)

    def issue(self, name: str, *args: str, pki: Path | None = None) -> Path:
        out = self.workdir / "certs" / name
        out.mkdir(parents=True, exist_ok=True)
        self.vpnctl("issue", name, *args, "--out", str(out), pki=pki)
        return out

    def other_ca(self) -> Path:
        """A second, unrelated CA (same overlay network): what an attacker could make."""
        other = self.workdir / "other-pki"
        self.vpnctl("ca", "init", "--name", "evil-ca", "--network", OVERLAY, pki=other)
        return other

    # ---- daemons -------------------------------------------------------------------

    def start_gateway(self, **extra: object) -> Host:
        host = self.hosts["gw"]
        certs = self.workdir / "certs" / "gw"
        cfg: dict[str, object] = {
            "mode": "gateway",
            "listen": f"{GW_WAN}:{PORT}",
            "pki": {
                "ca": str(self.pki / "ca.pem"),
                "cert": str(certs / "gw.pem"),
                "key": str(certs / "gw.key"),
                "crl": str(self.pki / "crl.pem"),
            },
            "tun": {"name": "vpn0", "mtu": 1400},
            "push_routes": [LAN],
            "keepalive": {"interval": 2, "timeout": 6},
            "control_socket": str(self.workdir / "gw.sock"),
            # What survives a restart (CRL numbers) stays in the test's own directory.
            "state_dir": str(self.workdir / "gw-state"),
            "log": {"level": "info"},
            # Defence in depth is off by default in the product, on in the tests.
            "nftables": {"anti_spoofing": True},
            "policy": ALLOW_ALL,
            **extra,
        }
        host.overlay_ip = GW_OVERLAY
        return self._start(host, cfg)

    def issuing_pki(self, *, inventory_poll: str = "0.5s") -> dict[str, object]:
        """The gateway's ``pki:`` with the online issuer (``vpnctl ca issuer``, made by the
        caller) and the inventory: what renewal and enrollment need."""
        certs = self.workdir / "certs" / "gw"
        return {
            "ca": str(self.pki / "ca.pem"),
            "cert": str(certs / "gw.pem"),
            "key": str(certs / "gw.key"),
            "crl": str(self.pki / "crl.pem"),
            "issuer": {
                "cert": str(self.pki / "issuer.pem"),
                "key": str(self.pki / "issuer.key"),
                "crl": str(self.workdir / "issuer-crl.pem"),
            },
            "inventory": str(self.pki / "inventory.sqlite"),
            "inventory_poll": inventory_poll,
        }

    def start_client(self, name: str, certs: Path | None = None, **extra: object) -> Host:
        host = self.hosts[name]
        certs = certs or self.workdir / "certs" / name
        cfg: dict[str, object] = {
            "mode": "client",
            "server": f"{GW_WAN}:{PORT}",
            "server_name": SERVER_NAME,
            "pki": {
                "ca": str(certs / "ca.pem"),
                "cert": str(certs / f"{name}.pem"),
                "key": str(certs / f"{name}.key"),
            },
            "tun": {"name": "tun0", "mtu": 1400},
            "keepalive": {"interval": 2, "timeout": 6},
            "reconnect": {"initial_delay": 0.5, "max_delay": 5},
            "control_socket": str(self.workdir / f"{name}.sock"),
            "log": {"level": "info"},
            **extra,
        }
        return self._start(host, cfg)

    def _start(self, host: Host, cfg: dict[str, object]) -> Host:
        host.config = self.workdir / f"{host.name}.yaml"
        host.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        # A fresh log per start, so waits never match a previous run's lines.
        host.starts += 1
        host.log = self.workdir / f"{host.name}.{host.starts}.log"
        host.proc = host.ns.popen([VPND, "--config", str(host.config)], host.log)
        return host

    def stop(self, name: str, timeout: float = 10) -> int | None:
        host = self.hosts[name]
        if host.proc is None:
            return None
        host.proc.terminate()
        try:
            return host.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait(5)
            raise AssertionError(f"vpnd on {name} ignored SIGTERM for {timeout}s") from None
        finally:
            host.proc = None

    # ---- observations --------------------------------------------------------------

    def wait_log(self, name: str, pattern: str, timeout: float = 15) -> bool:
        """Wait (bounded) for a line matching ``pattern`` in the daemon's log."""
        rx = re.compile(pattern)
        host = self.hosts[name]

        def seen_or_exited() -> bool:
            return bool(rx.search(host.log_text())) or (
                host.proc is not None and host.proc.poll() is not None
            )

        # A daemon that exited writes no more lines: stop waiting, then look once more.
        holds_within(seen_or_exited, timeout)
        return bool(rx.search(host.log_text()))

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> bool:
        """Poll a condition (bounded); readiness, never a speed assertion."""
        return holds_within(predicate, timeout)

    def wait_up(self, name: str, timeout: float = 15) -> None:
        """Assert (bounded wait) that ``name``'s client reported its tunnel up."""
        assert self.wait_log(name, r"tunnel up: tun0", timeout), self.hosts[name].log_text()

    def has_link(self, name: str, ifname: str) -> bool:
        res = self.hosts[name].ns.run(["ip", "link", "show", ifname], check=False)
        return res.returncode == 0

    def wait_link(self, name: str, ifname: str, present: bool = True, timeout: float = 15) -> bool:
        return holds_within(lambda: self.has_link(name, ifname) == present, timeout)

    def ping(self, name: str, dst: str, count: int = 3, timeout: float = 2) -> bool:
        ns = self.lan if name == "lan" else self.hosts[name].ns
        assert ns is not None
        res = ns.run(
            ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout), dst],
            check=False,
            timeout=count * (timeout + 1) + 5,
        )
        return res.returncode == 0

    def ns_of(self, name: str) -> Netns:
        ns = self.lan if name == "lan" else self.hosts[name].ns
        assert ns is not None
        return ns

    def tcp_transfer(
        self, src: str, dst: str, dst_ip: str, size: int = 200_000, *, download: bool = False
    ) -> bool:
        """``src`` connects to ``dst_ip`` (a listener in ``dst``) and sends ``size`` bytes,
        or with ``download`` receives them; byte count and CRC are compared, so a
        truncated or corrupted stream fails."""
        port = 8080 + self._tcp_runs
        self._tcp_runs += 1
        server, client = (TCP_SERVE, TCP_FETCH) if download else (TCP_SINK, TCP_SOURCE)
        sink = server.format(port=port, size=size)
        log = self.workdir / f"tcp-{port}.log"
        srv = self.ns_of(dst).popen([PYTHON, "-c", sink], log)
        try:
            wait_until(lambda: "ready" in log.read_text(), 10, f"the TCP listener on {dst}")
            res = self.ns_of(src).run(
                [PYTHON, "-c", client.format(ip=dst_ip, port=port, size=size)],
                check=False,
                timeout=60,
            )
            words = res.stdout.split()
            return (
                res.returncode == 0
                and len(words) == 3
                and words[0] == str(size)
                and (words[1] == words[2])
            )
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait(5)

    def tcp_connect(self, src: str, dst: str, dst_ip: str, port: int, timeout: float = 2) -> bool:
        """Can ``src`` open a TCP connection to a listener on ``dst_ip:port`` in ``dst``?"""
        listener = (
            "import socket, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('0.0.0.0', {port})); s.listen(8); print('ready', flush=True)\n"
            # Accept (and drop) until killed, or 30 s without a connection.
            "s.settimeout(30)\n"
            "while True: s.accept()[0].close()\n"
        )
        log = self.workdir / f"listen-{port}-{self._tcp_runs}.log"
        self._tcp_runs += 1
        srv = self.ns_of(dst).popen([PYTHON, "-c", listener], log)
        try:
            if not self.wait_for(lambda: "ready" in log.read_text(), timeout=10):
                raise AssertionError(f"listener on {dst}:{port} did not start")
            probe = (
                "import socket, sys\n"
                "try:\n"
                f"    socket.create_connection(('{dst_ip}', {port}), timeout={timeout}).close()\n"
                "    print('connected')\n"
                "except OSError as e:\n"
                "    print('failed', e)\n"
            )
            res = self.ns_of(src).run([PYTHON, "-c", probe], check=False, timeout=timeout + 10)
            return res.stdout.startswith("connected")
        finally:
            srv.kill()
            srv.wait(5)

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for name, host in self.hosts.items():
            if host.proc is not None and host.proc.poll() is None:
                try:
                    self.stop(name)
                except AssertionError as err:
                    problems.append(str(err))
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems
