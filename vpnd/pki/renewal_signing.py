"""Signing a peer's renewal on the gateway, superseding its old certificate, and the
issuing CA's CRL.

``sign_renewal`` is the whole policy of an in-tunnel renewal: the peer proves who it
is with the certificate its live session presented, and sends a CSR for a new key.
What the new certificate carries (name, addresses, groups, routes) comes only from
the inventory's identity record, never from the CSR: the CSR contributes its public
key and nothing else. The generation goes up by one, and the new certificate and
the identity's new current serial are recorded in one transaction.

``supersede`` runs when the renewed certificate is first used; from then on the old
serial is refused everywhere, by the inventory view and by ``write_issuer_crl``,
which lists every revoked or superseded certificate the issuer signed.

All of it is blocking (SQLite, signing): the gateway runs it in an executor. Refusals
are ``SigningRefused`` with a short stable ``reason`` the gateway sends to the peer and
writes to the audit log; ``str()`` is one line with serials, never key material.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from vpnd.files.atomic import PUBLIC, atomic_write
from vpnd.pki.authority import issue_certificate
from vpnd.pki.crl import REASONS, RevokedEntry, build_crl, crl_pem
from vpnd.pki.identity import PeerIdentity, PkiError, Role
from vpnd.pki.inventory import (
    STATE_ACTIVE,
    CertRecord,
    IdentityRecord,
    Inventory,
    serial_hex,
)
from vpnd.pki.issue_terms import backdate_for, record_of
from vpnd.pki.issuer import Issuer
from vpnd.pki.keys import KEY_TYPES_LEAF, PublicKey, certificate_pem, key_type, public_key_of

MAX_CSR_BYTES = 8 * 1024
"""A vpnd CSR (one CN, one key) is a few hundred bytes; more is not a renewal."""
MIN_LIFETIME_S = 10.0
"""Shortest certificate worth signing (the config's renewal.lifetime minimum too); a
renewal capped below it means the issuer is about to expire."""
CRL_KEEP_EXPIRED = dt.timedelta(days=30)
"""How long an expired revoked/superseded certificate stays listed in the issuer CRL:
longer than any sane quarantine grace, short enough that the CRL does not grow forever
with short-lived renewals."""

# Stable refusal codes (audit log, RENEW_REFUSED message, metrics label).
BAD_CSR = "bad_csr"
KEY_TYPE = "key_type"
NAME_MISMATCH = "name_mismatch"
UNKNOWN_IDENTITY = "unknown_identity"
PENDING_IDENTITY = "pending_identity"
WRONG_ROLE = "wrong_role"
UNKNOWN_CERTIFICATE = "unknown_certificate"
NOT_CURRENT = "not_current"
REVOKED = "revoked"
SUPERSEDED = "superseded"
ISSUER_EXPIRED = "issuer_expired"
BAD_LIFETIME = "bad_lifetime"
TERMS_INVALID = "terms_invalid"
REASON_CODES = (
    BAD_CSR,
    KEY_TYPE,
    NAME_MISMATCH,
    UNKNOWN_IDENTITY,
    PENDING_IDENTITY,
    WRONG_ROLE,
    UNKNOWN_CERTIFICATE,
    NOT_CURRENT,
    REVOKED,
    SUPERSEDED,
    ISSUER_EXPIRED,
    BAD_LIFETIME,
    TERMS_INVALID,
)


class SigningRefused(PkiError):
    """A renewal was refused; ``reason`` is a stable code from ``REASON_CODES``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Signed:
    """A renewed certificate, ready to send: leaf PEM, then the chain after it."""

    cert_pem: bytes
    chain_pem: bytes
    """The issuer's certificate PEM (what the peer presents after its leaf)."""
    serial: int
    generation: int
    not_after: dt.datetime


def _utc(when: dt.datetime) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise PkiError("now must be a timezone-aware datetime")
    return when.astimezone(dt.UTC).replace(microsecond=0)


# --- the CSR ---------------------------------------------------------------------------


def csr_public_key(csr_der: bytes, name: str) -> PublicKey:
    """The CSR's key, after its self-signature and key type are checked; a CN, if any,
    must be ``name``. Everything else the CSR asks for is ignored."""
    if not isinstance(csr_der, bytes | bytearray) or not csr_der:
        raise SigningRefused(BAD_CSR, "empty CSR")
    if len(csr_der) > MAX_CSR_BYTES:
        raise SigningRefused(BAD_CSR, f"CSR of {len(csr_der)} bytes (at most {MAX_CSR_BYTES})")
    try:
        csr = x509.load_der_x509_csr(bytes(csr_der))
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise SigningRefused(BAD_CSR, f"CSR does not parse: {detail}") from None
    except Exception as exc:  # unsupported algorithms surface as various types
        raise SigningRefused(BAD_CSR, f"CSR cannot be checked ({type(exc).__name__})") from None
    if not valid:
        raise SigningRefused(BAD_CSR, "CSR signature is invalid")
    try:
        key = public_key_of(csr)
    except PkiError as exc:
        raise SigningRefused(KEY_TYPE, str(exc)) from None
    if key_type(key) not in KEY_TYPES_LEAF:
        raise SigningRefused(KEY_TYPE, f"key type {key_type(key)} is not allowed for a peer")
    _check_csr_name(csr, name)
    return key


def _check_csr_name(csr: x509.CertificateSigningRequest, name: str) -> None:
    try:
        cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError:
        raise SigningRefused(BAD_CSR, "CSR subject is malformed") from None
    if len(cns) > 1 or (cns and cns[0] != name):
        shown = ", ".join(repr(c[:40]) for c in cns)
        raise SigningRefused(NAME_MISMATCH, f"CSR asks for {shown}, the session is {name!r}")


# --- who may renew ------------------------------------------------------------------------


def _identity_for(inv: Inventory, presented: PeerIdentity) -> IdentityRecord:
    ident = inv.identity(presented.name)
    if ident is None:
        raise SigningRefused(UNKNOWN_IDENTITY, f"{presented.name!r} is not in the inventory")
    if ident.state != STATE_ACTIVE:
        raise SigningRefused(PENDING_IDENTITY, f"{presented.name!r} has not enrolled yet")
    if ident.role is not Role.PEER or presented.role is not Role.PEER:
        raise SigningRefused(WRONG_ROLE, f"{presented.name!r} is not a peer; gateways do not renew")
    return ident


def _presented_record(inv: Inventory, presented: PeerIdentity) -> CertRecord:
    record = inv.get(presented.serial)
    if (
        record is None
        or record.name != presented.name
        or record.fingerprint != presented.fingerprint
    ):
        raise SigningRefused(
            UNKNOWN_CERTIFICATE,
            f"serial {presented.serial_hex} of {presented.name!r} is not in the inventory",
        )
    if record.revoked_at is not None:
        raise SigningRefused(REVOKED, f"serial {record.serial_hex} is revoked")
    if record.superseded_at is not None:
        by = serial_hex(record.superseded_by) if record.superseded_by else "?"
        raise SigningRefused(SUPERSEDED, f"serial {record.serial_hex} was superseded by {by}")
    return record


def _unused_renewal(
    inv: Inventory, ident: IdentityRecord, record: CertRecord, issuer: Issuer
) -> CertRecord | None:
    """The current certificate, when ``record`` is its predecessor and it was never used.

    A renewal can be signed and then lost (the session drops before RENEW_ISSUED
    arrives); the peer then retries with its old certificate. That is allowed exactly
    when the current one came from this issuer as the renewal of ``record`` (one
    generation up) and has not been used (using it supersedes ``record``). The orphan
    is then superseded by the retry's certificate: nobody ever held it.
    """
    if ident.current_serial is None or record.generation != ident.generation - 1:
        return None
    current = inv.get(ident.current_serial)
    if (
        current is None
        or current.issuer_fp != issuer.fingerprint
        or current.generation != ident.generation
        or current.revoked_at is not None
        or current.superseded_at is not None
        or current.issued_at < record.issued_at
    ):
        return None
    return current


def _check_current(
    inv: Inventory, ident: IdentityRecord, record: CertRecord, issuer: Issuer
) -> CertRecord | None:
    """None when ``record`` is current; the orphan to supersede on an allowed retry."""
    if record.serial == ident.current_serial:
        return None
    orphan = _unused_renewal(inv, ident, record, issuer)
    if orphan is None:
        current = serial_hex(ident.current_serial) if ident.current_serial else "none"
        raise SigningRefused(
            NOT_CURRENT,
            f"serial {record.serial_hex} is not the current certificate of "
            f"{ident.name!r} (current: {current})",
        )
    return orphan


# --- signing -----------------------------------------------------------------------------


def _window(issuer: Issuer, now: dt.datetime, lifetime_s: float) -> tuple[dt.datetime, dt.datetime]:
    if not lifetime_s >= MIN_LIFETIME_S:  # also refuses NaN
        raise SigningRefused(BAD_LIFETIME, f"lifetime of {lifetime_s} s is too short")
    issuer_nb, issuer_na = issuer.cert.not_valid_before_utc, issuer.cert.not_valid_after_utc
    if now < issuer_nb:
        raise SigningRefused(ISSUER_EXPIRED, f"the issuing CA is not valid before {issuer_nb}")
    not_after = min(now + dt.timedelta(seconds=lifetime_s), issuer_na)
    if (not_after - now).total_seconds() < MIN_LIFETIME_S:
        raise SigningRefused(
            ISSUER_EXPIRED,
            f"the issuing CA expires {issuer_na:%Y-%m-%d %H:%M} UTC: install a new one",
        )
    return max(now - backdate_for(lifetime_s), issuer_nb), not_after


def _sign(
    issuer: Issuer,
    ident: IdentityRecord,
    key: PublicKey,
    window: tuple[dt.datetime, dt.datetime],
    generation: int,
) -> x509.Certificate:
    try:
        return issue_certificate(
            ca_cert=issuer.cert,
            ca_key=issuer.key,
            name=ident.name,
            public_key=key,
            role=Role.PEER,
            addresses=ident.addresses,
            groups=ident.groups,
            routes=ident.routes,
            not_before=window[0],
            not_after=window[1],
            generation=generation,
        )
    except PkiError as exc:
        raise SigningRefused(TERMS_INVALID, f"{ident.name!r}: {exc}") from None


def sign_renewal(
    inv: Inventory,
    issuer: Issuer,
    *,
    presented: PeerIdentity,
    csr_der: bytes,
    lifetime_s: float,
    now: dt.datetime,
) -> Signed:
    """Sign a renewal for the peer whose verified session certificate is ``presented``.

    Refused (``SigningRefused``) unless the CSR is well signed with an allowed key type,
    the name has an active peer identity, and ``presented`` is that identity's current
    certificate (or its predecessor, when the current one was signed but never used),
    neither revoked nor superseded. The certificate expires after ``lifetime_s`` or at
    the issuer's expiry, whichever is first.
    """
    now = _utc(now)
    key = csr_public_key(csr_der, presented.name)
    window = _window(issuer, now, lifetime_s)
    with inv.transaction():
        ident = _identity_for(inv, presented)
        record = _presented_record(inv, presented)
        orphan = _check_current(inv, ident, record, issuer)
        # A retry replaces the never-used orphan at the same generation: however many
        # answers get lost in a row, the peer can always try again.
        generation = ident.generation + 1 if orphan is None else ident.generation
        cert = _sign(issuer, ident, key, window, generation)
        new = record_of(cert, issued_at=now, issuer_fp=issuer.fingerprint)
        inv.add(new)
        if orphan is not None:
            inv.mark_superseded(orphan.serial, new.serial, now)
        inv.put_identity(
            dataclasses.replace(
                ident, generation=generation, current_serial=new.serial, updated_at=now
            )
        )
    return Signed(
        cert_pem=certificate_pem(cert),
        chain_pem=issuer.chain_pem,
        serial=new.serial,
        generation=generation,
        not_after=cert.not_valid_after_utc,
    )


# --- supersede and the issuer's CRL ---------------------------------------------------------


def supersede(inv: Inventory, *, old_serial: int, new_serial: int, now: dt.datetime) -> bool:
    """Mark ``old_serial`` superseded by ``new_serial`` (a renewal of the same name, now in
    use). True when this call marked it; False when it already was (idempotent).
    PkiError when either serial is unknown or the names differ."""
    now = _utc(now)
    with inv.transaction():
        old = inv.get(old_serial)
        if old is not None and old.superseded_at is not None:
            return False
        inv.mark_superseded(old_serial, new_serial, now)
    return True


def issuer_crl_entries(inv: Inventory, issuer: Issuer, now: dt.datetime) -> list[RevokedEntry]:
    """Revoked and superseded certificates the issuer signed, still worth listing."""
    horizon = _utc(now) - CRL_KEEP_EXPIRED
    by_serial: dict[int, RevokedEntry] = {}
    for record in [*inv.superseded(), *inv.revoked()]:
        if record.issuer_fp != issuer.fingerprint or record.not_after < horizon:
            continue
        by_serial[record.serial] = _entry(record)
    return [by_serial[s] for s in sorted(by_serial)]


def _entry(record: CertRecord) -> RevokedEntry:
    if record.revoked_at is not None:
        reason = REASONS.get(record.revoke_reason) if record.revoke_reason else None
        return RevokedEntry(serial=record.serial, revoked_at=record.revoked_at, reason=reason)
    assert record.superseded_at is not None  # only revoked or superseded records come here
    return RevokedEntry(
        serial=record.serial,
        revoked_at=record.superseded_at,
        reason=x509.ReasonFlags.superseded,
    )


def write_issuer_crl(
    inv: Inventory, issuer: Issuer, path: Path, *, now: dt.datetime, days: int
) -> None:
    """Sign the issuer's CRL (revoked + superseded serials it signed) and write it to
    ``path`` atomically (0644). The CRLNumber is the inventory's issuer counter, raised
    in the same transaction: if writing fails, the number is not consumed."""
    now = _utc(now)
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise PkiError(f"CRL validity must be a positive number of days, not {days!r}")
    with inv.transaction():
        entries = issuer_crl_entries(inv, issuer, now)
        number = inv.next_issuer_crl_number()
        crl = build_crl(
            ca_cert=issuer.cert,
            ca_key=issuer.key,
            revoked=entries,
            crl_number=number,
            this_update=now,
            next_update=now + dt.timedelta(days=days),
        )
        try:
            atomic_write(path, crl_pem(crl), PUBLIC)
        except OSError as exc:
            raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from None
