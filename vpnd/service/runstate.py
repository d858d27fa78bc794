"""What a running vpnd changed in the kernel, recorded under the runtime directory.

vpnd never deletes or edits kernel state it did not create. To keep that promise
across crashes it writes down, before each change, what it is about to create:

- ``<netns>.<tun>.lock``: an flock held for the daemon's whole life. A second vpnd
  with the same TUN name in the same network namespace is refused before it touches
  anything. The file holds the owner's pid (for the refusal message).
- ``<netns>.<tun>.json``: the links it created (marked ``vpnd:<pid>``, see
  ``vpnd.net.ownership``) and its nftables table. Written atomically.
- ``<netns>.sysctl.json``: the namespace-wide sysctls vpnd changed (IPv4/IPv6
  forwarding), each with the value it had before vpnd *first* changed it and the vpnd
  processes that currently need it. The last holder to leave (or ``vpnd cleanup``
  after a crash) puts the original value back; a restart after a crash reuses the
  recorded original instead of mistaking vpnd's own "1" for it.

``<netns>`` is the inode of ``/proc/self/ns/net``: many vpnd instances in different
network namespaces can share one filesystem (and one TUN name) without meeting.
Routes need no record: every route vpnd adds goes out through its TUN and dies with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vpnd.files.atomic import PRIVATE, atomic_write
from vpnd.net.ownership import pid_alive

DEFAULT_RUNTIME_DIR = Path("/run/vpnd")
ENV_RUNTIME_DIR = "VPND_RUNTIME_DIR"

__all__ = [
    "DEFAULT_RUNTIME_DIR",
    "ENV_RUNTIME_DIR",
    "AlreadyRunning",
    "InstanceLock",
    "InstanceState",
    "RuntimeDirError",
    "SysctlLedger",
    "control_socket_in_use",
    "netns_id",
    "resolve_runtime_dir",
]


class RuntimeDirError(Exception):
    """The runtime directory cannot be used; the message says what to fix."""


class AlreadyRunning(RuntimeDirError):
    """Another vpnd holds the lock for this TUN in this network namespace."""


class Sysctls(Protocol):
    def read_sysctl(self, key: str) -> str: ...
    def write_sysctl(self, key: str, value: str) -> None: ...


def resolve_runtime_dir(configured: Path | None = None) -> Path:
    """The config's ``runtime_dir``, else ``$VPND_RUNTIME_DIR``, else /run/vpnd."""
    if configured is not None:
        return configured
    env = os.environ.get(ENV_RUNTIME_DIR)
    return Path(env) if env else DEFAULT_RUNTIME_DIR


def netns_id() -> str:
    """This process's network namespace identity (the inode of /proc/self/ns/net)."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "0"  # no /proc: one namespace as far as we can tell


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeDirError(
            f"runtime_dir {path}: cannot create it: {err.strerror}; "
            f"set runtime_dir or {ENV_RUNTIME_DIR} to a writable directory"
        ) from None
    if not path.is_dir():
        raise RuntimeDirError(f"runtime_dir {path} is not a directory")


@contextlib.contextmanager
def _flocked(directory: Path) -> Iterator[None]:
    """Hold an exclusive (blocking, short) lock on the runtime directory itself for a
    read-modify-write: no lock file is left behind."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable or torn by hand: treat as nothing recorded
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), PRIVATE)


class InstanceLock:
    """The per-(namespace, TUN) lock; held from before the first kernel change to exit."""

    def __init__(self, runtime_dir: Path, tun: str, *, netns: str | None = None) -> None:
        self.dir = runtime_dir
        self.tun = tun
        self.netns = netns or netns_id()
        self.path = runtime_dir / f"{self.netns}.{tun}.lock"
        self.state_path = runtime_dir / f"{self.netns}.{tun}.json"
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning (one line, with the owner's pid)."""
        _ensure_dir(self.dir)
        for _ in range(5):  # bounded: a racing owner may unlink the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE)
            except OSError as err:
                raise RuntimeDirError(f"runtime_dir {self.dir}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise AlreadyRunning(
                        f"another vpnd (pid {other}) is running with TUN {self.tun} in this "
                        "network namespace; stop it first or choose another tun.name"
                    ) from None
                raise RuntimeDirError(f"lock {self.path}: {err.strerror}") from None
            # The previous owner may have unlinked the file between our open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return
        raise RuntimeDirError(f"lock {self.path}: kept changing under us; try again")

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Remove the state and lock files (only while holding the lock), then unlock."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fd, self._fd = self._fd, -1
        os.close(fd)


@dataclass
class InstanceState:
    """What one vpnd instance created; saved (atomically) before each creation."""

    pid: int
    tun: str
    links: list[str] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> InstanceState | None:
        data = _read_json(path)
        if not data:
            return None
        try:
            return cls(
                pid=int(data["pid"]),
                tun=str(data["tun"]),
                links=[str(x) for x in data.get("links", [])],
                nft_tables=[str(x) for x in data.get("nft_tables", [])],
            )
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, path: Path) -> None:
        _write_json(
            path,
            {"pid": self.pid, "tun": self.tun, "links": self.links, "nft_tables": self.nft_tables},
        )


class SysctlLedger:
    """Namespace-wide sysctls vpnd set, their pre-vpnd values, and who needs them now."""

    def __init__(self, runtime_dir: Path, *, netns: str | None = None) -> None:
        self.dir = runtime_dir
        ns = netns or netns_id()
        self.path = runtime_dir / f"{ns}.sysctl.json"
        self._lock = runtime_dir

    def _save(self, data: dict[str, Any]) -> None:
        if data:
            _write_json(self.path, data)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @staticmethod
    def _live(entry: dict[str, Any], exclude: int | None = None) -> list[int]:
        pids = [int(p) for p in entry.get("holders", []) if isinstance(p, int)]
        return [p for p in pids if p != exclude and pid_alive(p)]

    def hold(self, sys: Sysctls, key: str, value: str, pid: int) -> str:
        """Record ``key``'s original (unless a record survives a crash), add ``pid`` as a
        holder and set ``value``. Returns the recorded original value."""
        _ensure_dir(self.dir)
        with _flocked(self._lock):
            data = _read_json(self.path)
            entry = data.get(key)
            if not isinstance(entry, dict) or "original" not in entry:
                entry = {"original": sys.read_sysctl(key), "holders": []}
            entry["set"] = value
            entry["holders"] = [*self._live(entry, exclude=pid), pid]
            data[key] = entry
            self._save(data)  # recorded before the change: a crash now is recoverable
            sys.write_sysctl(key, value)
            return str(entry["original"])

    def release(self, sys: Sysctls, key: str, pid: int) -> str | None:
        """Drop ``pid`` as holder; the last one out restores the original. Returns a
        description of what was restored, or None."""
        if not self.path.exists():
            return None
        with _flocked(self._lock):
            data = _read_json(self.path)
            entry = data.get(key)
            if not isinstance(entry, dict):
                return None
            live = self._live(entry, exclude=pid)
            if live:
                entry["holders"] = live
                self._save(data)
                return None
            line = self._restore(sys, key, entry)
            del data[key]
            self._save(data)
            return line

    def release_dead(self, sys: Sysctls) -> list[str]:
        """After a crash: restore every sysctl no live vpnd holds any more."""
        if not self.path.exists():
            return []
        out: list[str] = []
        with _flocked(self._lock):
            data = _read_json(self.path)
            for key in list(data):
                entry = data[key]
                if not isinstance(entry, dict) or "original" not in entry:
                    del data[key]
                    continue
                live = self._live(entry)
                if live:
                    entry["holders"] = live
                    continue
                line = self._restore(sys, key, entry)
                del data[key]
                if line:
                    out.append(line)
            self._save(data)
        return out

    @staticmethod
    def _restore(sys: Sysctls, key: str, entry: dict[str, Any]) -> str | None:
        """Put the original back, unless someone else changed the value since vpnd set
        it: then it is theirs now, and vpnd leaves it alone."""
        original, ours = str(entry["original"]), entry.get("set")
        name = key.replace("/", ".")
        if ours is not None and sys.read_sysctl(key) != str(ours):
            return f"sysctl {name} left alone: changed by someone else since vpnd set it"
        sys.write_sysctl(key, original)
        return f"sysctl {name} restored to {original}"

    def recorded(self) -> dict[str, Any]:
        return _read_json(self.path)


def control_socket_in_use(path: Path) -> bool:
    """Is a live vpnd listening on the unix socket ``path`` (a connect succeeds)?"""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except OSError:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True
