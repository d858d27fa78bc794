"""What ``vpnctl deploy`` should do with a host: enroll, renew, keep or refuse.

Reads only public files on the host (never its key) and judges them against the
inventory and the hosts-file entry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from vpnctl.enroll import PeerRequest
from vpnctl.remote_layout import CA_FILE, CLIENT_CONFIG
from vpnctl.ssh_remote import Remote
from vpnd.pki.inventory import CertRecord
from vpnd.pki.keys import certificate_pem, fingerprint
from vpnd.pki.pkidir import PkiDir
from vpnd.pki.results import ListedCertificate

DEFAULT_RENEW_WITHIN_DAYS = 30


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
    verdict = _judge_certificate(match, pki.now(), renew_within_days)
    if verdict is None:
        verdict = await _judge_bundle(remote, request, pki, match.record)
    return verdict or Inspection("keep", f"valid for {match.days_left} more days", match.record)


def _judge_certificate(
    match: ListedCertificate, now: dt.datetime, renew_within_days: int
) -> Inspection | None:
    """Revoked or (nearly) expired; None when the certificate itself can stay."""
    record = match.record
    if match.status == "revoked":
        return Inspection(
            "refuse",
            f"its certificate serial {record.serial_hex} is revoked; re-enroll it on purpose "
            "with 'vpnctl enroll' or drop it from the hosts file",
            record,
        )
    if record.not_after - now > dt.timedelta(days=renew_within_days):
        return None
    if now >= record.not_after:
        return Inspection("renew", "expired", record)
    return Inspection("renew", f"expires in {match.days_left} days", record)


async def _judge_bundle(
    remote: Remote, request: PeerRequest, pki: PkiDir, record: CertRecord
) -> Inspection | None:
    """The rest of the bundle against the request; None when all of it matches."""
    layout = request.layout
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
    return None
