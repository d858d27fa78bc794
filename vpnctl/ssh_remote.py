"""SSH to a host being provisioned (asyncssh): connect, verify its host key, run, SFTP.

Host keys are always verified against a known_hosts file; there is no way to turn that
off. No ~/.ssh/config is read: what is verified and how follows from ``SshOptions``
alone. Every failure is a one-line ``ProvisionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from vpnctl.ssh_target import SshTarget

CONNECT_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 120.0
MAX_REMOTE_READ = 256 * 1024  # a CSR or certificate; anything larger is not one


class ProvisionError(Exception):
    """Provisioning refused or failed; ``str()`` is one actionable line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class PassphraseNeeded(ProvisionError):
    """The identity key is encrypted and no passphrase was given."""


# --- connecting ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SshOptions:
    """How to reach and authenticate to hosts. Host keys are always checked."""

    known_hosts: Path
    identity: asyncssh.SSHKey | None = None
    """A loaded key (see :func:`load_identity`); None: ssh-agent when SSH_AUTH_SOCK is
    set, else the default ~/.ssh/id_* keys."""
    identity_path: Path | None = None
    """Where ``identity`` came from, for messages."""
    jump: SshTarget | None = None
    connect_timeout: float = CONNECT_TIMEOUT_S
    command_timeout: float = COMMAND_TIMEOUT_S


def load_identity(path: Path, passphrase: bytes | None = None) -> asyncssh.SSHKey:
    """Load a private key for client auth; PassphraseNeeded when it is encrypted."""
    try:
        return asyncssh.read_private_key(path, passphrase)
    except OSError as exc:
        raise ProvisionError(f"cannot read identity {path}: {exc.strerror or exc}") from None
    except asyncssh.KeyImportError as exc:
        text = str(exc)
        if passphrase is None and "assphrase" in text:
            raise PassphraseNeeded(f"identity {path} is encrypted: give its passphrase") from None
        if passphrase is not None and ("decrypt" in text.lower() or "assphrase" in text):
            raise ProvisionError(f"cannot decrypt identity {path}: wrong passphrase") from None
        raise ProvisionError(f"identity {path} is not a usable private key: {text}") from None
    except asyncssh.KeyEncryptionError as exc:
        if "bcrypt" in str(exc):
            raise ProvisionError(
                f"identity {path} is an encrypted OpenSSH-format key, which needs the Python "
                "package bcrypt (not installed): use ssh-agent, or re-encrypt it as PKCS#8 "
                f"with 'ssh-keygen -p -m PKCS8 -f {path}'"
            ) from None
        raise ProvisionError(f"cannot decrypt identity {path}: {exc}") from None


def read_known_hosts(path: Path) -> asyncssh.SSHKnownHosts:
    hint = "add the host key (ssh-keyscan HOST, verify its fingerprint out of band)"
    if not path.is_file():
        raise ProvisionError(
            f"known hosts file {path} does not exist: {hint}, or give --known-hosts"
        )
    try:
        return asyncssh.read_known_hosts(str(path))
    except OSError as exc:
        raise ProvisionError(f"cannot read known hosts {path}: {exc.strerror or exc}") from None
    except (ValueError, asyncssh.Error) as exc:
        raise ProvisionError(f"known hosts file {path} is garbled: {exc}") from None


def _host_key_refusal(target: SshTarget, known: asyncssh.SSHKnownHosts, path: Path) -> str:
    port = None if target.port == 22 else target.port
    listed = known.match(target.host, target.host, port)
    entry = target.host if port is None else f"[{target.host}]:{port}"
    keyscan = f"ssh-keyscan -p {target.port} {target.host}"
    if listed[0] or listed[1]:
        return (
            f"host key of {entry} does NOT match {path}: it changed (reinstalled host, or a "
            f"man-in-the-middle). Verify the new fingerprint out of band, then replace the "
            f"entry (ssh-keygen -R '{entry}' -f {path}; {keyscan} >> {path})"
        )
    return (
        f"host key of {entry} is unknown: it is not in {path}. Run '{keyscan}', verify the "
        f"fingerprint out of band, then append the line to {path}"
    )


async def _open(
    target: SshTarget,
    options: SshOptions,
    known: asyncssh.SSHKnownHosts,
    tunnel: asyncssh.SSHClientConnection | None,
) -> asyncssh.SSHClientConnection:
    kwargs: dict[str, object] = {
        "port": target.port,
        "known_hosts": known,
        # No ~/.ssh/config: what is verified and how must follow from our options alone.
        "config": [],
        "password_auth": False,
        "kbdint_auth": False,
        "connect_timeout": options.connect_timeout,
        "login_timeout": options.connect_timeout,
    }
    if target.user:
        kwargs["username"] = target.user
    if options.identity is not None:
        kwargs["client_keys"] = [options.identity]
        kwargs["agent_path"] = None
    if tunnel is not None:
        kwargs["tunnel"] = tunnel
    where = str(target)
    try:
        return await asyncssh.connect(target.host, **kwargs)
    except asyncssh.HostKeyNotVerifiable:
        raise ProvisionError(_host_key_refusal(target, known, options.known_hosts)) from None
    except asyncssh.PermissionDenied:
        how = (
            f"identity {options.identity_path}"
            if options.identity is not None
            else "ssh-agent"
            if os.environ.get("SSH_AUTH_SOCK")
            else "default keys ~/.ssh/id_*"
        )
        raise ProvisionError(
            f"{where} refused authentication with {how}: check authorized_keys, the user, "
            "or give --identity"
        ) from None
    except TimeoutError:
        raise ProvisionError(
            f"{where}: no SSH connection within {options.connect_timeout:g}s"
        ) from None
    except OSError as exc:
        raise ProvisionError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    except asyncssh.Error as exc:
        raise ProvisionError(f"ssh to {where} failed: {exc.reason}") from None


class Remote:
    """One SSH connection (plus SFTP) to a host, with every failure made a ProvisionError."""

    def __init__(
        self,
        target: SshTarget,
        conn: asyncssh.SSHClientConnection,
        sftp: asyncssh.SFTPClient,
        command_timeout: float,
    ) -> None:
        self.target = target
        self.conn = conn
        self.sftp = sftp
        self._timeout = command_timeout

    @property
    def host(self) -> str:
        return self.target.host_port

    async def run(self, command: str) -> asyncssh.SSHCompletedProcess:
        try:
            return await self.conn.run(
                command, check=False, timeout=self._timeout, stdin=asyncssh.DEVNULL
            )
        except TimeoutError:
            head = command.split(maxsplit=1)[0]
            raise ProvisionError(
                f"{self.host}: '{head}' did not finish in {self._timeout:g}s"
            ) from None
        except asyncssh.Error as exc:
            raise ProvisionError(f"{self.host}: running a command failed: {exc.reason}") from None
        except OSError as exc:
            raise ProvisionError(f"{self.host}: connection lost: {exc.strerror or exc}") from None

    async def has_command(self, name: str) -> bool:
        res = await self.run(f"command -v {shlex.quote(name)} >/dev/null 2>&1")
        return res.exit_status == 0

    async def _sftp(self, what: str, path: str, coro: object) -> object:
        assert asyncio.iscoroutine(coro)
        try:
            return await coro
        except asyncssh.SFTPError as exc:
            raise ProvisionError(f"{self.host}: cannot {what} {path}: {exc.reason}") from None
        except asyncssh.Error as exc:
            raise ProvisionError(f"{self.host}: cannot {what} {path}: {exc.reason}") from None
        except OSError as exc:
            raise ProvisionError(
                f"{self.host}: cannot {what} {path}: {exc.strerror or exc}"
            ) from None

    async def exists(self, path: str) -> bool:
        return bool(await self._sftp("check", path, self.sftp.exists(path)))

    async def read(self, path: str) -> bytes:
        async def go() -> bytes:
            async with self.sftp.open(path, "rb") as fh:
                data: bytes | str = await fh.read(MAX_REMOTE_READ + 1)
            return data if isinstance(data, bytes) else data.encode()

        data = await self._sftp("read", path, go())
        assert isinstance(data, bytes)
        if len(data) > MAX_REMOTE_READ:
            raise ProvisionError(f"{self.host}: {path} is larger than {MAX_REMOTE_READ} bytes")
        return data

    async def write(self, path: str, data: bytes, mode: int) -> None:
        async def go() -> None:
            attrs = asyncssh.SFTPAttrs(permissions=mode)
            async with self.sftp.open(path, "wb", attrs) as fh:
                await fh.write(data)
                with contextlib.suppress(asyncssh.SFTPOpUnsupported):
                    await fh.fsync()
            # The server's umask may have narrowed or an old file kept its mode.
            await self.sftp.chmod(path, mode)

        await self._sftp("write", path, go())

    async def chmod(self, path: str, mode: int) -> None:
        await self._sftp("chmod", path, self.sftp.chmod(path, mode))

    async def mkdir(self, path: str, mode: int) -> None:
        attrs = asyncssh.SFTPAttrs(permissions=mode)
        await self._sftp("create directory", path, self.sftp.mkdir(path, attrs))
        await self.chmod(path, mode)

    async def rename(self, src: str, dst: str) -> None:
        await self._sftp("rename into", dst, self.sftp.posix_rename(src, dst))

    async def link(self, src: str, dst: str) -> bool:
        """Hard link; False when the server lacks the extension."""
        try:
            await self.sftp.link(src, dst)
        except asyncssh.SFTPOpUnsupported:
            return False
        except (asyncssh.Error, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise ProvisionError(f"{self.host}: cannot keep a copy of {src}: {reason}") from None
        return True

    async def remove(self, path: str) -> None:
        await self._sftp("remove", path, self.sftp.remove(path))

    async def rmtree(self, path: str) -> None:
        await self._sftp("remove", path, self.sftp.rmtree(path))


@contextlib.asynccontextmanager
async def ssh_session(target: SshTarget, options: SshOptions) -> AsyncIterator[Remote]:
    """Connect (via ``options.jump`` if given), verify the host key, open SFTP."""
    known = read_known_hosts(options.known_hosts)
    jump_conn: asyncssh.SSHClientConnection | None = None
    conn: asyncssh.SSHClientConnection | None = None
    try:
        if options.jump is not None:
            jump_conn = await _open(options.jump, options, known, None)
        conn = await _open(target, options, known, jump_conn)
        try:
            sftp = await conn.start_sftp_client()
        except (asyncssh.Error, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise ProvisionError(
                f"{target.host_port} offers no SFTP ({reason}): enable 'Subsystem sftp' in sshd"
            ) from None
        async with sftp:
            yield Remote(target, conn, sftp, options.command_timeout)
    finally:
        for c in (conn, jump_conn):
            if c is not None:
                c.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.wait_closed(), 5)
