"""``make bench-scale``: one real vpnd gateway against N simulated clients (bench/loadgen.py).

Measures handshakes per second, gateway RSS delta per connected idle peer at N1 and
N2 (default 1,000 and 5,000), gateway CPU while the peers sit idle, and the time from
``vpnctl revoke`` rewriting the CRL to the revoked peer's session being closed, with
N1 peers connected. Usage::

    .venv/bin/python -m bench.scale [--n1 1000] [--n2 5000] [--concurrency 16] [--idle 10]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    PYTHON,
    ROOT,
    SERVER_UNDERLAY,
    VPNCTL,
    VPND,
    BenchError,
    Netns,
    NetnsFactory,
    cleanup,
    log_tail,
    make_pair,
    poll,
    require_root,
    signals_to_exit,
)
from bench.report import RESULTS, write_results
from vpnd.pki.identity import Role
from vpnd.pki.pkidir import PkiDir

OVERLAY = ipaddress.ip_network("10.8.0.0/16")
GATEWAY_IP = ipaddress.ip_address("10.8.0.1")
SERVER_NAME = "gw.bench.test"
PORT = 4443
REVOKE_WAIT = 5.0
NOFILE = 65536


class Gateway:
    """The vpnd gateway process and what /proc says about it."""

    def __init__(self, ns: Netns, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.ns, self.proc, self.log = ns, proc, log

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"vpnd gateway exited with {self.proc.returncode}: {log_tail(self.log)}"
            )

    def rss_kb(self) -> int:
        self.check()
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS in the gateway's /proc status")

    def cpu_ticks(self) -> int:
        self.check()
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)

    def cpu_percent(self, seconds: float) -> float:
        """Share of one core used over ``seconds`` (wall clock)."""
        hz = os.sysconf("SC_CLK_TCK")
        t0, c0 = time.monotonic(), self.cpu_ticks()
        time.sleep(seconds)
        t1, c1 = time.monotonic(), self.cpu_ticks()
        return 100.0 * (c1 - c0) / hz / (t1 - t0)


class LoadGenProc:
    """bench/loadgen.py in the client namespace, driven by JSON lines over its stdin/stdout."""

    def __init__(self, ns: Netns, args: list[str], log: Path) -> None:
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*ns.exec_prefix(), PYTHON, "-m", "bench.loadgen", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            start_new_session=True,
            cwd=ROOT,
        )
        ns.processes.append(self.proc)  # the harness stops it with the namespace
        self.log = log

    def _read(self, timeout: float) -> dict[str, Any]:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        if not ready:
            raise BenchError(f"load generator silent for {timeout:g}s: {log_tail(self.log)}")
        line = out.readline()
        if not line:
            raise BenchError(f"load generator exited: {log_tail(self.log)}")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise BenchError(f"load generator printed {line[:80]!r}") from None
        if not isinstance(obj, dict) or not obj.get("ok"):
            raise BenchError(f"load generator: {obj}")
        return obj

    def wait_ready(self) -> None:
        self._read(60)

    def call(self, timeout: float, **cmd: Any) -> dict[str, Any]:
        inp = self.proc.stdin
        assert inp is not None
        try:
            inp.write((json.dumps(cmd) + "\n").encode())
            inp.flush()
        except BrokenPipeError:
            raise BenchError(f"load generator gone: {log_tail(self.log)}") from None
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(30, cmd="quit")
                self.proc.wait(15)
            except (BenchError, OSError, subprocess.TimeoutExpired):
                pass
        self._log_file.close()


def _pem_pair(cert_dir: Path, name: str) -> Path:
    combined = cert_dir / f"{name}-combined.pem"
    combined.write_bytes(
        (cert_dir / f"{name}.key").read_bytes() + (cert_dir / f"{name}.pem").read_bytes()
    )
    combined.chmod(0o600)
    return combined


def start_gateway(ns: Netns, workdir: Path, pki: PkiDir) -> Gateway:
    certs = workdir / "gw"
    certs.mkdir()
    pki.issue(
        "gw", out_dir=certs, role=Role.GATEWAY, addresses=[GATEWAY_IP], dns_names=[SERVER_NAME]
    )
    cfg = {
        "mode": "gateway",
        "listen": f"{SERVER_UNDERLAY}:{PORT}",
        "pki": {
            "ca": str(pki.ca_cert_path),
            "cert": str(certs / "gw.pem"),
            "key": str(certs / "gw.key"),
            "crl": str(pki.crl_path),
        },
        "tun": {"name": "vpn0", "mtu": 1400},
        "forwarding": False,
        "policy": {"rules": [{"from": "any", "to": "any", "proto": "any"}]},
        "control_socket": str(workdir / "gw.sock"),
        "state_dir": str(workdir / "gw-state"),
        "log": {"level": "warning"},  # 5,000 "authenticated" lines would skew CPU and RSS
        "limits": {
            "max_sessions": 10000,
            "max_pending_handshakes": 256,
            # Every simulated client comes from one address.
            "max_pending_per_source": 128,
        },
    }
    path = workdir / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = workdir / "gw.log"
    proc = ns.popen([VPND, "--config", str(path)], log)
    gw = Gateway(ns, proc, log)

    def listening() -> bool:
        gw.check()
        res = ns.run(["ss", "-Hltn", f"sport = :{PORT}"], check=False)
        return bool(res.stdout.strip())

    poll(listening, timeout=30, interval=0.05, what="the vpnd gateway to listen")
    return gw


def _say(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def measure_revocation(gen: LoadGenProc, pki: PkiDir) -> dict[str, Any]:
    """Revoke the victim with the real vpnctl; time CRL-on-disk -> session closed."""
    st = gen.call(30, cmd="status")
    if not st["victim_established"] or st["victim_closed_at"] is not None:
        return {"latency_s": None, "note": "victim client was not connected"}
    res = subprocess.run([VPNCTL, "--pki", str(pki.path), "revoke", "victim"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    if res.returncode != 0:
        raise BenchError(f"vpnctl revoke failed: {res.stderr.strip()}")
    crl_written = pki.crl_path.stat().st_mtime
    deadline = time.monotonic() + REVOKE_WAIT
    for _ in range(int(REVOKE_WAIT / 0.02) + 1):
        st = gen.call(30, cmd="status")
        if st["victim_closed_at"] is not None:
            return {
                "latency_s": max(0.0, float(st["victim_closed_at"]) - crl_written),
                "note": st["victim_close_reason"],
            }
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return {"latency_s": None, "note": f"session still open {REVOKE_WAIT:g}s after the CRL changed"}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    factory = NetnsFactory()
    out: dict[str, Any] = {"n1": args.n1, "n2": args.n2, "concurrency": args.concurrency}
    try:
        pair = make_pair(factory, workdir / "ns")
        pki = PkiDir(workdir / "pki")
        pki.init_ca(name="bench-scale", networks=[OVERLAY])
        victim_dir = workdir / "victim"
        victim_dir.mkdir()
        pki.issue("victim", out_dir=victim_dir)
        victim_pem = _pem_pair(victim_dir, "victim")
        _say("starting the gateway")
        gw = start_gateway(pair.server, workdir, pki)
        time.sleep(2)  # let start-up allocations settle before the baseline
        out["rss_base_kb"] = base = gw.rss_kb()
        out["cpu_idle_0_pct"] = gw.cpu_percent(min(args.idle, 5))
        lg_dir = workdir / "loadgen"
        lg_dir.mkdir()
        gen = LoadGenProc(
            pair.client,
            [
                "--server",
                SERVER_UNDERLAY,
                "--port",
                str(PORT),
                "--server-name",
                SERVER_NAME,
                "--ca",
                str(pki.ca_cert_path),
                "--ca-key",
                str(pki.ca_key_path),
                "--workdir",
                str(lg_dir),
                "--victim",
                str(victim_pem),
            ],
            workdir / "loadgen.log",
        )
        try:
            gen.wait_ready()
            for n, tag in ((args.n1, "n1"), (args.n2, "n2")):
                _say(f"connecting clients up to {n} ({args.concurrency} in flight)")
                ramp = gen.call(900, cmd="ramp", total=n, concurrency=args.concurrency)
                out[f"ramp_{tag}"] = ramp
                rate = ramp["rate"] or 0
                _say(f"  {ramp['established']} connected; {ramp['new']} new at {rate:.0f}/s; "
                     f"{ramp['failed']} failed {ramp['failures']}")  # fmt: skip
                time.sleep(3)  # settle: pending handshakes freed, first keepalives done
                rss = gw.rss_kb()
                peers = int(ramp["established"])
                out[f"rss_{tag}_kb"] = rss
                out[f"peers_{tag}"] = peers
                out[f"rss_per_peer_{tag}_kb"] = (rss - base) / peers if peers else None
                _say(f"  gateway RSS {rss / 1024:.1f} MB; measuring idle CPU for {args.idle:g} s")
                out[f"cpu_idle_{tag}_pct"] = gw.cpu_percent(args.idle)
                if tag == "n1":
                    _say("  revoking the victim client")
                    out["revocation"] = measure_revocation(gen, pki)
        finally:
            gen.close()
        gw.check()
    finally:
        for problem in cleanup(factory):
            _say(f"cleanup problem: {problem}")
    return out


def _fmt(value: object, spec: str, unit: str) -> str:
    if value is None:
        return "n/a"
    assert isinstance(value, int | float)
    return f"{value:{spec}} {unit}"


def render(out: dict[str, Any]) -> str:
    n1, n2 = out["n1"], out["n2"]
    r1, r2 = out.get("ramp_n1", {}), out.get("ramp_n2", {})
    rev = out.get("revocation", {})
    rows = [
        ("metric", "value", "target"),
        (
            f"handshakes/s, 0 -> {n1} ({out['concurrency']} in flight)",
            _fmt(r1.get("rate"), ",.0f", "/s"),
            "",
        ),
        (f"handshakes/s, {n1} -> {n2}", _fmt(r2.get("rate"), ",.0f", "/s"), ""),
        ("connected peers at the end", f"{out.get('peers_n2', 'n/a')}", f"{n2}"),
        ("gateway RSS, no peers", _fmt(out.get("rss_base_kb", 0) / 1024, ".1f", "MB"), ""),
        (
            f"RSS delta per idle peer @ {n1}",
            _fmt(out.get("rss_per_peer_n1_kb"), ".1f", "KB"),
            "< 64 KB",
        ),
        (
            f"RSS delta per idle peer @ {n2}",
            _fmt(out.get("rss_per_peer_n2_kb"), ".1f", "KB"),
            "< 64 KB",
        ),
        ("gateway CPU, no peers", _fmt(out.get("cpu_idle_0_pct"), ".1f", "% of a core"), ""),
        (
            f"gateway CPU, {n1} idle peers",
            _fmt(out.get("cpu_idle_n1_pct"), ".1f", "% of a core"),
            "",
        ),
        (
            f"gateway CPU, {n2} idle peers",
            _fmt(out.get("cpu_idle_n2_pct"), ".1f", "% of a core"),
            "",
        ),
        (
            f"vpnctl revoke -> session closed @ {n1}",
            _fmt(rev.get("latency_s"), ".3f", "s"),
            "< 1 s",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rev.get("note") and rev.get("latency_s") is None:
        lines.append(f"revocation: {rev['note']}")
    for tag in ("ramp_n1", "ramp_n2"):
        if out.get(tag, {}).get("failed"):
            lines.append(f"{tag}: {out[tag]['failed']} failed: {out[tag]['failures']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--n1", type=int, default=1000, help="first plateau, with revocation (1000)")
    p.add_argument("--n2", type=int, default=5000, help="second plateau (5000)")
    p.add_argument("--concurrency", type=int, default=16, help="handshakes in flight (16)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling (10)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    args = p.parse_args(argv)
    if not 1 <= args.n1 <= args.n2 <= 10000:
        p.error("need 1 <= --n1 <= --n2 <= 10000")
    if not 1 <= args.concurrency <= 128:
        p.error("--concurrency must be 1..128")
    if not 1 <= args.idle <= 60:
        p.error("--idle must be 1..60 seconds")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        require_root()
    except BenchError as err:
        print(f"bench-scale: {err}", file=sys.stderr)
        return 1
    # The gateway and the load generator inherit this: one fd per peer, plus slack.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, NOFILE),) * 2)
    except (ValueError, OSError):
        # No CAP_SYS_RESOURCE (e.g. in a container): the hard limit is the ceiling.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit < args.n2 + 256:
        print(f"bench-scale: open-file limit {limit} is too low for --n2 {args.n2}",
              file=sys.stderr)  # fmt: skip
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="vpnd-scale-"))
    try:
        with signals_to_exit():
            out = run(args, workdir)
    except BenchError as err:
        print(f"bench-scale: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench-scale: interrupted; namespaces and processes were removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(out))
    for path in write_results("scale-latest", out, None, "", args.out or RESULTS):
        _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
