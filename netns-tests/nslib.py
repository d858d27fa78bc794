"""Network-namespace test harness: throwaway namespaces, veths, tracked processes, cleanup proof.

Every namespace is named ``vpnt-<random>`` and lives only for one test: the
``netns_factory`` fixture (conftest.py) deletes it in a ``finally``, and an ``atexit``
hook catches anything a crashed run left. Processes started with ``Netns.popen`` run
in their own session and are stopped by id (SIGTERM, then SIGKILL after a bound).
Only addresses inside our own namespaces are used (172.31.x.y underlay, 10.8.x.y
overlay); nothing here ever touches the host namespace's links or routes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

PREFIX = "vpnt-"
TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
RUN_TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[1]
# The interpreter running the suite (its venv holds vpnd/vpnctl), not a path in the checkout.
PYTHON = sys.executable


class HarnessError(Exception):
    """A harness command failed; the message names the command and its stderr."""


def _run(cmd: Sequence[str], *, timeout: float = RUN_TIMEOUT, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    try:
        res = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"timed out after {timeout:g}s: {' '.join(cmd)}") from None
    if check and res.returncode != 0:
        raise HarnessError(
            f"exit {res.returncode}: {' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}"
        )
    return res


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie we have not reaped is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_process(proc: subprocess.Popen[bytes], grace: float = TERM_GRACE) -> int:
    """SIGTERM the process's group, SIGKILL it after ``grace`` seconds; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    # Anything else left in its group (children it forked) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


class Netns:
    """One network namespace we created. Use ``NetnsFactory`` (or the fixture) to make them."""

    def __init__(self, name: str, registry: NetnsFactory) -> None:
        self.name = name
        self._registry = registry
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.deleted = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = RUN_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and wait (bounded by ``timeout``)."""
        return _run([*self.exec_prefix(), *cmd], check=check, timeout=timeout, input=input)

    def python(
        self, args: Sequence[str], *, check: bool = True, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run the project's Python inside the namespace, from the repo root."""
        return self.run([PYTHON, *args], check=check, timeout=timeout)

    def popen(
        self,
        cmd: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in the background inside the namespace; output goes to ``log_path``.

        The process gets its own session, is tracked, and is stopped on teardown.
        """
        log = open(log_path, "ab")  # noqa: SIM115 - closed on teardown
        self._logs.append(log)
        proc = subprocess.Popen(
            [*self.exec_prefix(), *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=None if env is None else dict(env),
            cwd=ROOT,
        )
        self.processes.append(proc)
        self._registry.processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process currently inside the namespace (ours or their children)."""
        out = _run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    def snapshot(self) -> str:
        """Normalised addresses and routes, for before/after diffs (OpenVPN t_client style)."""
        lines: list[str] = []
        for cmd, tag in (
            (["ip", "-o", "addr", "show"], "addr"),
            (["ip", "-4", "route", "show", "table", "all"], "route4"),
            (["ip", "-6", "route", "show", "table", "all"], "route6"),
        ):
            for raw in self.run(cmd).stdout.splitlines():
                text = re.sub(r"^\d+:\s+", "", raw)  # interface index
                text = re.sub(r"\\\s+valid_lft.*$", "", text)  # lifetimes change with time
                text = re.sub(r"\s+tentative\b", "", text)  # IPv6 DAD finishes on its own
                text = " ".join(text.split())
                if text:
                    lines.append(f"{tag}: {text}")
        return "\n".join(sorted(lines)) + "\n"

    def delete(self) -> list[str]:
        """Stop our processes, kill anything else inside, delete the namespace. Returns problems."""
        problems: list[str] = []
        for proc in self.processes:
            try:
                stop_process(proc)
            except (OSError, subprocess.TimeoutExpired) as e:
                problems.append(f"{self.name}: could not stop pid {proc.pid}: {e}")
        for log in self._logs:
            log.close()
        if self.deleted:
            return problems
        if self.name in list_namespaces():
            # Strays (e.g. a daemon's child) live in a namespace we own, so they are ours.
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            res = _run(["ip", "netns", "delete", self.name], check=False)
            if res.returncode != 0:
                problems.append(f"{self.name}: ip netns delete failed: {res.stderr.strip()}")
        self.deleted = True
        return problems


def veth(
    ns_a: Netns, ns_b: Netns, addr_a: str, addr_b: str, *, mtu: int | None = None
) -> tuple[str, str]:
    """A veth pair created directly inside ``ns_a``/``ns_b`` (never in the host namespace),
    addressed and up. Returns the two interface names."""
    tag = secrets.token_hex(3)
    name_a, name_b = f"ve{tag}a", f"ve{tag}b"
    ns_a.run(["ip", "link", "add", name_a, "type", "veth", "peer", "name", name_b,
              "netns", ns_b.name])  # fmt: skip
    for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        if mtu is not None:
            ns.run(["ip", "link", "set", name, "mtu", str(mtu)])
        ns.run(["ip", "addr", "add", addr, "dev", name])
        # No IPv6 DAD: a "tentative" address would differ between before/after snapshots.
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.accept_dad=0"])
        ns.run(["ip", "link", "set", name, "up"])
    return name_a, name_b


class NetnsFactory:
    """Makes namespaces for one test and tears all of them down."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        _FACTORIES.append(self)

    def __call__(self) -> Netns:
        name = PREFIX + secrets.token_hex(4)
        _run(["ip", "netns", "add", name])
        ns = Netns(name, self)
        self.namespaces.append(ns)
        try:
            ns.run(["ip", "link", "set", "lo", "up"])
        except HarnessError:
            ns.delete()
            raise
        return ns

    def cleanup(self) -> list[str]:
        """Delete every namespace (processes first); returns problems instead of raising."""
        problems: list[str] = []
        for ns in reversed(self.namespaces):
            try:
                problems += ns.delete()
            except (HarnessError, OSError) as e:
                problems.append(f"{ns.name}: {e}")
        return problems

    def assert_clean(self) -> None:
        """No namespace this factory made and no process it started survives."""
        assert_clean(self.namespaces, self.processes)


def assert_clean(
    namespaces: Iterable[Netns] | None = None,
    processes: Iterable[subprocess.Popen[bytes]] | None = None,
) -> None:
    """Fail if a namespace or process survives.

    With no arguments it checks everything this Python process created. It does not
    demand that *no* ``vpnt-`` namespace exists on the machine: other suites may be
    running in parallel with the same prefix.
    """
    if namespaces is None:
        namespaces = [ns for f in _FACTORIES for ns in f.namespaces]
    if processes is None:
        processes = [p for f in _FACTORIES for p in f.processes]
    live = set(list_namespaces())
    left = sorted(ns.name for ns in namespaces if ns.name in live)
    alive = sorted(p.pid for p in processes if p.poll() is None or _pid_alive(p.pid))
    if left or alive:
        raise AssertionError(f"harness cleanup failed: namespaces {left}, processes {alive}")


def leftover_namespaces() -> list[str]:
    """Every ``vpnt-`` namespace on the machine, ours or not (for reports)."""
    return [n for n in list_namespaces() if n.startswith(PREFIX)]


_FACTORIES: list[NetnsFactory] = []


@atexit.register
def _safety_net() -> None:
    for factory in _FACTORIES:
        with contextlib.suppress(Exception):
            factory.cleanup()


POLL_INTERVAL = 0.05


def holds_within(
    predicate: Callable[[], object], timeout: float, *, interval: float = POLL_INTERVAL
) -> bool:
    """True as soon as ``predicate()`` holds, False once ``timeout`` seconds passed without.

    The one polling loop of the netns tests: state in another process or namespace has
    no event to await, so it is re-checked every ``interval``; bounded in time and count.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))  # a poll interval, not synchronisation
    return bool(predicate())


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    *,
    interval: float = POLL_INTERVAL,
) -> None:
    """Return as soon as ``predicate()`` holds; raise ``AssertionError`` naming ``what``
    (the thing that did not happen) after ``timeout`` seconds."""
    if not holds_within(predicate, timeout, interval=interval):
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
