"""The admin side of the issuing CA: ``vpnctl ca issuer`` and ``vpnctl ca upgrade``.

Both need the offline root key (``PkiDir`` decrypts it with the admin's passphrase).
Files are replaced atomically and together: the issuer's certificate and key never
disagree on disk, and an upgraded ``ca.pem`` keeps the previous one beside it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from vpnd.files.atomic import PRIVATE, PUBLIC
from vpnd.pki.authority import ca_networks
from vpnd.pki.file_set import write_together
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.issue_terms import BACKDATE
from vpnd.pki.issuer import (
    DEFAULT_ISSUER_DAYS,
    MAX_ISSUER_DAYS,
    allows_issuer,
    create_issuer,
    upgrade_root,
)
from vpnd.pki.keys import (
    KEY_TYPES_CA,
    certificate_pem,
    fingerprint,
    generate_key,
    load_certificates,
    private_key_pem,
)
from vpnd.pki.layout import ISSUER_CERT, ISSUER_KEY
from vpnd.pki.pkidir import PkiDir


@dataclass(frozen=True, slots=True)
class IssuerCreated:
    name: str
    fingerprint: str
    serial: int
    networks: tuple[IPNetwork, ...]
    not_after: dt.datetime
    cert_path: Path
    key_path: Path
    replaced: str | None
    """Fingerprint of the issuer this one replaced, if any."""


@dataclass(frozen=True, slots=True)
class RootUpgraded:
    fingerprint: str
    previous_fingerprint: str
    backup: Path


def make_issuer(
    pki: PkiDir,
    *,
    name: str,
    days: int = DEFAULT_ISSUER_DAYS,
    networks: Sequence[IPNetwork] = (),
    key_type: str = KEY_TYPES_CA[0],
    out_dir: Path | None = None,
    replace: bool = False,
) -> IssuerCreated:
    """Sign a new issuing CA and write ``issuer.pem`` + ``issuer.key`` (0600) into ``out_dir``
    (default: the PKI directory)."""
    if not 1 <= days <= MAX_ISSUER_DAYS:
        raise PkiError(f"issuer lifetime must be 1..{MAX_ISSUER_DAYS} days, not {days}")
    if key_type not in KEY_TYPES_CA:
        raise PkiError(f"issuer key type {key_type!r} is not one of {', '.join(KEY_TYPES_CA)}")
    root = pki.ca_certificate()
    if not allows_issuer(root):
        raise PkiError(
            f"the root CA in {pki.path} has pathlen 0 and allows no issuing CA: "
            "run 'vpnctl ca upgrade' first (same key and name; issued certificates stay valid)"
        )
    target = out_dir if out_dir is not None else pki.path
    if not target.is_dir():
        raise PkiError(f"output directory {target} does not exist; create it first")
    cert_path, key_path = target / ISSUER_CERT, target / ISSUER_KEY
    replaced = _existing(cert_path, replace)
    now = pki.now()
    not_after = min(now + dt.timedelta(days=days), root.not_valid_after_utc)
    key = generate_key(key_type)
    cert = create_issuer(
        root_cert=root,
        root_key=pki.signing_key(),
        name=name,
        key=key,
        not_before=now - BACKDATE,
        not_after=not_after,
        networks=networks or None,
    )
    write_together(
        [(key_path, private_key_pem(key), PRIVATE), (cert_path, certificate_pem(cert), PUBLIC)]
    )
    return IssuerCreated(
        name=name,
        fingerprint=fingerprint(cert),
        serial=cert.serial_number,
        networks=ca_networks(cert),
        not_after=cert.not_valid_after_utc,
        cert_path=cert_path,
        key_path=key_path,
        replaced=replaced,
    )


def _existing(cert_path: Path, replace: bool) -> str | None:
    if not cert_path.exists():
        return None
    try:
        old = load_certificates(cert_path)[0]
    except PkiError:
        old = None
    if not replace:
        raise PkiError(
            f"{cert_path} already exists; --replace signs a new issuer (peers renewed by the "
            "old one keep working until their certificates expire, if gateways keep its CRL)"
        )
    return fingerprint(old) if isinstance(old, x509.Certificate) else None


def upgrade_ca(pki: PkiDir) -> RootUpgraded:
    """Re-sign ``ca.pem`` with pathlen 1 (see ``vpnd.pki.issuer.upgrade_root``); the old
    file is kept as ``ca.pem.pathlen0``."""
    old = pki.ca_certificate()
    new = upgrade_root(old, pki.signing_key())
    backup = pki.ca_cert_path.with_name(pki.ca_cert_path.name + ".pathlen0")
    try:
        write_together(
            [
                (backup, certificate_pem(old), PUBLIC),
                (pki.ca_cert_path, certificate_pem(new), PUBLIC),
            ]
        )
    except OSError as exc:
        raise PkiError(f"cannot write {pki.ca_cert_path}: {exc.strerror or exc}") from None
    return RootUpgraded(
        fingerprint=fingerprint(new), previous_fingerprint=fingerprint(old), backup=backup
    )
