"""``make bench``: bare veth, vpnd, OpenVPN UDP/TCP and wireguard-go, in one run.

Each target gets its own fresh pair of namespaces joined by a veth, is measured, and is
torn down before the next one starts, so they never compete for the CPUs. Usage::

    .venv/bin/python -m bench.run [--runs N] [--duration S] [--only vpnd,openvpn-udp]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import (
    BenchError,
    NetnsFactory,
    cleanup,
    make_pair,
    require_root,
    signals_to_exit,
)
from bench.measure import first_ping, iperf_tcp, iperf_udp64, ping_rtt, start_iperf_server
from bench.report import RESULTS, TargetResult, render_table, to_json, write_results
from bench.targets import Target, all_targets

TOOLS = ("iperf3", "openvpn", "wireguard-go", "wg", "ping", "openssl", "ss")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _measure(
    result: TargetResult, metric: str, runs: int, fn: Callable[[], float], desc: str
) -> None:
    """Run one measurement ``runs`` times; a failure is recorded, the others go on."""
    for i in range(runs):
        try:
            value = fn()
        except BenchError as first:
            # One retry: iperf3's control connection occasionally dies right after a
            # previous test; a second failure is reported.
            _say(f"  {desc} run {i + 1}: failed ({first}); retrying once")
            try:
                value = fn()
            except BenchError as err:
                result.errors.append(f"{metric}: {err}")
                _say(f"  {desc} run {i + 1}: FAILED: {err}")
                return
        result.samples.setdefault(metric, []).append(value)
        _say(f"  {desc} run {i + 1}/{runs}: {value:,.3f}")


def bench_target(target: Target, *, runs: int, duration: float, workdir: Path) -> TargetResult:
    result = TargetResult(target.key, target.label)
    factory = NetnsFactory()
    try:
        pair = make_pair(factory, workdir / target.key)
        _say(f"{target.label}: starting the server side")
        target.prepare(pair)
        iperf_log = pair.workdir / "iperf3-server.log"
        start_iperf_server(pair.server, iperf_log)
        cli, ip = pair.client, target.server_ip
        started = time.monotonic()
        target.start_client()
        if target.tunnel:
            took = first_ping(cli, ip, started=started, check=target.check_alive)
            result.samples["first_ping"] = [took]
            _say(f"  client start -> first ping: {took:.3f} s")
        _measure(result, "ping", 1, lambda: ping_rtt(cli, ip), "ping RTT median (ms)")
        _measure(result, "tcp1", runs, lambda: iperf_tcp(cli, ip, streams=1, duration=duration),
                 "TCP x1 (Mbit/s)")  # fmt: skip
        _measure(result, "tcp4", runs, lambda: iperf_tcp(cli, ip, streams=4, duration=duration),
                 "TCP x4 (Mbit/s)")  # fmt: skip
        # Last: an unthrottled flood may leave a tunnel unusable for a while.
        _measure(result, "udp64", runs, lambda: iperf_udp64(cli, ip, duration=duration),
                 "UDP 64 B received (pps)")  # fmt: skip
    except BenchError as err:
        result.errors.append(str(err))
        _say(f"{target.label}: FAILED: {err}")
    finally:
        problems = cleanup(factory)
        target.teardown()
        for p in problems:
            result.errors.append(f"cleanup: {p}")
    return result


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
    try:
        with signals_to_exit():
            for target in targets:
                results.append(
                    bench_target(target, runs=args.runs, duration=args.duration, workdir=workdir)
                )
    except KeyboardInterrupt:
        print("bench: interrupted; namespaces and processes were removed", file=sys.stderr)
        return 130
    except SystemExit:
        print("bench: terminated; namespaces and processes were removed", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    settings = {"runs": args.runs, "duration_s": args.duration, "udp_payload": 64,
                "ping": "20 x 0.05 s, median"}  # fmt: skip
    title = f"vpnd bench ({args.runs} runs x {args.duration:g} s, median)"
    print(render_table(results))
    for path in write_results("latest", to_json(results, settings), results, title, args.out):
        _say(f"wrote {path}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
