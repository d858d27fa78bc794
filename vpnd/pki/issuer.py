"""The online issuing CA: an intermediate the gateways sign renewals and enrollments with.

The root stays offline with the admin (its key encrypted); ``vpnctl ca issuer`` signs
one intermediate for the gateways. It is name-constrained to (a subset of) the root's
overlay networks and has pathlen 0, so a stolen issuer key can mint peers only inside
the overlay and never another CA; its short lifetime bounds how long such a theft
matters. The root carries pathlen 1: exactly this one level, and the verifier refuses
longer chains (``vpnd.pki.verify.STRICT.max_chain_depth``).

A root from before issuers (pathlen 0) is re-signed with pathlen 1 by
``vpnctl ca upgrade``: same key and name, so every certificate it already issued stays
valid; only ``ca.pem`` must be redistributed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from vpnd.pki.authority import (
    authority_key_identifier,
    ca_extensions,
    ca_networks,
    check_ca_pair,
    ip_constraints,
    signature_hash,
)
from vpnd.pki.extensions import get_extension_or_none
from vpnd.pki.identity import IPNetwork, PkiError
from vpnd.pki.keys import (
    PrivateKey,
    certificate_pem,
    fingerprint,
    load_certificates,
    load_private_key,
)
from vpnd.pki.names import canonical_name

DEFAULT_ISSUER_DAYS = 90
"""Short on purpose: the issuer key sits on an online machine."""
MAX_ISSUER_DAYS = 400


@dataclass(frozen=True)
class Issuer:
    """A loaded issuing CA: what the gateway signs with."""

    cert: x509.Certificate
    key: PrivateKey
    chain_pem: bytes
    """The issuer certificate's PEM: what a leaf presents after itself."""
    fingerprint: str
    """sha256 hex of the issuer certificate (``CertRecord.issuer_fp``)."""

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def name(self) -> str:
        return self.cert.subject.rfc4514_string()


def path_length(cert: x509.Certificate) -> int | None:
    """The CA's pathLenConstraint (None: unlimited); PkiError if it is no CA."""
    bc = get_extension_or_none(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise PkiError("the certificate is not a CA (basicConstraints CA:TRUE missing)")
    return bc.path_length


def allows_issuer(root: x509.Certificate) -> bool:
    """Whether certificates signed by an intermediate of ``root`` can verify."""
    depth = path_length(root)
    return depth is None or depth >= 1


def _networks_within(
    wanted: Sequence[IPNetwork] | None, allowed: tuple[IPNetwork, ...]
) -> tuple[IPNetwork, ...]:
    if not wanted:
        return allowed
    out: list[IPNetwork] = []
    for net in wanted:
        if not any(net.version == a.version and net.subnet_of(a) for a in allowed):  # type: ignore[arg-type]
            shown = ", ".join(str(a) for a in allowed)
            raise PkiError(f"network {net} is outside the root CA's networks ({shown})")
        if net not in out:
            out.append(net)
    return tuple(out)


def create_issuer(
    *,
    root_cert: x509.Certificate,
    root_key: PrivateKey,
    name: str,
    key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    networks: Sequence[IPNetwork] | None = None,
) -> x509.Certificate:
    """Sign an issuing intermediate: pathlen 0, name-constrained to ``networks`` (default:
    all of the root's), never outliving the root."""
    check_ca_pair(root_cert, root_key)
    if not allows_issuer(root_cert):
        raise PkiError(
            "the root CA has pathlen 0 and allows no issuing CA below it: "
            "run 'vpnctl ca upgrade' first (same key and name, certificates stay valid)"
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("an issuing CA key must be ECDSA P-256 or P-384")
    check_ca_pair_key_only(key)
    nets = _networks_within(networks, ca_networks(root_cert))
    nb = not_before.astimezone(dt.UTC).replace(microsecond=0)
    na = not_after.astimezone(dt.UTC).replace(microsecond=0)
    if na <= nb:
        raise PkiError("the issuer's not_after must be later than its not_before")
    if na > root_cert.not_valid_after_utc:
        raise PkiError(
            f"the issuer would outlive the root CA ({root_cert.not_valid_after_utc:%Y-%m-%d}): "
            "shorten --days or renew the root"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, canonical_name(name))])
        )
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
    )
    builder = ca_extensions(builder, key.public_key(), 0)
    builder = (
        builder.add_extension(authority_key_identifier(root_cert, root_key), critical=False)
        .add_extension(ip_constraints(nets), critical=True)
        # Peers only: a gateway certificate minted with a stolen issuer key does not
        # verify for clients (OpenSSL and cryptography apply a CA's EKU to its leaves).
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return builder.sign(root_key, signature_hash(root_key))


def check_ca_pair_key_only(key: PrivateKey) -> None:
    """The same key-type rule as the root (cryptography's verifier refuses others)."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        raise PkiError("an issuing CA key must be ECDSA P-256 or P-384")


def upgrade_root(root_cert: x509.Certificate, root_key: PrivateKey) -> x509.Certificate:
    """Re-sign the root with pathlen 1: same name, key, networks and validity, new serial.

    Everything the old root signed verifies against the new one (same subject and key);
    clients and gateways need the new ca.pem before they accept issuer-signed peers.
    """
    check_ca_pair(root_cert, root_key)
    if root_cert.subject != root_cert.issuer:
        raise PkiError("only a self-signed root CA can be upgraded")
    if allows_issuer(root_cert):
        raise PkiError("the root CA already allows an issuing CA (pathlen >= 1): nothing to do")
    public = root_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # check_ca_pair: EC only
    builder = (
        x509.CertificateBuilder()
        .subject_name(root_cert.subject)
        .issuer_name(root_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(root_cert.not_valid_before_utc)
        .not_valid_after(root_cert.not_valid_after_utc)
    )
    builder = ca_extensions(builder, public, 1)
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
    ).add_extension(ip_constraints(ca_networks(root_cert)), critical=True)
    return builder.sign(root_key, signature_hash(root_key))


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_issuer(cert: x509.Certificate, roots: Sequence[x509.Certificate]) -> x509.Certificate:
    """The root ``cert`` chains to; PkiError unless it is a usable issuer under ``roots``."""
    if path_length(cert) != 0:
        raise PkiError("the issuing CA must have pathlen 0 (made by 'vpnctl ca issuer')")
    ca_networks(cert)  # name-constrained to the overlay, or refused
    for root in roots:
        if signed_by(cert, root):
            if not allows_issuer(root):
                raise PkiError(
                    "the trusted root has pathlen 0, so issuer-signed peers would be refused: "
                    "run 'vpnctl ca upgrade' and install the new ca.pem"
                )
            return root
    raise PkiError("the issuing CA is not signed by any CA in pki.ca")


def load_issuer(
    cert_path: Path,
    key_path: Path,
    *,
    passphrase_file: Path | None = None,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> Issuer:
    """Load and check ``pki.issuer``: key matches, pathlen 0, signed by a trusted root,
    currently valid. PkiError with one line otherwise."""
    passphrase = None
    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise PkiError(f"{passphrase_file}: cannot read: {exc.strerror}") from None
    cert = load_certificates(cert_path)[0]
    key = load_private_key(key_path, passphrase)
    try:
        check_ca_pair(cert, key)
        check_issuer(cert, roots)
    except PkiError as exc:
        raise PkiError(f"pki.issuer {cert_path}: {exc}") from None
    if now >= cert.not_valid_after_utc:
        raise PkiError(
            f"pki.issuer {cert_path} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "sign a new one with 'vpnctl ca issuer'"
        )
    if now < cert.not_valid_before_utc:
        raise PkiError(f"pki.issuer {cert_path} is not valid before {cert.not_valid_before_utc}")
    return Issuer(
        cert=cert, key=key, chain_pem=certificate_pem(cert), fingerprint=fingerprint(cert)
    )


def expiry_forecast(
    issuer: x509.Certificate, *, now: dt.datetime, lifetime_s: float, warn_days: int
) -> str | None:
    """A warning when the issuer expires soon enough to matter, with what happens when.

    Renewed certificates are capped at the issuer's expiry, so renewals start coming out
    shorter ``lifetime`` before it; at expiry no renewal or enrollment is possible.
    """
    not_after = issuer.not_valid_after_utc
    left = not_after - now
    shortening = not_after - dt.timedelta(seconds=lifetime_s)
    horizon = dt.timedelta(days=warn_days) + dt.timedelta(seconds=lifetime_s)
    if left > horizon:
        return None
    if left <= dt.timedelta(0):
        return f"the issuing CA expired at {not_after:%Y-%m-%d %H:%M} UTC: no renewal is possible"
    return (
        f"the issuing CA expires {not_after:%Y-%m-%d %H:%M} UTC (in {left.days} days); "
        f"renewals are shortened from {shortening:%Y-%m-%d} and stop at its expiry: "
        "sign the next one with 'vpnctl ca issuer' and install it on the gateways"
    )
