"""The signed trust bundle a CA rotation pushes to clients over their tunnels.

A JSON document: the body (version, roots, their CRLs, cross certificates) travels as
base64 of its exact bytes, so the signatures cover what was signed and no canonical
JSON form is needed. Each signature names its signer by certificate fingerprint.

A client accepts a bundle only if one signature verifies under a root it already
trusts, or under a root of the bundle that a cross certificate in the bundle, signed by
a root it trusts, vouches for. A version lower than the one it holds is a rollback (an
attacker replaying the bundle from before a retirement would bring back a retired, maybe
compromised, root) and is refused.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from vpnd.pki.crl import crl_pem, crl_problem
from vpnd.pki.identity import PkiError
from vpnd.pki.issuer import signed_by
from vpnd.pki.keys import PrivateKey, certificate_pem, fingerprint
from vpnd.pki.names import lineage

__all__ = ["TrustBundle", "lineage", "parse_bundle", "sign_bundle", "verify_bundle"]

FORMAT = "vpnd-trust/1"
MAX_BYTES = 200 * 1024
"""Fits one TRUST_UPDATE frame; a handful of roots and CRLs need a few KiB."""
MAX_ROOTS = 8
MAX_CROSS = 8
MAX_CRLS = 16
MAX_SIGNATURES = 4
_CONTEXT = b"vpnd trust bundle v1\x00"
"""Domain separation: a bundle signature can never be mistaken for another signature."""


@dataclasses.dataclass(frozen=True)
class TrustBundle:
    version: int
    roots: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    cross: tuple[x509.Certificate, ...]
    issued_at: dt.datetime
    signers: tuple[str, ...]
    """Fingerprints the document names as signers (checked only by verify_bundle)."""
    raw: bytes

    @property
    def root_fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(r) for r in self.roots)


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(_hash_for(key.curve)))


def _hash_for(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA384() if curve.key_size >= 384 else hashes.SHA256()


def _signature_valid(cert: x509.Certificate, data: bytes, sig: bytes) -> bool:
    public = cert.public_key()
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(sig, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, data, ec.ECDSA(_hash_for(public.curve)))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_bundle(
    *,
    version: int,
    roots: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    cross: Sequence[x509.Certificate],
    signers: Sequence[tuple[x509.Certificate, PrivateKey]],
    now: dt.datetime,
) -> TrustBundle:
    """Build and sign a bundle; every signer's certificate must be one of ``roots``."""
    if version < 1:
        raise PkiError("a trust bundle version starts at 1")
    if not roots or not signers:
        raise PkiError("a trust bundle needs at least one root and one signer")
    body = json.dumps(
        {
            "version": version,
            "issued_at": now.astimezone(dt.UTC).isoformat(),
            "roots": [certificate_pem(r).decode() for r in roots],
            "crls": [crl_pem(c).decode() for c in crls],
            "cross": [certificate_pem(c).decode() for c in cross],
        },
        sort_keys=True,
    ).encode()
    signatures = [
        {"by": fingerprint(cert), "sig": base64.b64encode(_sign(key, _CONTEXT + body)).decode()}
        for cert, key in signers
    ]
    doc = {"format": FORMAT, "body": base64.b64encode(body).decode(), "signatures": signatures}
    raw = json.dumps(doc, indent=1).encode() + b"\n"
    return parse_bundle(raw)


def _body_and_signatures(raw: bytes) -> tuple[bytes, dict[str, object], list[tuple[str, bytes]]]:
    if len(raw) > MAX_BYTES:
        raise PkiError(f"trust bundle is {len(raw)} bytes (at most {MAX_BYTES})")
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise PkiError(f"not a {FORMAT} trust bundle")
        body = base64.b64decode(doc["body"], validate=True)
        fields = json.loads(body)
        sigs = doc["signatures"]
        if not isinstance(fields, dict) or not isinstance(sigs, list):
            raise ValueError("unexpected structure")
        if len(sigs) > MAX_SIGNATURES:
            raise ValueError(f"{len(sigs)} signatures (at most {MAX_SIGNATURES})")
        signatures = [(str(s["by"]), base64.b64decode(s["sig"], validate=True)) for s in sigs]
    except PkiError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise PkiError(f"malformed trust bundle: {err}") from None
    return body, fields, signatures


def _pems(fields: dict[str, object], key: str, most: int) -> list[bytes]:
    items = fields.get(key)
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise PkiError(f"malformed trust bundle: {key!r} is not a list of PEM texts")
    if len(items) > most:
        raise PkiError(f"trust bundle holds {len(items)} {key} (at most {most})")
    return [i.encode() for i in items]


def _certs(fields: dict[str, object], key: str, most: int) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificate(p) for p in _pems(fields, key, most))
    except ValueError as err:
        raise PkiError(f"trust bundle: a certificate in {key!r} does not parse: {err}") from None


def parse_bundle(raw: bytes) -> TrustBundle:
    """Parse without checking signatures (that is verify_bundle's job)."""
    _body, fields, signatures = _body_and_signatures(raw)
    version = fields.get("version")
    if type(version) is not int or version < 1:
        raise PkiError("malformed trust bundle: version is not a positive integer")
    try:
        issued_at = dt.datetime.fromisoformat(str(fields.get("issued_at")))
        crls = tuple(x509.load_pem_x509_crl(p) for p in _pems(fields, "crls", MAX_CRLS))
    except ValueError as err:
        raise PkiError(f"malformed trust bundle: {err}") from None
    roots = _certs(fields, "roots", MAX_ROOTS)
    if not roots:
        raise PkiError("malformed trust bundle: it holds no root")
    return TrustBundle(
        version=version,
        roots=roots,
        crls=crls,
        cross=_certs(fields, "cross", MAX_CROSS),
        issued_at=issued_at,
        signers=tuple(by for by, _ in signatures),
        raw=raw,
    )


def _is_root(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca and signed_by(cert, cert)


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _vouched(
    signer: x509.Certificate,
    bundle: TrustBundle,
    trusted: Sequence[x509.Certificate],
    now: dt.datetime,
) -> bool:
    """A cross certificate in the bundle, signed by a trusted root, certifies ``signer``."""
    for cross in bundle.cross:
        if cross.subject != signer.subject or cross.public_key() != signer.public_key():
            continue
        if _valid_at(cross, now) and any(signed_by(cross, t) for t in trusted):
            return True
    return False


def _signer_accepted(
    bundle: TrustBundle,
    signatures: list[tuple[str, bytes]],
    data: bytes,
    trusted: Sequence[x509.Certificate],
    now: dt.datetime,
) -> bool:
    known = {fingerprint(t): t for t in trusted}
    offered = {fingerprint(r): r for r in bundle.roots}
    for by, sig in signatures:
        signer = known.get(by)
        if signer is None and by in offered and _vouched(offered[by], bundle, trusted, now):
            signer = offered[by]
        if signer is not None and _signature_valid(signer, data, sig):
            return True
    return False


def verify_bundle(
    raw: bytes,
    trusted: Sequence[x509.Certificate],
    *,
    current_version: int,
    now: dt.datetime,
) -> TrustBundle:
    """The bundle, if a client trusting ``trusted`` at ``current_version`` may adopt it.

    Raises PkiError with one line. The same version as held is returned (re-ack).
    """
    body, _fields, signatures = _body_and_signatures(raw)
    bundle = parse_bundle(raw)
    now = now.astimezone(dt.UTC)
    if bundle.version < current_version:
        raise PkiError(
            f"trust bundle version {bundle.version} is older than the version held "
            f"({current_version}): refused as a rollback"
        )
    if not _signer_accepted(bundle, signatures, _CONTEXT + body, trusted, now):
        named = ", ".join(s[:16] for s in bundle.signers) or "nobody"
        raise PkiError(
            f"trust bundle version {bundle.version} is not signed by a CA this client "
            f"trusts (signers {named})"
        )
    for root in bundle.roots:
        if not _is_root(root):
            raise PkiError(f"trust bundle: {fingerprint(root)[:16]} is not a self-signed CA")
        if not _valid_at(root, now):
            raise PkiError(f"trust bundle: root {fingerprint(root)[:16]} is not valid now")
    for crl in bundle.crls:
        issuers = [r for r in bundle.roots if r.subject == crl.issuer]
        if not issuers or all(crl_problem(crl, r) for r in issuers):
            raise PkiError(
                f"trust bundle: the CRL of {crl.issuer.rfc4514_string()!r} is not signed "
                "by a root of the bundle"
            )
    return bundle
