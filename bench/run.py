"""``make bench``: bare veth, vpnd, OpenVPN UDP/TCP and wireguard-go, in one run.

Each target gets its own fresh pair of namespaces joined by a veth, is measured, and is
torn down before the next one starts, so they never compete for the CPUs. Usage::

    .venv/bin/python -m bench.run [--runs N] [--duration S] [--only vpnd,openvpn-udp]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BenchError,
    Netns,
    NetnsFactory,
    Pair,
    cleanup,
    make_pair,
    require_root,
    signals_to_exit,
)
from bench.measure import (
    first_ping,
    iperf_tcp,
    iperf_udp64,
    ping_rtt,
    start_iperf_server,
    wait_iperf_idle,
)
from bench.report import RESULTS, TargetResult, render_table, to_json, write_results
from bench.targets import Target, all_targets

LOAD_WARN = 1.0
TOOLS = ("iperf3", "openvpn", "wireguard-go", "wg", "ping", "openssl", "ss")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Live:
    """A target whose tunnel is up (or failed to come up) for the whole measurement."""

    target: Target
    result: TargetResult
    pair: Pair | None = None
    failed: bool = False


def _once(live: Live, metric: str, fn: Callable[[], float], desc: str, run: str) -> None:
    """One measurement with one retry; a second failure is recorded, the rest goes on."""
    label = live.target.label
    for attempt in (1, 2):
        try:
            value = fn()
        except BenchError as err:
            if attempt == 1:
                # iperf3's control connection sometimes dies right after a previous test.
                _say(f"  {label}: {desc} {run}: failed ({err}); retrying once")
                continue
            live.result.errors.append(f"{metric}: {err}")
            _say(f"  {label}: {desc} {run}: FAILED: {err}")
            return
        live.result.samples.setdefault(metric, []).append(value)
        _say(f"  {label}: {desc} {run}: {value:,.3f}")
        return


def bring_up(target: Target, factory: NetnsFactory, workdir: Path) -> Live:
    """Namespaces, server, iperf3 server, client; time to first ping; ping RTT."""
    live = Live(target, TargetResult(target.key, target.label))
    try:
        live.pair = pair = make_pair(factory, workdir / target.key)
        _say(f"{target.label}: starting the server side")
        target.prepare(pair)
        start_iperf_server(pair.server, pair.workdir / "iperf3-server.log")
        cli, ip = pair.client, target.server_ip
        started = time.monotonic()
        target.start_client()
        if target.tunnel:
            took = first_ping(cli, ip, started=started, check=target.check_alive)
            live.result.samples["first_ping"] = [took]
            _say(f"  {target.label}: client start -> first ping: {took:.3f} s")
        _once(live, "ping", lambda: ping_rtt(cli, ip), "ping RTT median (ms)", "")
    except BenchError as err:
        live.failed = True
        live.result.errors.append(str(err))
        _say(f"{target.label}: FAILED: {err}")
    return live


def throughput_rounds(lives: Sequence[Live], *, runs: int, duration: float) -> None:
    """Run r of every target before run r+1 of any: background load hits all alike."""
    tests: list[tuple[str, str, Callable[[Netns, str], float]]] = [
        ("tcp1", "TCP x1 (Mbit/s)", lambda ns, ip: iperf_tcp(ns, ip, streams=1, duration=duration)),
        ("tcp4", "TCP x4 (Mbit/s)", lambda ns, ip: iperf_tcp(ns, ip, streams=4, duration=duration)),
        # Last: an unthrottled flood may leave a tunnel unusable for a while.
        ("udp64", "UDP 64 B rcvd (pps)", lambda ns, ip: iperf_udp64(ns, ip, duration=duration)),
    ]
    for metric, desc, test in tests:
        for run in range(1, runs + 1):
            for live in lives:
                if live.failed or live.pair is None:
                    continue
                step = functools.partial(_iperf_step, live.target, live.pair, test)
                _once(live, metric, step, desc, f"run {run}/{runs}")


def _iperf_step(target: Target, pair: Pair, test: Callable[[Netns, str], float]) -> float:
    target.check_alive()
    wait_iperf_idle(pair.server)
    return test(pair.client, target.server_ip)


def check_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (run: scripts/install-apt.sh iperf3 openvpn "
            "wireguard-go wireguard-tools iputils-ping iproute2 openssl)"
        )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="iperf3 runs per test, median (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 test (5)")
    p.add_argument("--only", default="", help="comma-separated target keys (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20:
        p.error("--runs must be between 1 and 20")
    if not 1 <= args.duration <= 60:
        p.error("--duration must be between 1 and 60 seconds")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    targets = all_targets()
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = wanted - {t.key for t in targets}
        if unknown:
            keys = ", ".join(t.key for t in targets)
            print(f"bench: unknown target(s) {', '.join(sorted(unknown))}; choose from {keys}",
                  file=sys.stderr)  # fmt: skip
            return 2
        targets = [t for t in targets if t.key in wanted]
    try:
        require_root()
        check_tools()
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="vpnd-bench-"))
    results: list[TargetResult] = []
    factory = NetnsFactory()
    load_before = os.getloadavg()
    try:
        with signals_to_exit():
            try:
                lives = [bring_up(t, factory, workdir) for t in targets]
                throughput_rounds(lives, runs=args.runs, duration=args.duration)
                results = [live.result for live in lives]
            finally:
                problems = cleanup(factory)
                for t in targets:
                    t.teardown()
                for p in problems:
                    _say(f"cleanup problem: {p}")
    except KeyboardInterrupt:
        print("bench: interrupted; namespaces and processes were removed", file=sys.stderr)
        return 130
    except SystemExit:
        print("bench: terminated; namespaces and processes were removed", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    settings = {
        "runs": args.runs,
        "duration_s": args.duration,
        "udp_payload": 64,
        "ping": "20 x 0.05 s, median",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    title = f"vpnd bench ({args.runs} runs x {args.duration:g} s, median)"
    print(render_table(results))
    if max(load_before[0], load_after[0]) > LOAD_WARN:
        print(f"warning: load average {load_before[0]:.1f} before / "
              f"{load_after[0]:.1f} after: other work shared the CPUs; numbers are low "
              "and noisy")  # fmt: skip
    for path in write_results("latest", to_json(results, settings), results, title, args.out):
        _say(f"wrote {path}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
