"""Certificate revocation lists: build (CA side) and load (gateway side).

Revocation is keyed by (issuer, serial). Checking a chain against CRLs lives in
``vpnd.pki.verify``; ``crl_problem`` here says whether one CRL is usable at all.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

from vpnd.pki.authority import (
    MAX_SERIAL,
    authority_key_identifier,
    check_ca_pair,
    signature_hash,
)
from vpnd.pki.extensions import all_extensions, get_extension, get_extension_or_none
from vpnd.pki.identity import PkiError
from vpnd.pki.keys import MAX_FILE_BYTES, PrivateKey
from vpnd.pki.strength import weak_signature

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "caCompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
# CRL extensions we understand; any other critical one makes the CRL unusable.
_KNOWN_CRL_EXTENSIONS = {ExtensionOID.CRL_NUMBER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate of this CA."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags | None = None


def _utc(when: dt.datetime, what: str) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise PkiError(f"{what} must be a timezone-aware datetime")
    return when.astimezone(dt.UTC).replace(microsecond=0)


def build_crl(
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked: Sequence[RevokedEntry],
    crl_number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA, carrying CRLNumber and AKI."""
    check_ca_pair(ca_cert, ca_key)
    this, nxt = _utc(this_update, "this_update"), _utc(next_update, "next_update")
    if nxt <= this:
        raise PkiError("the CRL's next_update must be later than this_update")
    if not isinstance(crl_number, int) or not 0 <= crl_number <= MAX_SERIAL:
        raise PkiError("the CRL number must be a non-negative integer of at most 159 bits")
    aki = authority_key_identifier(ca_cert, ca_key)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this)
        .next_update(nxt)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(aki, critical=False)
    )
    seen: set[int] = set()
    for entry in revoked:
        if not isinstance(entry.serial, int) or not 0 < entry.serial <= MAX_SERIAL:
            raise PkiError(f"revoked serial {entry.serial!r} is not a valid serial number")
        if entry.serial in seen:
            raise PkiError(f"serial {entry.serial:x} is listed twice")
        seen.add(entry.serial)
        rb = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(_utc(entry.revoked_at, "revoked_at"))
        )
        if entry.reason is not None:
            if entry.reason in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.aa_compromise):
                raise PkiError(f"revocation reason {entry.reason.value} is not supported")
            rb = rb.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(rb.build())
    return builder.sign(ca_key, signature_hash(ca_key))


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crls(path: str | os.PathLike[str]) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (one per CA); PkiError when there is none or one is damaged."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise PkiError(f"{p}: too large for a CRL file")
        data = p.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{p}: no such file (expected a PEM CRL)") from None
    except IsADirectoryError:
        raise PkiError(f"{p}: is a directory, not a CRL file") from None
    except OSError as exc:
        raise PkiError(f"{p}: cannot read CRL: {exc.strerror or exc}") from None
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        if data[:1] == b"\x30":
            try:
                return [x509.load_der_x509_crl(data)]
            except ValueError as exc:
                raise PkiError(f"{p}: not a valid CRL ({exc})") from None
        raise PkiError(f"{p}: holds no PEM CRL ('-----BEGIN X509 CRL-----')")
    crls = []
    for i, block in enumerate(blocks, 1):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as exc:
            raise PkiError(f"{p}: CRL #{i} is damaged ({exc})") from None
    return crls


def _key_usage_allows_crl(issuer: x509.Certificate) -> bool:
    ku = get_extension(issuer, x509.KeyUsage)
    # RFC 5280 6.3.3(f): only a present keyUsage must assert cRLSign.
    return ku is None or bool(ku.crl_sign)


def crl_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> str | None:
    """Why this CRL cannot be trusted as ``issuer``'s CRL, or None if it can."""
    if crl.issuer != issuer.subject:
        return "CRL issuer name does not match"
    return _signature_problem(crl, issuer) or _extension_problem(crl, issuer) or _entry_problem(crl)


def _signature_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> str | None:
    public = issuer.public_key()
    if not isinstance(
        public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    ):
        return "CRL issuer key type is not supported"
    try:
        if not crl.is_signature_valid(public):
            return "CRL signature does not verify with the issuer's key"
    except (UnsupportedAlgorithm, ValueError, TypeError) as exc:
        return f"CRL signature cannot be checked: {exc}"
    weak = weak_signature(crl)
    return f"CRL {weak}" if weak else None


def _extension_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> str | None:
    try:
        if not _key_usage_allows_crl(issuer):
            return "CRL issuer's keyUsage lacks cRLSign"
        extensions = all_extensions(crl)
    except PkiError as exc:
        return f"CRL or issuer has {exc}"
    number = None
    for ext in extensions:
        if ext.oid == ExtensionOID.CRL_NUMBER:
            if ext.critical:
                return "CRLNumber must not be critical"
            number = ext
        elif ext.critical and ext.oid not in _KNOWN_CRL_EXTENSIONS:
            return f"unsupported critical CRL extension {ext.oid.dotted_string}"
    if number is None:
        return "CRL has no CRLNumber"
    if crl.next_update_utc is None:
        return "CRL has no nextUpdate"
    return None


def _entry_problem(crl: x509.CertificateRevocationList) -> str | None:
    try:
        for revoked in crl:
            for ext in revoked.extensions:
                if ext.critical and ext.oid != CRLEntryExtensionOID.CRL_REASON:
                    return f"unsupported critical CRL entry extension {ext.oid.dotted_string}"
    except (ValueError, TypeError) as exc:
        return f"CRL entries are malformed: {exc}"
    return None


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's number, or -1 when it has none (it is then unusable anyway)."""
    number = get_extension_or_none(crl, x509.CRLNumber)
    return -1 if number is None else int(number.crl_number)


def ca_key(ca: x509.Certificate) -> str:
    """A stable key for a CA across re-issues of its certificate: its key identifier.

    ``ski:<hex>`` from the Subject Key Identifier, else ``sha256:<hex>`` of the
    certificate. Used to remember the highest CRL number seen per CA.
    """
    ski = get_extension_or_none(ca, x509.SubjectKeyIdentifier)
    if ski is not None:
        return f"ski:{ski.digest.hex()}"
    return f"sha256:{ca.fingerprint(hashes.SHA256()).hex()}"


@dataclass(frozen=True)
class CrlRollback:
    """A CRL older than one already seen for its CA (a replay of a previous crl.pem)."""

    ca: str
    """The CA's subject, for the operator."""
    key: str
    number: int
    highest: int

    def __str__(self) -> str:
        return (
            f"the CRL of {self.ca!r} has number {self.number}, lower than number "
            f"{self.highest} already seen: an older crl.pem was put back"
        )


def crl_numbers(
    roots: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList]
) -> dict[str, tuple[str, int]]:
    """For each CA that signed one of ``crls``: key -> (CA subject, highest CRL number)."""
    out: dict[str, tuple[str, int]] = {}
    for crl in crls:
        issuer = next(
            (r for r in roots if r.subject == crl.issuer and crl_problem(crl, r) is None), None
        )
        if issuer is None:
            continue
        key = ca_key(issuer)
        number = crl_number(crl)
        if key not in out or out[key][1] < number:
            out[key] = (issuer.subject.rfc4514_string(), number)
    return out


def crl_rollbacks(
    current: dict[str, tuple[str, int]], highest: dict[str, int]
) -> list[CrlRollback]:
    """The CAs whose CRL number in ``current`` is below the ``highest`` one seen."""
    return [
        CrlRollback(subject, key, number, highest[key])
        for key, (subject, number) in current.items()
        if key in highest and number < highest[key]
    ]
