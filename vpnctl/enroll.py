"""Enrolling one host over SSH: the engine behind ``vpnctl enroll`` (and each host of ``deploy``).

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

Every failure is a one-line ``ProvisionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
from vpnctl.ssh_remote import ProvisionError, Remote
from vpnd.pki.authority import verify_csr
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import CertRecord
from vpnd.pki.keys import certificate_pem
from vpnd.pki.pkidir import PkiDir
from vpnd.pki.results import Issued


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
