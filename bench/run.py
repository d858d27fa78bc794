"""``make bench``: bare veth, vpnd, OpenVPN UDP/TCP and wireguard-go, in one run.

Each target gets its own pair of namespaces joined by a veth. All tunnels are brought
up one at a time, then measured one test at a time, interleaved. ``--baseline REV``
adds vpnd at git revision REV as one more target and compares it with the current tree.
Usage::

    .venv/bin/python -m bench.run [--runs N] [--duration S] [--only vpnd,openvpn-udp]
                                  [--baseline REV]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Netns,
    NetnsFactory,
    Pair,
    cleanup,
    make_pair,
    require_root,
    shielded,
    signals_to_exit,
)
from bench.compare import compare, render_comparison
from bench.compare import to_json as comparison_json
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
from bench.trees import Tree, current_tree, export_tree

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
    """Namespaces, server, iperf3 server, client; time to the first ping."""
    live = Live(target, TargetResult(target.key, target.label))
    try:
        live.pair = pair = make_pair(factory, workdir / target.key)
        _say(f"{target.label}: starting the server side")
        target.prepare(pair)
        start_iperf_server(pair.server, pair.workdir / "iperf3-server.log")
        cli, ip = pair.client, target.server_ip
        started = time.monotonic()
        target.start_client()
        took = first_ping(cli, ip, started=started, check=target.check_alive)
        if target.tunnel:
            live.result.samples["first_ping"] = [took]
            _say(f"  {target.label}: client start -> first ping: {took:.3f} s")
    except BenchError as err:
        live.failed = True
        live.result.errors.append(str(err))
        _say(f"{target.label}: FAILED: {err}")
    return live


def measure_rounds(lives: Sequence[Live], *, runs: int, duration: float) -> None:
    """Run r of every target before run r+1 of any, so background load and drift hit all
    alike; every other run goes in reverse order (A B, then B A), so no target always
    follows the same neighbour."""
    tests: list[tuple[str, str, Callable[[Netns, str], float]]] = [
        ("ping", "ping RTT median (ms)", ping_rtt),
        ("tcp1", "TCP x1 (Mbit/s)", lambda ns, ip: iperf_tcp(ns, ip, streams=1, duration=duration)),
        ("tcp4", "TCP x4 (Mbit/s)", lambda ns, ip: iperf_tcp(ns, ip, streams=4, duration=duration)),
        # Last: an unthrottled flood may leave a tunnel unusable for a while.
        ("udp64", "UDP 64 B rcvd (pps)", lambda ns, ip: iperf_udp64(ns, ip, duration=duration)),
    ]
    for metric, desc, test in tests:
        for run in range(1, runs + 1):
            for live in lives if run % 2 else list(reversed(lives)):
                if live.failed or live.pair is None:
                    continue
                step = functools.partial(_step, live.target, live.pair, test)
                _once(live, metric, step, desc, f"run {run}/{runs}")


def _step(target: Target, pair: Pair, test: Callable[[Netns, str], float]) -> float:
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
    p.add_argument("--runs", type=int, default=3, help="runs per test, median (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 test (5)")
    p.add_argument("--only", default="", help="comma-separated target keys (default: all)")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="also measure vpnd at git revision REV, interleaved with the "
                   "current tree, and print a comparison")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20:
        p.error("--runs must be between 1 and 20")
    if not 1 <= args.duration <= 60:
        p.error("--duration must be between 1 and 60 seconds")
    return args


def select(targets: list[Target], only: str) -> list[Target]:
    """The targets named in ``--only`` (a baseline vpnd goes with vpnd)."""
    if not only:
        return targets
    wanted = {k.strip() for k in only.split(",") if k.strip()}
    unknown = wanted - {t.key for t in targets}
    if unknown:
        keys = ", ".join(t.key for t in targets if t.key != "vpnd-base")
        raise BenchError(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {keys}")
    if "vpnd" in wanted:
        wanted.add("vpnd-base")
    return [t for t in targets if t.key in wanted]


def prepare_trees(rev: str, workdir: Path) -> tuple[Tree, Tree]:
    """The current tree and ``rev`` exported under ``workdir``, each checked to import its
    own vpnd, and byte-compiled."""
    base = export_tree(rev, workdir / "baseline")
    cur = current_tree()
    cur = dataclasses.replace(cur, label=f"vpnd @ {cur.commit}")
    base = dataclasses.replace(base, label=f"{base.label} (base)")
    for tree in (cur, base):
        tree.precompile()
        _say(f"{tree.label}: {tree.subject!r}; runs vpnd from {tree.imported_from()}")
    return cur, base


def tree_info(tree: Tree) -> dict[str, str]:
    return {"commit": tree.commit, "subject": tree.subject, "vpnd_from": str(tree.imported_from())}


def measure(targets: list[Target], args: argparse.Namespace, workdir: Path) -> list[TargetResult]:
    factory = NetnsFactory()
    try:
        lives = [bring_up(t, factory, workdir) for t in targets]
        measure_rounds(lives, runs=args.runs, duration=args.duration)
        return [live.result for live in lives]
    finally:
        problems = cleanup(factory)
        for t in targets:
            t.teardown()
        for p in problems:
            _say(f"cleanup problem: {p}")


def run_all(args: argparse.Namespace, workdir: Path) -> tuple[list[TargetResult], dict[str, Any]]:
    """Everything that needs clean-up; returns the results and what the report records."""
    info: dict[str, Any] = {}
    targets = all_targets()
    if args.baseline is not None:
        if args.only and "vpnd" not in {k.strip() for k in args.only.split(",")}:
            raise BenchError("--baseline compares vpnd: keep vpnd in --only")
        cur, base = prepare_trees(args.baseline, workdir)
        info = {"baseline_rev": args.baseline, "current": tree_info(cur),
                "baseline": tree_info(base)}  # fmt: skip
        targets = all_targets(current=cur, baseline=base)
    return measure(select(targets, args.only), args, workdir), info


def report(results: list[TargetResult], info: dict[str, Any], args: argparse.Namespace,
           loads: tuple[tuple[float, ...], tuple[float, ...]]) -> None:  # fmt: skip
    settings = {
        "runs": args.runs,
        "duration_s": args.duration,
        "udp_payload": 64,
        "ping": "20 x 0.05 s, median; one per run",
        "order": "interleaved; every other run reversed",
        "loadavg_before": loads[0],
        "loadavg_after": loads[1],
        **info,
    }
    title = f"vpnd bench ({args.runs} runs x {args.duration:g} s, median)"
    print(render_table(results))
    payload = to_json(results, settings)
    by_key = {r.key: r for r in results}
    if "vpnd-base" in by_key and "vpnd" in by_key:
        base, cur = by_key["vpnd-base"], by_key["vpnd"]
        rows = compare(base, cur)
        print()
        for side, tree in (("current", info["current"]), ("baseline", info["baseline"])):
            print(f"{side}: {tree['commit']} {tree['subject']!r} (vpnd from {tree['vpnd_from']})")
        print(render_comparison(rows, base, cur))
        payload["comparison"] = comparison_json(rows)
    if max(loads[0][0], loads[1][0]) > LOAD_WARN:
        print(f"warning: load average {loads[0][0]:.1f} before / "
              f"{loads[1][0]:.1f} after: other work shared the CPUs; numbers are low "
              "and noisy")  # fmt: skip
    for path in write_results("latest", payload, results, title, args.out):
        _say(f"wrote {path}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        require_root()
        check_tools()
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="vpnd-bench-"))
    load_before = os.getloadavg()
    try:
        with signals_to_exit():
            results, info = run_all(args, workdir)
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; namespaces and processes were removed", file=sys.stderr)
        return 130
    except SystemExit:
        print("bench: terminated; namespaces and processes were removed", file=sys.stderr)
        raise
    finally:
        with shielded():
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, info, args, (load_before, os.getloadavg()))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
