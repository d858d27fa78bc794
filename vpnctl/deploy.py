"""``vpnctl deploy``: provision many hosts, a bounded number at a time, idempotently.

Each host is inspected first (its public certificate, never its key, against the
inventory): nothing of ours there -> enrolled; expiring within the window, or its
groups/addresses/CA/client config differ from the hosts file -> renewed with a new
key; otherwise unchanged. A host whose certificate was revoked is refused rather than
silently re-enrolled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vpnctl import render
from vpnctl.enroll import PeerRequest, enroll, restart_service
from vpnctl.host_inspection import inspect
from vpnctl.hosts_file import HostEntry
from vpnctl.remote_layout import LayoutError
from vpnctl.ssh_remote import ProvisionError, SshOptions, ssh_session
from vpnd.pki.identity import PkiError
from vpnd.pki.pkidir import PkiDir

ENROLLED = "enrolled"
RENEWED = "renewed"
UNCHANGED = "unchanged"
FAILED = "failed"
TABLE_COLUMNS = ("NAME", "TARGET", "RESULT")


@dataclass(frozen=True, slots=True)
class HostResult:
    """The outcome for one host, one row of the final table."""

    name: str
    target: str
    result: str
    """enrolled, renewed, unchanged or failed; with --dry-run: would enroll, would renew."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result != FAILED

    @property
    def cell(self) -> str:
        return f"{self.result}: {self.detail}" if self.detail else self.result


def request_for(entry: HostEntry) -> PeerRequest:
    return PeerRequest(
        name=entry.name,
        remote_dir=entry.remote_dir,
        addresses=entry.addresses,
        groups=entry.groups,
        gateway_address=entry.gateway_address,
        server_name=entry.server_name,
    )


async def deploy_hosts(
    hosts: Sequence[HostEntry],
    *,
    pki: PkiDir,
    options_for: Callable[[HostEntry], SshOptions],
    concurrency: int,
    renew_within_days: int,
    dry_run: bool = False,
    restart_unit: str | None = None,
    on_done: Callable[[HostResult], None] | None = None,
) -> list[HostResult]:
    """Provision every host, at most ``concurrency`` SSH sessions at once; results in the
    order of ``hosts``. Never raises for a single host's failure."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)
    sign_lock = asyncio.Lock()

    async def one(entry: HostEntry) -> HostResult:
        async with gate:
            try:
                result = await _provision(
                    entry,
                    pki=pki,
                    options=options_for(entry),
                    renew_within_days=renew_within_days,
                    dry_run=dry_run,
                    restart_unit=restart_unit,
                    sign_lock=sign_lock,
                )
            except (ProvisionError, PkiError, LayoutError) as exc:
                result = HostResult(entry.name, str(entry.ssh), FAILED, _one_line(str(exc)))
            except Exception as exc:  # one host's surprise must not sink the others
                detail = f"unexpected {type(exc).__name__}: {_one_line(str(exc))}"
                result = HostResult(entry.name, str(entry.ssh), FAILED, detail)
        if on_done is not None:
            on_done(result)
        return result

    return list(await asyncio.gather(*(one(h) for h in hosts)))


async def _provision(
    entry: HostEntry,
    *,
    pki: PkiDir,
    options: SshOptions,
    renew_within_days: int,
    dry_run: bool,
    restart_unit: str | None,
    sign_lock: asyncio.Lock,
) -> HostResult:
    target = str(entry.ssh)
    request = request_for(entry)
    async with ssh_session(entry.ssh, options) as remote:
        verdict = await inspect(remote, request, pki, renew_within_days=renew_within_days)
        if verdict.action == "refuse":
            return HostResult(entry.name, target, FAILED, verdict.reason)
        if verdict.action == "keep":
            return HostResult(entry.name, target, UNCHANGED, verdict.reason)
        outcome = ENROLLED if verdict.action == "enroll" else RENEWED
        if dry_run:
            return HostResult(entry.name, target, f"would {verdict.action}", verdict.reason)
        done = await enroll(remote, request, pki, sign_lock=sign_lock)
        detail = f"serial {done.record.serial_hex}"
        if outcome == RENEWED:
            detail += f" ({verdict.reason})"
        if done.warnings:
            detail += "; " + "; ".join(done.warnings)
        if restart_unit is not None:
            restarted = await restart_service(remote, restart_unit)
            if not restarted.ok:
                return HostResult(
                    entry.name, target, FAILED, f"{outcome} {detail}, but {restarted.message}"
                )
            detail += f"; {restarted.message}"
        return HostResult(entry.name, target, outcome, detail)


def results_table(results: Sequence[HostResult]) -> str:
    return render.table(TABLE_COLUMNS, [(r.name, r.target, r.cell) for r in results])


def _one_line(text: str) -> str:
    return " ".join(text.split())
