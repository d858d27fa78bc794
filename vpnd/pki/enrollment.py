"""Redeeming an invite on the gateway: check it, sign the CSR, record it, in one transaction.

The certificate's terms (name, addresses, groups, routes) come from the inventory's
pending identity, never from the CSR: the CSR contributes its public key only (its
self-signature is checked, its subject and extensions ignored). The invite is marked
used, the certificate recorded and the identity made active inside the same
``Inventory.transaction()``, so a token can never be redeemed twice, even by two
gateways racing on one inventory file.

Blocking (SQLite, signing): the gateway runs ``redeem_invite`` in an executor.
Every refusal is ``EnrollmentRefused`` with a short stable ``code`` and a ``detail`` for
the audit log; neither ever holds the secret.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from vpnd.pki.authority import issue_certificate, verify_csr
from vpnd.pki.enrollment_token import secret_matches
from vpnd.pki.identity import PkiError, Role
from vpnd.pki.inventory import STATE_ACTIVE, STATE_PENDING, IdentityRecord, Inventory, InviteRecord
from vpnd.pki.issue_terms import backdate_for, record_of
from vpnd.pki.keys import PrivateKey, PublicKey, certificate_pem, fingerprint

# What `vpnd enroll` writes into --dir; the gateway's client.yaml names them relative
# to itself, so the directory can be anywhere.
KEY_FILE = "client.key"
CERT_FILE = "client.pem"
CA_FILE = "ca.pem"
CONFIG_FILE = "client.yaml"
ENROLL_FILES = (KEY_FILE, CERT_FILE, CA_FILE, CONFIG_FILE)
CSR_PLACEHOLDER_NAME = "enrollee"
"""The CN of an enrollment CSR: the gateway takes the name from the invite instead."""

CODE_INVALID = "invalid"
CODE_USED = "used"
CODE_EXPIRED = "expired"
CODE_BAD_CSR = "bad_csr"
CODE_UNAVAILABLE = "unavailable"


class EnrollmentRefused(PkiError):
    """An invite that cannot be redeemed. ``code``: invalid | used | expired | bad_csr |
    unavailable; ``name``: the pending identity, when the invite was found."""

    def __init__(self, code: str, detail: str, *, name: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.name = name


class SignerLike(Protocol):
    """``vpnd.pki.issuer.Issuer``: the online issuing intermediate."""

    @property
    def cert(self) -> x509.Certificate: ...
    @property
    def key(self) -> PrivateKey: ...
    @property
    def chain_pem(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Enrolled:
    name: str
    serial: int
    cert_pem: bytes
    """The leaf, then the issuer chain: what the peer presents in its handshake."""
    not_after: dt.datetime
    server: str
    """The gateway address the invite was made for (host:port), for client.yaml."""

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def redeem_invite(
    inventory: Inventory,
    signer: SignerLike,
    *,
    invite_id: str,
    secret: str,
    csr_der: bytes,
    lifetime_s: float,
    now: dt.datetime,
) -> Enrolled:
    """Redeem the invite and issue its certificate, or raise ``EnrollmentRefused``."""
    public_key = _csr_key(csr_der)
    try:
        with inventory.transaction():
            invite = _usable_invite(inventory, invite_id, secret, now)
            identity = inventory.identity(invite.name)
            if identity is None or identity.state != STATE_PENDING:
                state = "missing" if identity is None else identity.state
                raise EnrollmentRefused(
                    CODE_INVALID,
                    f"invite {invite_id} names {invite.name}, whose identity is {state}",
                    name=invite.name,
                )
            cert = _sign(signer, identity, public_key, lifetime_s, now)
            record = record_of(cert, issued_at=now)
            inventory.add(dataclasses.replace(record, issuer_fp=fingerprint(signer.cert)))
            inventory.mark_invite_used(invite_id, now, cert.serial_number)
            inventory.put_identity(_activated(identity, cert.serial_number, now))
    except EnrollmentRefused:
        raise
    except PkiError as err:
        raise EnrollmentRefused(CODE_UNAVAILABLE, f"cannot issue: {err}") from None
    return Enrolled(
        name=identity.name,
        serial=cert.serial_number,
        cert_pem=certificate_pem(cert) + signer.chain_pem,
        not_after=cert.not_valid_after_utc,
        server=invite.server,
    )


def _csr_key(csr_der: bytes) -> PublicKey:
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise EnrollmentRefused(CODE_BAD_CSR, "the CSR is not valid DER") from None
    try:
        _, key = verify_csr(csr)
    except PkiError as err:
        raise EnrollmentRefused(CODE_BAD_CSR, f"the CSR is refused: {err}") from None
    return key


def _usable_invite(store: Inventory, invite_id: str, secret: str, now: dt.datetime) -> InviteRecord:
    invite = store.invite(invite_id)
    # Unknown and wrong secret look the same from outside; only the secret's holder
    # learns that an invite is used or expired.
    if invite is None:
        raise EnrollmentRefused(CODE_INVALID, f"unknown invite {invite_id}")
    if not secret_matches(invite_id, secret, invite.secret_hash):
        raise EnrollmentRefused(
            CODE_INVALID, f"invite {invite_id}: the secret does not match", name=invite.name
        )
    if invite.used_at is not None:
        raise EnrollmentRefused(
            CODE_USED,
            f"invite {invite_id} was already used at {invite.used_at:%Y-%m-%d %H:%M:%S}Z",
            name=invite.name,
        )
    if now >= invite.expires_at:
        raise EnrollmentRefused(
            CODE_EXPIRED,
            f"invite {invite_id} expired at {invite.expires_at:%Y-%m-%d %H:%M:%S}Z",
            name=invite.name,
        )
    return invite


def _sign(
    signer: SignerLike,
    identity: IdentityRecord,
    public_key: PublicKey,
    lifetime_s: float,
    now: dt.datetime,
) -> x509.Certificate:
    if identity.role is not Role.PEER:
        raise EnrollmentRefused(
            CODE_INVALID, f"{identity.name} is not a peer identity", name=identity.name
        )
    not_before = max(now - backdate_for(lifetime_s), signer.cert.not_valid_before_utc)
    not_after = min(now + dt.timedelta(seconds=lifetime_s), signer.cert.not_valid_after_utc)
    if not_after <= now:
        raise EnrollmentRefused(CODE_UNAVAILABLE, "the issuer has expired", name=identity.name)
    return issue_certificate(
        ca_cert=signer.cert,
        ca_key=signer.key,
        name=identity.name,
        public_key=public_key,
        role=Role.PEER,
        addresses=identity.addresses,
        groups=identity.groups,
        routes=identity.routes,
        not_before=not_before,
        not_after=not_after,
        generation=identity.generation,
    )


def _activated(identity: IdentityRecord, serial: int, now: dt.datetime) -> IdentityRecord:
    return dataclasses.replace(identity, state=STATE_ACTIVE, current_serial=serial, updated_at=now)


def enrollment_files(directory: Path) -> list[Path]:
    """The paths ``vpnd enroll`` writes under ``directory``."""
    return [directory / name for name in ENROLL_FILES]
