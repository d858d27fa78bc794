"""Provisioning a peer over SSH (asyncssh): the engine behind ``vpnctl enroll`` and ``deploy``.

The private key is made on the host and never leaves it: the host runs ``vpnd keygen``
(or ``openssl req`` when vpnd is not on its PATH) into a fresh staging directory
(0700) under the remote dir; only the CSR comes back. The local CA signs it, and the
certificate, ``ca.pem`` and ``client.yaml`` go up into the same staging directory.
Only then are the files renamed into place, one atomic rename each (an older bundle
stays intact until then; its files are hard-linked aside first so a failed rename can
put them back). Any failure removes the staging directory (and a remote dir this run
created), so the host is left as it was.

Inventory: ``sign_csr`` records the certificate as *undelivered*; it is marked
delivered only after the final renames. A certificate whose upload failed therefore
stays in the inventory marked undelivered (``vpnctl list --json``: ``"delivered":
false``); it is not revoked, because its private key died with the staging directory.

Host keys are always verified against a known_hosts file; there is no way to turn that
off. Every failure is a one-line ``ProvisionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import posixpath
import secrets
import shlex
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncssh
from cryptography import x509

from vpnctl.remote_layout import (
    CA_FILE,
    CLIENT_CONFIG,
    KEY_MODE,
    PUBLIC_MODE,
    REMOTE_DIR_MODE,
    STAGING_DIR_MODE,
    STAGING_PREFIX,
    Layout,
    client_config,
)
from vpnctl.ssh_target import SshTarget
from vpnd.pki.authority import verify_csr
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import CertRecord
from vpnd.pki.keys import certificate_pem, fingerprint
from vpnd.pki.pkidir import PkiDir
from vpnd.pki.results import Issued

CONNECT_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 120.0
MAX_REMOTE_READ = 256 * 1024  # a CSR or certificate; anything larger is not one
DEFAULT_RENEW_WITHIN_DAYS = 30


class ProvisionError(Exception):
    """Provisioning refused or failed; ``str()`` is one actionable line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class PassphraseNeeded(ProvisionError):
    """The identity key is encrypted and no passphrase was given."""


# --- connecting -------------------------------------------------------------------------


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


# --- what a host should get ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerRequest:
    """The certificate and bundle one host should end up with."""

    name: str
    remote_dir: str
    addresses: tuple[IPAddress, ...] = ()
    groups: tuple[str, ...] = ()
    routes: tuple[IPNetwork, ...] = ()
    days: int | None = None
    gateway_address: str | None = None
    server_name: str | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.remote_dir, self.name)

    def config_bytes(self) -> bytes | None:
        if self.gateway_address is None or self.server_name is None:
            return None
        return client_config(self.layout, self.gateway_address, self.server_name)


@dataclass(frozen=True, slots=True)
class Delivered:
    """A bundle now in place on the host."""

    record: CertRecord
    keygen: str
    """``vpnd keygen`` or ``openssl``: what made the key on the host."""
    files: tuple[str, ...]
    warnings: tuple[str, ...] = ()


@dataclass
class _Stage:
    path: str
    created_dir: str | None
    """The topmost directory this run created (removed again on failure)."""
    issued_serial: int | None = None
    cleanup_problems: list[str] = field(default_factory=list)


async def _ensure_dir(remote: Remote, path: str) -> str | None:
    missing: list[str] = []
    current = path
    while current not in ("/", "") and not await remote.exists(current):
        missing.append(current)
        current = posixpath.dirname(current)
    for directory in reversed(missing):
        await remote.mkdir(directory, REMOTE_DIR_MODE)
    return missing[-1] if missing else None


async def _keygen(remote: Remote, layout: Layout, stage: str) -> str:
    key = shlex.quote(posixpath.join(stage, layout.key_name))
    csr = shlex.quote(posixpath.join(stage, layout.csr_name))
    if await remote.has_command("vpnd"):
        tool = "vpnd keygen"
        command = f"vpnd keygen --name {shlex.quote(layout.name)} --out-key {key} --out-csr {csr}"
    elif await remote.has_command("openssl"):
        tool = "openssl"
        subject = shlex.quote(f"/CN={layout.name}")
        command = (
            "umask 077 && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
            f"-nodes -keyout {key} -subj {subject} -out {csr}"
        )
    else:
        raise ProvisionError(
            f"{remote.host} has neither vpnd nor openssl on its PATH: install vpnd there"
        )
    res = await remote.run(command)
    if res.exit_status != 0:
        text = str(res.stderr or res.stdout or "").strip().splitlines()
        why = text[-1] if text else f"exit status {res.exit_status}"
        raise ProvisionError(f"{remote.host}: remote key generation ({tool}) failed: {why}")
    return tool


def _parse_csr(data: bytes, host: str, name: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise ProvisionError(f"{host}: the CSR made on the host is not a PEM CSR") from None
    cn, _ = verify_csr(csr)
    if cn != name:
        raise ProvisionError(f"{host}: the CSR made on the host names {cn!r}, not {name!r}")
    return csr


async def _install(remote: Remote, stage: str, remote_dir: str, names: Sequence[str]) -> None:
    """Rename staged files into place; on failure put back what was there before."""
    kept: dict[str, str] = {}
    for name in names:
        dst = posixpath.join(remote_dir, name)
        if await remote.exists(dst):
            backup = posixpath.join(stage, f".old.{name}")
            if await remote.link(dst, backup):
                kept[name] = backup
    done: list[str] = []
    try:
        for name in names:
            await remote.rename(posixpath.join(stage, name), posixpath.join(remote_dir, name))
            done.append(name)
    except BaseException:
        for name in reversed(done):
            dst = posixpath.join(remote_dir, name)
            with contextlib.suppress(ProvisionError):
                if name in kept:
                    await remote.rename(kept[name], dst)
                else:
                    await remote.remove(dst)
        raise


async def enroll(
    remote: Remote,
    request: PeerRequest,
    pki: PkiDir,
    *,
    sign_lock: asyncio.Lock | None = None,
) -> Delivered:
    """Provision ``request`` on ``remote``: key made there, CSR signed here, bundle
    uploaded and renamed into place, inventory marked delivered."""
    layout = request.layout
    config = request.config_bytes()  # a bad gateway address fails before anything remote
    ca_pem = certificate_pem(pki.ca_certificate())
    names = layout.bundle(with_config=config is not None)

    created = await _ensure_dir(remote, request.remote_dir)
    stage = _Stage(
        path=posixpath.join(request.remote_dir, STAGING_PREFIX + secrets.token_hex(6)),
        created_dir=created,
    )
    try:
        await remote.mkdir(stage.path, STAGING_DIR_MODE)
        tool = await _keygen(remote, layout, stage.path)
        csr = _parse_csr(
            await remote.read(posixpath.join(stage.path, layout.csr_name)),
            remote.host,
            request.name,
        )
        issued = await _sign(pki, csr, request, sign_lock)
        stage.issued_serial = issued.record.serial
        uploads = [
            (layout.cert_name, issued.certificate_pem),
            (CA_FILE, ca_pem),
        ]
        if config is not None:
            uploads.append((CLIENT_CONFIG, config))
        for name, data in uploads:
            await remote.write(posixpath.join(stage.path, name), data, PUBLIC_MODE)
        await remote.chmod(posixpath.join(stage.path, layout.key_name), KEY_MODE)
        await _install(remote, stage.path, request.remote_dir, names)
    except BaseException as exc:
        await _undo(remote, stage)
        if not isinstance(exc, ProvisionError | PkiError):
            raise
        notes = [str(exc)]
        if stage.issued_serial is not None:
            notes.append(
                f"certificate serial {stage.issued_serial:x} stays in the inventory "
                "marked undelivered"
            )
        notes += stage.cleanup_problems
        if len(notes) == 1:
            raise
        raise ProvisionError("; ".join(notes)) from None
    warnings: list[str] = []
    try:
        await remote.rmtree(stage.path)
    except ProvisionError as exc:
        warnings.append(f"{exc} (only the CSR and old files are left there; remove it)")
    await asyncio.to_thread(pki.mark_delivered, issued.record.serial)
    record = replace(issued.record, delivered=True)
    return Delivered(
        record=record,
        keygen=tool,
        files=tuple(layout.path(n) for n in names),
        warnings=(*issued.warnings, *warnings),
    )


async def _sign(
    pki: PkiDir,
    csr: x509.CertificateSigningRequest,
    request: PeerRequest,
    lock: asyncio.Lock | None,
) -> Issued:
    def sign() -> Issued:
        return pki.sign_csr(
            csr,
            out_path=None,
            role=Role.PEER,
            addresses=request.addresses,
            groups=request.groups,
            routes=request.routes,
            days=request.days,
            # The admin named this host in the request: re-enrolling it is a renewal.
            replace=True,
        )

    # The inventory serialises writers itself; the lock just keeps threads few.
    async with lock or asyncio.Lock():
        return await asyncio.to_thread(sign)


async def _undo(remote: Remote, stage: _Stage) -> None:
    """Best effort: the staging dir (with the fresh key) and any dir this run made."""
    for path in (stage.path, stage.created_dir):
        if path is None:
            continue
        try:
            if await remote.exists(path):
                await remote.rmtree(path)
        except (ProvisionError, asyncssh.Error, OSError):
            stage.cleanup_problems.append(f"could not remove {path} on {remote.host}")


# --- inspecting a host (deploy) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inspection:
    """What a host holds now, judged against the inventory and the request."""

    action: str
    """``enroll`` (nothing of ours there), ``renew``, ``keep`` or ``refuse``."""
    reason: str
    record: CertRecord | None = None


async def inspect(
    remote: Remote, request: PeerRequest, pki: PkiDir, *, renew_within_days: int
) -> Inspection:
    """Decide what to do with a host, reading only public files (never the key)."""
    layout = request.layout
    cert_path = layout.path(layout.cert_name)
    if not await remote.exists(cert_path):
        return Inspection("enroll", f"no {layout.cert_name} on the host")
    try:
        cert = x509.load_pem_x509_certificate(await remote.read(cert_path))
    except ValueError:
        return Inspection("enroll", f"{cert_path} is not a PEM certificate")
    fp = fingerprint(cert)
    listed = await asyncio.to_thread(pki.list_certificates)
    match = next((c for c in listed if c.record.fingerprint == fp), None)
    if match is None:
        return Inspection("enroll", "its certificate is not in this CA's inventory")
    record = match.record
    if match.status == "revoked":
        return Inspection(
            "refuse",
            f"its certificate serial {record.serial_hex} is revoked; re-enroll it on purpose "
            "with 'vpnctl enroll' or drop it from the hosts file",
            record,
        )
    now = pki.now()
    if record.not_after - now <= dt.timedelta(days=renew_within_days):
        if now >= record.not_after:
            return Inspection("renew", "expired", record)
        return Inspection("renew", f"expires in {match.days_left} days", record)
    if not await remote.exists(layout.path(layout.key_name)):
        return Inspection("renew", f"{layout.key_name} is missing", record)
    if request.addresses and set(request.addresses) != set(record.addresses):
        return Inspection("renew", "addresses differ from the hosts file", record)
    if set(request.groups) != set(record.groups):
        return Inspection("renew", "groups differ from the hosts file", record)
    expected = [(CA_FILE, certificate_pem(pki.ca_certificate()))]
    config = request.config_bytes()
    if config is not None:
        expected.append((CLIENT_CONFIG, config))
    for name, data in expected:
        path = layout.path(name)
        if not await remote.exists(path) or await remote.read(path) != data:
            return Inspection("renew", f"{name} is missing or out of date", record)
    return Inspection("keep", f"valid for {match.days_left} more days", record)


# --- restarting the client service --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restarted:
    ok: bool
    message: str


async def restart_service(remote: Remote, unit: str) -> Restarted:
    """``systemctl restart UNIT`` then ``is-active``; best effort without systemd."""
    q = shlex.quote(unit)
    if not await remote.has_command("systemctl"):
        return Restarted(False, f"{remote.host} has no systemctl: start the client there yourself")
    res = await remote.run(f"systemctl restart {q}")
    if res.exit_status != 0:
        why = str(res.stderr or "").strip().splitlines()
        return Restarted(
            False, f"systemctl restart {unit} failed: {why[-1] if why else res.exit_status}"
        )
    state = await remote.run(f"systemctl is-active {q}")
    text = str(state.stdout or "").strip() or "unknown"
    if state.exit_status == 0:
        return Restarted(True, f"{unit} restarted: {text}")
    return Restarted(False, f"{unit} did not come up: systemctl is-active says {text}")
