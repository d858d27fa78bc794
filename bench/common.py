"""Shared plumbing for the benches: the namespace harness, signals, bounded waits.

The namespace harness is ``netns-tests/nslib.py`` (imported, not copied): every
namespace it makes is deleted by our ``finally`` blocks and, as a last resort, by its
``atexit`` hook. SIGTERM/SIGHUP are turned into ``SystemExit`` so those run too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "netns-tests"))

from nslib import (  # noqa: E402
    PYTHON,
    HarnessError,
    Netns,
    NetnsFactory,
    veth,
)

__all__ = [
    "PYTHON",
    "ROOT",
    "BenchError",
    "HarnessError",
    "Netns",
    "NetnsFactory",
    "Pair",
    "make_pair",
    "median",
    "poll",
    "run_tool",
    "signals_to_exit",
]

VPNCTL = str(ROOT / ".venv" / "bin" / "vpnctl")
VPND = str(ROOT / ".venv" / "bin" / "vpnd")
SERVER_UNDERLAY = "172.31.0.1"
CLIENT_UNDERLAY = "172.31.0.2"


class BenchError(Exception):
    """A bench step failed; the message is one line saying which and why."""


@dataclass
class Pair:
    """Two namespaces joined by one veth: ``server`` (172.31.0.1) and ``client`` (.2)."""

    server: Netns
    client: Netns
    server_if: str
    client_if: str
    workdir: Path


def make_pair(factory: NetnsFactory, workdir: Path) -> Pair:
    server, client = factory(), factory()
    s_if, c_if = veth(server, client, f"{SERVER_UNDERLAY}/24", f"{CLIENT_UNDERLAY}/24")
    workdir.mkdir(parents=True, exist_ok=True)
    return Pair(server, client, s_if, c_if, workdir)


def poll(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str
) -> float:
    """Wait until ``predicate()`` holds; bounded in time *and* count. Returns seconds waited."""
    start = time.monotonic()
    attempts = max(1, int(timeout / max(interval, 0.001)) + 1)
    for _ in range(attempts):
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


def run_tool(
    ns: Netns, cmd: Sequence[str], *, timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run a command in ``ns``; a failure becomes a one-line ``BenchError``."""
    try:
        res = ns.run(cmd, check=False, timeout=timeout)
    except HarnessError as err:
        raise BenchError(f"{what}: {err}") from None
    if res.returncode != 0:
        detail = (res.stderr.strip() or res.stdout.strip()).splitlines()
        last = detail[-1] if detail else f"exit {res.returncode}"
        raise BenchError(f"{what}: exit {res.returncode}: {last}")
    return res


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, joined on one line (for error messages)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def _to_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_to_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit (Ctrl-C already raises KeyboardInterrupt), so every
    ``finally`` runs; the caller's clean-up should be wrapped in ``shielded()``."""
    previous = {s: signal.signal(s, _to_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore further interrupts while cleaning up, so a second Ctrl-C cannot strand a namespace."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cleanup(factory: NetnsFactory) -> list[str]:
    """Delete every namespace of ``factory`` (stopping its processes first)."""
    with shielded():
        return factory.cleanup()


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("the bench builds network namespaces: run it as root")
