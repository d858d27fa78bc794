"""The tunnels under test, each set up between the two namespaces of a ``Pair``.

Every target has the same overlay: server 10.8.0.1, client 10.8.0.2 (10.8.0.0/24), so
iperf3 and ping run unchanged against ``server_ip``. ``prepare()`` starts the server
side and waits (bounded) until it is ready; ``start_client()`` starts the client side
and returns at once (the caller times the first ping through the tunnel).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import yaml

from bench.common import (
    CLIENT_UNDERLAY,
    SERVER_UNDERLAY,
    BenchError,
    Pair,
    log_tail,
    poll,
    run_tool,
)
from bench.trees import Tree, current_tree

OVERLAY_NET = "10.8.0.0/24"
SERVER_OVERLAY = "10.8.0.1"
READY_TIMEOUT = 30.0
WG_RUN_DIR = Path("/var/run/wireguard")


class Target:
    """Base: the bare veth (no tunnel at all)."""

    key = "veth"
    label = "bare veth"
    tunnel = False

    def __init__(self) -> None:
        self.pair: Pair | None = None
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    @property
    def server_ip(self) -> str:
        return SERVER_OVERLAY if self.tunnel else SERVER_UNDERLAY

    def prepare(self, pair: Pair) -> None:
        self.pair = pair

    def start_client(self) -> None:
        """Start the client side; returns without waiting for the tunnel."""

    def check_alive(self) -> None:
        """Raise ``BenchError`` (with the log tail) if a process of ours has exited."""
        for what, proc, log in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"{what} exited with {proc.returncode}: {log_tail(log)}")

    def teardown(self) -> None:
        """Clean up what deleting the namespaces does not (processes go with them)."""

    def _pair(self) -> Pair:
        if self.pair is None:
            raise BenchError(f"{self.label}: prepare() was not called")
        return self.pair

    def _spawn(
        self, side: str, cmd: list[str], what: str, env: dict[str, str] | None = None
    ) -> Path:
        pair = self._pair()
        ns = pair.server if side == "server" else pair.client
        log = pair.workdir / f"{self.key}-{side}.log"
        proc = ns.popen(cmd, log, env=env)
        self.procs.append((what, proc, log))
        return log

    def _wait_log(self, log: Path, needle: str, what: str) -> None:
        def ready() -> bool:
            self.check_alive()
            try:
                return needle in log.read_text(errors="replace")
            except FileNotFoundError:
                return False

        poll(ready, timeout=READY_TIMEOUT, interval=0.05, what=what)


class Vpnd(Target):
    """vpnd gateway and client, PKI by vpnctl, all three from ``tree`` (default: this one)."""

    tunnel = True

    def __init__(self, tree: Tree | None = None) -> None:
        super().__init__()
        self.tree = tree or current_tree()
        self.key = self.tree.key
        self.label = self.tree.label

    def prepare(self, pair: Pair) -> None:
        super().prepare(pair)
        pki = pair.workdir / "vpnd-pki"
        certs = pair.workdir / "vpnd-certs"
        for sub in ("gw", "client"):
            (certs / sub).mkdir(parents=True, exist_ok=True)
        self._vpnctl(
            "--pki", str(pki), "ca", "init", "--name", "bench-ca", "--network", OVERLAY_NET
        )
        self._vpnctl("--pki", str(pki), "issue", "gw", "--gateway", "--dns", "gw.bench.test",
                     "--ip", SERVER_OVERLAY, "--out", str(certs / "gw"))  # fmt: skip
        self._vpnctl("--pki", str(pki), "issue", "client", "--ip", "10.8.0.2",
                     "--out", str(certs / "client"))  # fmt: skip
        gw = {
            "mode": "gateway",
            "listen": f"{SERVER_UNDERLAY}:4443",
            "pki": {
                "ca": str(pki / "ca.pem"),
                "cert": str(certs / "gw" / "gw.pem"),
                "key": str(certs / "gw" / "gw.key"),
                "crl": str(pki / "crl.pem"),
            },
            "tun": {"name": "vpn0", "mtu": 1400},
            "forwarding": False,
            # Everything allowed: the bench measures the data path, not the policy.
            "policy": {"rules": [{"from": "any", "to": "any", "proto": "any"}]},
            "control_socket": str(pair.workdir / "vpnd-gw.sock"),
            "state_dir": str(pair.workdir / "vpnd-gw-state"),
            "log": {"level": "info"},
        }
        self.client_cfg = {
            "mode": "client",
            "server": f"{SERVER_UNDERLAY}:4443",
            "server_name": "gw.bench.test",
            "pki": {
                "ca": str(certs / "client" / "ca.pem"),
                "cert": str(certs / "client" / "client.pem"),
                "key": str(certs / "client" / "client.key"),
            },
            "tun": {"name": "tun0", "mtu": 1400},
            "control_socket": str(pair.workdir / "vpnd-client.sock"),
            "log": {"level": "info"},
        }
        cfg = pair.workdir / "vpnd-gw.yaml"
        cfg.write_text(yaml.safe_dump(gw, sort_keys=False))
        log = self._spawn("server", self.tree.command("vpnd", "--config", str(cfg)),
                          "vpnd gateway", env=self.tree.env())  # fmt: skip
        self._wait_log(log, "listening on", "the vpnd gateway to listen")

    def start_client(self) -> None:
        cfg = self._pair().workdir / "vpnd-client.yaml"
        cfg.write_text(yaml.safe_dump(self.client_cfg, sort_keys=False))
        self._spawn("client", self.tree.command("vpnd", "--config", str(cfg)), "vpnd client",
                    env=self.tree.env())  # fmt: skip

    def _vpnctl(self, *args: str) -> None:
        res = subprocess.run(self.tree.command("vpnctl", *args), env=self.tree.env(),
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        if res.returncode != 0:
            raise BenchError(f"vpnctl {' '.join(args[2:4])} failed: {res.stderr.strip()}")


def _openssl(workdir: Path, *args: str) -> None:
    res = subprocess.run(["openssl", *args], cwd=workdir, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    if res.returncode != 0:
        last = res.stderr.strip().splitlines()[-1:] or ["?"]
        raise BenchError(f"openssl {args[0]} failed: {last[0]}")


def make_openvpn_pki(workdir: Path) -> None:
    """A P-256 CA plus server (serverAuth) and client (clientAuth) certificates."""
    workdir.mkdir(parents=True, exist_ok=True)
    _openssl(workdir, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    _openssl(workdir, "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2",
             "-subj", "/CN=bench-ca", "-out", "ca.crt")  # fmt: skip
    for name, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = workdir / f"{name}.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            f"extendedKeyUsage={eku}\n"
        )
        _openssl(workdir, "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                 "-out", f"{name}.key")  # fmt: skip
        _openssl(workdir, "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
                 "-out", f"{name}.csr")  # fmt: skip
        _openssl(workdir, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
                 "ca.key", "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext),
                 "-out", f"{name}.crt")  # fmt: skip
        os.chmod(workdir / f"{name}.key", 0o600)


class OpenVpn(Target):
    """OpenVPN 2.6 in TLS/certificate mode, AES-256-GCM, userspace data path (no DCO:
    this kernel has no ovpn-dco module, and userspace is what the reference numbers are)."""

    tunnel = True

    def __init__(self, proto: str) -> None:
        super().__init__()
        self.proto = proto
        self.key = f"openvpn-{proto}"
        self.label = f"OpenVPN {proto.upper()}"

    def _common(self, pki: Path) -> str:
        return f"dev tun\nca {pki / 'ca.crt'}\ndata-ciphers AES-256-GCM\ndisable-dco\nverb 3\n"

    def prepare(self, pair: Pair) -> None:
        super().prepare(pair)
        self.pki = pair.workdir / f"{self.key}-pki"
        make_openvpn_pki(self.pki)
        proto = "udp4" if self.proto == "udp" else "tcp4-server"
        conf = pair.workdir / f"{self.key}-server.conf"
        conf.write_text(
            self._common(self.pki)
            + f"proto {proto}\nlocal {SERVER_UNDERLAY}\nport 1194\n"
            + f"cert {self.pki / 'server.crt'}\nkey {self.pki / 'server.key'}\n"
            + "dh none\ntopology subnet\nserver 10.8.0.0 255.255.255.0\n"
            + "keepalive 10 60\n"
        )
        log = self._spawn("server", ["openvpn", "--config", str(conf)], "openvpn server")
        self._wait_log(log, "Initialization Sequence Completed", "the OpenVPN server")

    def start_client(self) -> None:
        proto = "udp4" if self.proto == "udp" else "tcp4-client"
        conf = self._pair().workdir / f"{self.key}-client.conf"
        conf.write_text(
            self._common(self.pki)
            + f"client\nproto {proto}\nremote {SERVER_UNDERLAY} 1194\nnobind\n"
            + f"cert {self.pki / 'client.crt'}\nkey {self.pki / 'client.key'}\n"
            + "remote-cert-tls server\n"
        )
        self._spawn("client", ["openvpn", "--config", str(conf)], "openvpn client")


class WireGuardGo(Target):
    """Debian's userspace wireguard-go, configured with ``wg`` (no kernel WireGuard here)."""

    key = "wireguard-go"
    label = "wireguard-go"
    tunnel = True
    PORT = 51820

    def __init__(self) -> None:
        super().__init__()
        # The UAPI socket lives in /var/run/wireguard, shared by all namespaces:
        # names must be unique on the machine.
        tag = secrets.token_hex(3)
        self.ifnames = {"server": f"wgs{tag}", "client": f"wgc{tag}"}
        self.keys: dict[str, tuple[Path, str]] = {}

    def _keypair(self, side: str) -> tuple[Path, str]:
        priv = self._pair().workdir / f"wg-{side}.key"
        key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()  # fmt: skip
        priv.write_text(key + "\n")
        os.chmod(priv, 0o600)
        pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()  # fmt: skip
        return priv, pub

    def prepare(self, pair: Pair) -> None:
        super().prepare(pair)
        try:
            self.keys = {side: self._keypair(side) for side in ("server", "client")}
        except (subprocess.SubprocessError, OSError) as err:
            raise BenchError(f"wg genkey/pubkey failed: {err}") from None
        self._bring_up("server", f"{SERVER_OVERLAY}/24", listen=True)

    def start_client(self) -> None:
        self._bring_up("client", "10.8.0.2/24", listen=False)

    def _bring_up(self, side: str, address: str, *, listen: bool) -> None:
        pair = self._pair()
        ns = pair.server if side == "server" else pair.client
        name = self.ifnames[side]
        other = "client" if side == "server" else "server"
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        self._spawn(side, ["wireguard-go", "-f", name], f"wireguard-go ({side})", env=env)
        sock = WG_RUN_DIR / f"{name}.sock"

        def ready() -> bool:
            self.check_alive()
            return sock.exists()

        poll(ready, timeout=READY_TIMEOUT, interval=0.01, what=f"wireguard-go {name}")
        cmd = ["wg", "set", name, "private-key", str(self.keys[side][0])]
        if listen:
            cmd += ["listen-port", str(self.PORT)]
        cmd += ["peer", self.keys[other][1]]
        if listen:
            cmd += ["allowed-ips", "10.8.0.2/32"]
        else:
            cmd += ["allowed-ips", OVERLAY_NET, "endpoint", f"{SERVER_UNDERLAY}:{self.PORT}"]
        run_tool(ns, cmd, timeout=10, what=f"wg set {name}")
        run_tool(ns, ["ip", "addr", "add", address, "dev", name], timeout=10, what="ip addr")
        run_tool(ns, ["ip", "link", "set", name, "up"], timeout=10, what="ip link up")

    def teardown(self) -> None:
        for name in self.ifnames.values():
            for leftover in (WG_RUN_DIR / f"{name}.sock", WG_RUN_DIR / f"{name}.name"):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    pass


def all_targets(*, current: Tree | None = None, baseline: Tree | None = None) -> list[Target]:
    """Every target; a baseline vpnd comes right after the current one."""
    vpnds: list[Target] = [Vpnd(current)]
    if baseline is not None:
        vpnds.append(Vpnd(baseline))
    return [Target(), *vpnds, OpenVpn("udp"), OpenVpn("tcp"), WireGuardGo()]


__all__ = ["CLIENT_UNDERLAY", "OpenVpn", "Target", "Vpnd", "WireGuardGo", "all_targets"]
