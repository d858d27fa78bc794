"""The measurements: iperf3 TCP/UDP, ping RTT, time to the first ping through a tunnel.

Every command runs inside a namespace with a hard timeout; iperf3 JSON and ping output
are parsed strictly, and anything unexpected is a one-line ``BenchError``.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from bench.common import BenchError, HarnessError, Netns, poll, run_tool

IPERF_PORT = 5201
_RTT = re.compile(r"time=([0-9.]+) ms")


def start_iperf_server(ns: Netns, log: Any) -> subprocess.Popen[bytes]:
    """iperf3 server on every address of ``ns`` (reached through the tunnel's address)."""
    proc = ns.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], log)

    def listening() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"iperf3 server exited with {proc.returncode}")
        out = ns.run(["ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False).stdout
        return bool(out.strip())

    poll(listening, timeout=10, interval=0.05, what="the iperf3 server")
    return proc


def wait_iperf_idle(ns: Netns, timeout: float = 20.0) -> None:
    """Wait until the iperf3 server has no connection left from the previous test: it
    serves one test at a time and resets a client that arrives while it is busy (slow
    tunnels such as OpenVPN over TCP drain their buffers for a while)."""

    def idle() -> bool:
        res = ns.run(["ss", "-Htn", "state", "established", f"( sport = :{IPERF_PORT} )"],
                     check=False)  # fmt: skip
        return not res.stdout.strip()

    poll(idle, timeout=timeout, interval=0.1, what="the iperf3 server to finish the last test")


def _iperf(ns: Netns, args: list[str], duration: float, what: str) -> dict[str, Any]:
    cmd = ["iperf3", "-J", "--connect-timeout", "3000", "-t", f"{duration:g}", *args]
    try:
        res = ns.run(cmd, check=False, timeout=duration + 30)
    except HarnessError as err:
        raise BenchError(f"{what}: {err}") from None
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        last = (res.stderr.strip() or res.stdout.strip() or "no output").splitlines()[-1]
        raise BenchError(f"{what}: iperf3 exit {res.returncode}: {last}") from None
    if not isinstance(data, dict):
        raise BenchError(f"{what}: iperf3 printed JSON that is not an object")
    if "error" in data:
        raise BenchError(f"{what}: iperf3: {data['error']}")
    end = data.get("end")
    if not isinstance(end, dict):
        raise BenchError(f"{what}: iperf3 JSON has no 'end' section")
    return end


def _number(section: object, key: str, what: str) -> float:
    value = section.get(key) if isinstance(section, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BenchError(f"{what}: iperf3 JSON lacks a numeric {key!r}")
    return float(value)


def iperf_tcp(ns: Netns, ip: str, *, streams: int, duration: float) -> float:
    """Received TCP throughput, Mbit/s (what arrived, not what was sent)."""
    what = f"iperf3 TCP x{streams} to {ip}"
    end = _iperf(ns, ["-c", ip, "-p", str(IPERF_PORT), "-P", str(streams)], duration, what)
    return _number(end.get("sum_received"), "bits_per_second", what) / 1e6


def iperf_udp64(ns: Netns, ip: str, *, duration: float) -> float:
    """64-byte UDP datagrams per second *received* by the server, sender unthrottled."""
    what = f"iperf3 UDP 64 B to {ip}"
    args = ["-c", ip, "-p", str(IPERF_PORT), "-u", "-l", "64", "-b", "0"]
    end = _iperf(ns, args, duration, what)
    received = end.get("sum_received")
    packets = _number(received, "packets", what)
    lost = _number(received, "lost_packets", what)
    seconds = _number(received, "seconds", what)
    if seconds <= 0:
        raise BenchError(f"{what}: iperf3 reports a test of {seconds} s")
    return max(0.0, packets - lost) / seconds


def ping_rtt(ns: Netns, ip: str, *, count: int = 20, interval: float = 0.05) -> float:
    """Median RTT in ms of ``count`` pings."""
    res = run_tool(ns, ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "2", ip],
                   timeout=count * interval + 15, what=f"ping {ip}")  # fmt: skip
    rtts = [float(m.group(1)) for m in _RTT.finditer(res.stdout)]
    if len(rtts) < count // 2:
        raise BenchError(f"ping {ip}: only {len(rtts)} of {count} replies")
    return statistics.median(rtts)


def first_ping(
    ns: Netns, ip: str, *, started: float, check: Callable[[], None], timeout: float = 30.0
) -> float:
    """Seconds from ``started`` (monotonic) to the first ping reply from ``ip``.

    One short ping per attempt (unreachable fails at once, no reply after 0.1 s);
    resolution is about the cost of one attempt, a few ms.
    """

    def replied() -> bool:
        check()
        res = ns.run(["ping", "-n", "-c", "1", "-W", "0.1", ip], check=False, timeout=5)
        return res.returncode == 0

    poll(replied, timeout=timeout, interval=0.005, what=f"a first ping reply from {ip}")
    return time.monotonic() - started
