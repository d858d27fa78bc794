"""What the PKI directory operations return (see ``vpnd.pki.pkidir.PkiDir``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from vpnd.pki.identity import IPNetwork
from vpnd.pki.inventory import CertRecord
from vpnd.pki.keys import certificate_pem


@dataclass(frozen=True, slots=True)
class CaCreated:
    """Result of ``PkiDir.init_ca``."""

    name: str
    fingerprint: str
    networks: tuple[IPNetwork, ...]
    not_after: dt.datetime
    key_type: str
    encrypted: bool
    """Whether ca.key was written encrypted."""
    files: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class Issued:
    """Result of ``PkiDir.issue`` and ``PkiDir.sign_csr``."""

    record: CertRecord
    """What the inventory now holds for the new certificate."""
    certificate: x509.Certificate
    files: tuple[Path, ...]
    """Files written (empty when sign_csr was asked not to write one)."""
    warnings: tuple[str, ...] = ()
    """Things the admin should know, e.g. the lifetime was capped to the CA's expiry."""

    @property
    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)


@dataclass(frozen=True, slots=True)
class CrlSigned:
    """A freshly signed CRL."""

    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked_count: int
    path: Path


@dataclass(frozen=True, slots=True)
class Revocation:
    """Result of ``PkiDir.revoke``."""

    revoked: tuple[CertRecord, ...]
    """Certificates revoked by this call (records updated)."""
    already_revoked: tuple[CertRecord, ...]
    """Certificates asked for that were revoked before; nothing changed for them."""
    crl: CrlSigned | None
    """The re-signed CRL, or None when nothing new was revoked."""


@dataclass(frozen=True, slots=True)
class ListedCertificate:
    """An inventory record with its status at listing time."""

    record: CertRecord
    status: str
    """``valid``, ``superseded``, ``expired`` or ``revoked``."""
    days_left: int
    """Whole days until not_after (negative once expired)."""
    renews_at: dt.datetime | None = None
    """When the client renews it (about 2/3 of its lifetime): only for the valid, current
    certificate of a name; None for any other."""
