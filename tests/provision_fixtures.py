"""An in-process SSH "host" on 127.0.0.1 for the provisioning tests.

``FakeHost`` runs an asyncssh server in its own thread and event loop (vpnctl's
``main`` calls ``asyncio.run`` itself). Commands run as real ``/bin/sh -c`` subprocesses
with a PATH the test chooses, so ``vpnd keygen`` and ``openssl`` are the real tools;
SFTP is the real asyncssh SFTP server, jailed to the test's tmp root (paths keep their
absolute spelling, so commands and SFTP see the same files). It counts concurrent
sessions, records commands and every file opened for reading, and can inject an SFTP
write or rename failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.constants import FXF_READ, FXF_WRITE

from vpnd.pki.pkidir import PkiDir

ROOT = Path(__file__).resolve().parents[1]
# The vpnd entry point of the Python running the tests (whatever venv that is), not a
# hard-coded path inside the checkout.
VPND = Path(sys.executable).parent / "vpnd"
SYSTEM_PATH = "/usr/bin:/bin"
OVERLAY = "10.8.0.0/24"
STEP_TIMEOUT = 20.0  # bound on every cross-thread wait


@dataclass
class HostStats:
    active: int = 0
    max_active: int = 0
    connections: int = 0
    commands: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    forwards: list[tuple[str, int]] = field(default_factory=list)


class _Server(asyncssh.SSHServer):
    def __init__(self, host: FakeHost) -> None:
        self._host = host

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        stats = self._host.stats
        stats.connections += 1
        stats.active += 1
        stats.max_active = max(stats.max_active, stats.active)
        if self._host.rendezvous is not None and stats.active >= self._host.rendezvous:
            self._host.reached.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._host.stats.active -= 1

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:  # fmt: skip
        # Only a jump host forwards, and only to loopback.
        self._host.stats.forwards.append((dest_host, dest_port))
        return self._host.allow_forwarding and dest_host == "127.0.0.1"


class _JailedSftp(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], host: FakeHost) -> None:
        super().__init__(chan)
        self._host = host

    def map_path(self, path: bytes) -> bytes:
        real = os.path.realpath(path)
        root = bytes(self._host.root)
        if real != root and not real.startswith(root + b"/"):
            raise asyncssh.SFTPPermissionDenied("outside the test root")
        return path

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        text = path.decode()
        if pflags & FXF_READ and not pflags & FXF_WRITE:
            self._host.stats.reads.append(text)
        if pflags & FXF_WRITE and self._host.fail_write and text.endswith(self._host.fail_write):
            raise asyncssh.SFTPFailure("no space left on device (injected)")
        return super().open(path, pflags, attrs)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> Any:
        if self._host.fail_rename and newpath.decode().endswith(self._host.fail_rename):
            raise asyncssh.SFTPFailure("I/O error (injected)")
        return super().posix_rename(oldpath, newpath)


class FakeHost:
    """One SSH server. ``root``: the only part of the filesystem its SFTP may touch."""

    def __init__(self, root: Path, keys_dir: Path, *, path: str = SYSTEM_PATH) -> None:
        self.root = root.resolve()
        self.keys_dir = keys_dir
        self.path = path
        self.stats = HostStats()
        self.rendezvous: int | None = None
        self.fail_write: str | None = None
        self.fail_rename: str | None = None
        self.allow_forwarding = False
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.reached = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncssh.SSHAcceptor | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, authorized: asyncssh.SSHKey) -> FakeHost:
        self._thread.start()
        auth = asyncssh.import_authorized_keys(authorized.export_public_key().decode())
        self._server = self._call(
            lambda: asyncssh.create_server(
                lambda: _Server(self),
                "127.0.0.1",
                0,
                server_host_keys=[self.host_key],
                authorized_client_keys=auth,
                process_factory=self._process,
                sftp_factory=lambda chan: _JailedSftp(chan, self),
                allow_scp=False,
            )
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            server = self._server

            async def close() -> None:
                server.close()
                await server.wait_closed()

            self._call(close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STEP_TIMEOUT)
        self._loop.close()

    def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        async def run() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(STEP_TIMEOUT)

    # -- commands ----------------------------------------------------------------------------

    async def _process(self, process: asyncssh.SSHServerProcess[str]) -> None:
        command = process.command or ""
        self.stats.commands.append(command)
        if self.rendezvous is not None:
            # Hold the first command until the bound's worth of sessions are open, so a
            # bounded deploy provably reaches its bound (bounded wait: serial code fails
            # the max_active assertion instead of hanging).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reached.wait(), STEP_TIMEOUT / 4)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": self.path, "HOME": str(self.root), "LANG": "C"},
            cwd=self.root,
        )
        out, err = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
        process.stdout.write(out.decode(errors="replace"))
        process.stderr.write(err.decode(errors="replace"))
        process.exit(proc.returncode if proc.returncode is not None else 255)

    # -- client side helpers -----------------------------------------------------------------

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        public = (key or self.host_key).export_public_key().decode().strip()
        return f"[127.0.0.1]:{self.port} {public}\n"

    @property
    def target(self) -> str:
        return f"root@127.0.0.1:{self.port}"


@dataclass
class Setup:
    """A PKI, a client identity, a known_hosts file and the remote root, under tmp."""

    tmp: Path
    pki: PkiDir
    identity: Path
    client_key: asyncssh.SSHKey
    known_hosts: Path
    remote: Path
    """The fake hosts' filesystem root."""
    hosts: list[FakeHost] = field(default_factory=list)

    def close(self) -> None:
        for host in self.hosts:
            host.stop()

    def new_host(self, *, path: str = SYSTEM_PATH, trusted: bool = True) -> FakeHost:
        host = FakeHost(self.remote, self.tmp, path=path)
        self.hosts.append(host)
        host.start(self.client_key)
        if trusted:
            with self.known_hosts.open("a") as fh:
                fh.write(host.known_hosts_line())
        return host

    def bin_dir(self, name: str, scripts: dict[str, str]) -> str:
        """A directory of commands for a host's PATH (symlink targets or shell scripts)."""
        d = self.tmp / name
        d.mkdir()
        for cmd, body in scripts.items():
            p = d / cmd
            if body.startswith("/"):
                p.symlink_to(body)
            else:
                p.write_text("#!/bin/sh\n" + body)
                p.chmod(0o755)
        return f"{d}:{SYSTEM_PATH}"


@contextlib.contextmanager
def provisioning(tmp: Path) -> Iterator[Setup]:
    setup = make_setup(tmp)
    try:
        yield setup
    finally:
        setup.close()


def make_setup(tmp: Path) -> Setup:
    pki = PkiDir(tmp / "pki")
    pki.init_ca(name="test-ca", networks=[ipaddress.ip_network(OVERLAY)])
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    identity = tmp / "id_ed25519"
    client_key.write_private_key(identity)
    identity.chmod(0o600)
    known = tmp / "known_hosts"
    known.write_text("")
    remote = tmp / "remote"
    remote.mkdir()
    return Setup(tmp, pki, identity, client_key, known, remote)


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and directory under root: relative path -> (mode, content)."""
    found: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            mode = p.lstat().st_mode & 0o7777
            found[str(p.relative_to(root))] = (mode, p.read_bytes() if p.is_file() else b"")
    return found
