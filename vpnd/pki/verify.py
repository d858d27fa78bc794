"""Verify a peer's certificate chain and reduce it to a ``PeerIdentity``.

Two layers:

* the core (``verify_chain``): RFC 5280 / Web PKI path validation by
  ``cryptography.x509.verification`` (chain building, signatures, validity, EKU of the
  verifier kind, name constraints, pathlen), key/signature strength, and revocation of
  every non-root certificate against the trust store's CRLs, matched by
  (issuer name, serial) and only from CRLs signed by that issuer's key;
* the vpnd profile on top (``VerifyOptions.profile``): single-role EKU present, SAN
  present, canonical CN, no CA as leaf, a valid peer-attributes extension, every overlay
  address inside the issuing root's overlay networks.

The core alone is what the x509-limbo conformance suite exercises. Every refusal is a
``VerifyError`` carrying a stable ``Reason``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, Subject, VerificationError

from vpnd.pki.authority import MAX_ADDRESSES, ca_networks
from vpnd.pki.crl import crl_number, crl_problem, load_crls
from vpnd.pki.extensions import all_extensions, get_extension_or_none
from vpnd.pki.identity import (
    IPAddress,
    IPNetwork,
    PeerIdentity,
    PkiError,
    Reason,
    Role,
    VerifyError,
)
from vpnd.pki.keys import fingerprint, load_certificates
from vpnd.pki.names import canonical_dns_name, canonical_name, lineage
from vpnd.pki.profile import generation_of, peer_attributes_of
from vpnd.pki.strength import weak_key, weak_signature

log = logging.getLogger("vpnd.pki")


@dataclass(frozen=True)
class TrustStore:
    """The CAs a verifier trusts and the CRLs it checks revocation against."""

    roots: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    crl_required: bool = True
    """Fail closed when a CA in the chain has no CRL."""
    allow_stale_crl: bool = False
    """Accept a CRL past its nextUpdate (config ``pki.crl_stale: allow``), with a warning."""
    _store: Store = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.roots:
            raise PkiError("the trust store holds no CA certificate")
        try:
            store = Store(list(self.roots))
        except (ValueError, TypeError) as exc:
            raise PkiError(f"cannot build the trust store: {exc}") from None
        object.__setattr__(self, "_store", store)

    @property
    def store(self) -> Store:
        return self._store


@dataclass(frozen=True)
class VerifyOptions:
    """Knobs for the verifier; the defaults are the strict vpnd behaviour."""

    profile: bool = True
    """Apply the vpnd certificate profile on top of path validation and revocation."""
    max_chain_depth: int | None = 1
    """Intermediates allowed between leaf and root, passed to cryptography's PolicyBuilder
    (its default when None). One: the issuing CA of ``vpnctl ca issuer``, nothing deeper."""
    max_sent_certs: int = 8
    """Most certificates a peer may send (leaf + intermediates); more is abuse, not a chain."""


STRICT = VerifyOptions()


def _is_ca(cert: x509.Certificate) -> bool:
    bc = get_extension_or_none(cert, x509.BasicConstraints)
    return bc is not None and bc.ca


def load_trust_store(
    ca_path: str | os.PathLike[str],
    crl_path: str | os.PathLike[str] | None,
    *,
    allow_stale_crl: bool = False,
    crl_required: bool | None = None,
    extra_crls: Sequence[str | os.PathLike[str]] = (),
) -> TrustStore:
    """Load trusted CA certificates (PEM bundle) and, optionally, their CRLs.

    ``crl_required`` defaults to "a CRL file was given": a gateway passes its crl.pem and
    fails closed; a client verifying a gateway has no CRL and checks no revocation.
    CRLs issued by a trusted root must verify with that root's key, else PkiError here
    (a broken crl.pem is refused at load/reload, not discovered one peer at a time).
    """
    roots = load_certificates(ca_path)
    for cert in roots:
        if not _is_ca(cert):
            cn = _common_names(cert)
            raise PkiError(
                f"{ca_path}: certificate {cn or cert.subject.rfc4514_string()!r} is not a CA"
            )
    crls = load_crls(crl_path) if crl_path is not None else []
    # The online issuer's CRL (written by the gateway): checked against the issuer cert
    # in each chain, as every intermediate's CRL is.
    for extra in extra_crls:
        crls += load_crls(extra)
    for crl in crls:
        issuers = [r for r in roots if r.subject == crl.issuer]
        problems = [crl_problem(crl, r) for r in issuers]
        if issuers and all(problems):
            raise PkiError(f"{crl_path}: CRL of {crl.issuer.rfc4514_string()!r}: {problems[0]}")
    return TrustStore(
        roots=tuple(roots),
        crls=tuple(crls),
        crl_required=crl_path is not None if crl_required is None else crl_required,
        allow_stale_crl=allow_stale_crl,
    )


def _common_names(cert: x509.Certificate) -> list[str]:
    try:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError:
        return []


def _parse(item: x509.Certificate | bytes, index: int) -> x509.Certificate:
    if isinstance(item, x509.Certificate):
        return item
    if isinstance(item, bytes | bytearray | memoryview):
        try:
            return x509.load_der_x509_certificate(bytes(item))
        except ValueError as exc:
            what = "leaf" if index == 0 else f"intermediate #{index}"
            raise VerifyError(
                Reason.MALFORMED, f"{what} certificate is not valid DER: {exc}"
            ) from None
    raise VerifyError(Reason.MALFORMED, f"chain item #{index} is a {type(item).__name__}")


def _utc(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None:
        raise PkiError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def _subject_for(server_name: str) -> Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        pass
    try:
        return x509.DNSName(canonical_dns_name(server_name))
    except PkiError as exc:
        raise PkiError(f"server_name: {exc}") from None


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    eku = get_extension_or_none(cert, x509.ExtendedKeyUsage)
    return None if eku is None else list(eku)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    return get_extension_or_none(cert, x509.SubjectAlternativeName)


def _addresses(cert: x509.Certificate) -> tuple[IPAddress, ...]:
    san = _san(cert)
    if san is None:
        return ()
    return tuple(
        v
        for v in san.get_values_for_type(x509.IPAddress)
        if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address)
    )


def _check_profile_leaf(leaf: x509.Certificate, role: Role) -> None:
    """The vpnd profile's checks that need only the leaf (before path building)."""
    try:
        all_extensions(leaf)  # malformed extensions get their own reason, not "absent"
    except PkiError as exc:
        raise VerifyError(Reason.MALFORMED, f"leaf has {exc}") from None
    if _is_ca(leaf):
        raise VerifyError(
            Reason.CA_AS_LEAF, "the leaf certificate is a CA (basicConstraints CA:TRUE)"
        )
    _check_leaf_eku(leaf, role)
    _check_leaf_san(leaf, role)
    _check_leaf_cn(leaf)
    try:
        peer_attributes_of(leaf)
        generation_of(leaf)
    except PkiError as exc:
        raise VerifyError(Reason.BAD_EXTENSION, str(exc)) from None


def _check_leaf_eku(leaf: x509.Certificate, role: Role) -> None:
    eku = _eku(leaf)
    if not eku:
        raise VerifyError(Reason.NO_EKU, "the certificate has no extendedKeyUsage")
    want, other = (
        (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
        if role is Role.PEER
        else (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    want_name = "clientAuth" if role is Role.PEER else "serverAuth"
    if want not in eku:
        raise VerifyError(Reason.WRONG_EKU, f"a {role.value} certificate needs EKU {want_name}")
    # One certificate, one role: a peer must never be able to pose as a gateway.
    if other in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        raise VerifyError(
            Reason.WRONG_EKU, f"a {role.value} certificate must carry only {want_name}"
        )


def _check_leaf_san(leaf: x509.Certificate, role: Role) -> None:
    san = _san(leaf)
    if san is None:
        raise VerifyError(Reason.NO_SAN, "the certificate has no subjectAltName")
    if role is Role.PEER and not _addresses(leaf):
        raise VerifyError(Reason.NO_SAN, "the peer certificate has no iPAddress in its SAN")
    # Issuance never exceeds these; a leaf that does was not made by vpnctl, and each
    # address would become a route and a table entry on the gateway.
    count = len(_addresses(leaf))
    if count > MAX_ADDRESSES:
        raise VerifyError(
            Reason.BAD_EXTENSION, f"the SAN holds {count} addresses (at most {MAX_ADDRESSES})"
        )
    dns_names = san.get_values_for_type(x509.DNSName)
    if len(dns_names) > MAX_ADDRESSES:
        raise VerifyError(
            Reason.BAD_EXTENSION,
            f"the SAN holds {len(dns_names)} DNS names (at most {MAX_ADDRESSES})",
        )
    for dns in dns_names:
        try:
            canonical_dns_name(dns)
        except PkiError as exc:
            raise VerifyError(Reason.BAD_NAME, f"SAN {exc}") from None


def _check_leaf_cn(leaf: x509.Certificate) -> None:
    cns = _common_names(leaf)
    if len(cns) != 1:
        raise VerifyError(
            Reason.BAD_NAME, f"the subject must hold exactly one CN, it holds {len(cns)}"
        )
    try:
        canonical = canonical_name(cns[0])
    except PkiError as exc:
        raise VerifyError(Reason.BAD_NAME, str(exc)) from None
    if canonical != cns[0]:
        raise VerifyError(Reason.BAD_NAME, f"CN {cns[0][:40]!r} is not canonical ({canonical!r})")


def _check_strength(certs: Sequence[x509.Certificate]) -> None:
    for cert in certs:
        problem = weak_key(cert)
        if problem:
            raise VerifyError(Reason.WEAK_KEY, f"{_label(cert)}: {problem}")
        problem = weak_signature(cert)
        if problem:
            raise VerifyError(Reason.WEAK_SIGNATURE, f"{_label(cert)}: {problem}")


def _check_structure(chain: Sequence[x509.Certificate]) -> None:
    """RFC 5280 / CABF rules cryptography's verifier leaves out: positive serials, AKI on
    every non-root, SKI on every CA, a self-consistent root AKI."""
    for cert in chain[:-1]:
        # Revocation is keyed by serial; a zero or negative one is a broken issuer.
        if cert.serial_number <= 0:
            raise VerifyError(Reason.CHAIN_INVALID, f"{_label(cert)} has a non-positive serial")
        # Every vpnd certificate carries an AKI; its absence means a foreign, sloppy issuer.
        if get_extension_or_none(cert, x509.AuthorityKeyIdentifier) is None:
            raise VerifyError(Reason.CHAIN_INVALID, f"{_label(cert)} has no authorityKeyIdentifier")
    for cert in chain[1:]:
        if get_extension_or_none(cert, x509.SubjectKeyIdentifier) is None:
            raise VerifyError(
                Reason.CHAIN_INVALID, f"CA {_label(cert)} has no subjectKeyIdentifier"
            )
    root = chain[-1]
    aki = get_extension_or_none(root, x509.AuthorityKeyIdentifier)
    ski = get_extension_or_none(root, x509.SubjectKeyIdentifier)
    # Only a self-issued anchor must point at itself; an anchored intermediate does not.
    if aki is not None and ski is not None and root.subject == root.issuer:
        if aki.authority_cert_issuer is not None or aki.authority_cert_serial_number is not None:
            raise VerifyError(
                Reason.CHAIN_INVALID, f"root {_label(root)} AKI names an issuer/serial"
            )
        if aki.key_identifier is not None and aki.key_identifier != ski.digest:
            raise VerifyError(
                Reason.CHAIN_INVALID, f"root {_label(root)} AKI does not match its own SKI"
            )


def _label(cert: x509.Certificate) -> str:
    cns = _common_names(cert)
    return f"CN={cns[0][:64]}" if cns else f"serial {cert.serial_number:x}"


def _validity_reason(certs: Sequence[x509.Certificate], now: dt.datetime) -> tuple[Reason, str]:
    for cert in certs:
        if now > cert.not_valid_after_utc:
            return (
                Reason.EXPIRED,
                f"{_label(cert)} expired at {cert.not_valid_after_utc.isoformat()}",
            )
        if now < cert.not_valid_before_utc:
            return (
                Reason.NOT_YET_VALID,
                f"{_label(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}",
            )
    return Reason.CHAIN_INVALID, "a certificate is outside its validity period"


def _addresses_outside(leaf: x509.Certificate, cas: Sequence[x509.Certificate]) -> list[IPAddress]:
    nets: list[IPNetwork] = []
    for ca in cas:
        try:
            nets.extend(ca_networks(ca))
        except PkiError:
            continue
    return [a for a in _addresses(leaf) if not any(a in n for n in nets)]


def _plain_reason(text: str, detail: str) -> VerifyError | None:
    if "signature does not match" in text:
        return VerifyError(Reason.BAD_SIGNATURE, detail)
    if "path length constraint" in text:
        return VerifyError(
            Reason.CHAIN_INVALID,
            f"{detail}: the trusted root allows no CA below it "
            "(pathlen 0; 'vpnctl ca upgrade' re-signs it with pathlen 1)",
        )
    if "no interior errors" in text:
        return VerifyError(Reason.UNKNOWN_CA, "no trusted CA issued this certificate")
    return None


def _map_library_error(
    message: str,
    *,
    leaf: x509.Certificate,
    candidates: Sequence[x509.Certificate],
    trust: TrustStore,
    now: dt.datetime,
    options: VerifyOptions,
) -> VerifyError:
    """Turn cryptography's VerificationError text into a stable Reason."""
    detail = message.removeprefix("validation failed: ")
    detail = detail.split(" (encountered processing", 1)[0]
    text = detail.lower()
    if "not valid at validation time" in text:
        reason, why = _validity_reason(candidates, now)
        return VerifyError(reason, why)
    if "required eku not found" in text:
        return VerifyError(Reason.WRONG_EKU, detail)
    if "no matching subjectaltname" in text:
        return VerifyError(Reason.NAME_MISMATCH, detail)
    if "name constraint" in text:
        outside = _addresses_outside(leaf, [*trust.roots, *candidates[1:]])
        if options.profile and outside:
            shown = ", ".join(str(a) for a in outside)
            return VerifyError(
                Reason.ADDRESS_OUTSIDE_NETWORK, f"address {shown} is outside the CA's networks"
            )
        return VerifyError(Reason.NAME_CONSTRAINTS, detail)
    simple = _plain_reason(text, detail)
    if simple is not None:
        return simple
    if "forbidden public key algorithm" in text or "rsa key is too weak" in text:
        named = [f"{_label(c)}: {p}" for c in candidates if (p := weak_key(c))]
        return VerifyError(Reason.WEAK_KEY, named[0] if named else detail[:200])
    if "forbidden signature algorithm" in text:
        named = [f"{_label(c)}: {p}" for c in candidates if (p := weak_signature(c))]
        return VerifyError(Reason.WEAK_SIGNATURE, named[0] if named else detail[:200])
    if "basicconstraints.ca must not be asserted in an ee" in text:
        return VerifyError(Reason.CA_AS_LEAF, detail)
    if "2.5.29.17" in text and "missing required extension" in text:
        return VerifyError(Reason.NO_SAN, detail)
    return VerifyError(Reason.CHAIN_INVALID, detail[:300])


def _revocation_check(
    chain: Sequence[x509.Certificate], trust: TrustStore, now: dt.datetime
) -> None:
    """Every non-root certificate against its issuer's CRL(s)."""
    for cert, issuer in itertools.pairwise(chain):
        crls = [c for c in trust.crls if c.issuer == issuer.subject]
        if not crls:
            if trust.crl_required:
                raise VerifyError(
                    Reason.CRL_MISSING, f"no CRL for issuer {issuer.subject.rfc4514_string()!r}"
                )
            continue
        usable = []
        problems = []
        for crl in crls:
            problem = crl_problem(crl, issuer)
            if problem is None:
                usable.append(crl)
            else:
                problems.append(problem)
        if not usable:
            raise VerifyError(
                Reason.CRL_INVALID,
                f"CRL of {issuer.subject.rfc4514_string()!r}: {problems[0]}",
            )
        for crl in usable:
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise VerifyError(
                    Reason.REVOKED,
                    f"{_label(cert)} serial {cert.serial_number:x} is revoked "
                    f"by {issuer.subject.rfc4514_string()!r}",
                )
        _check_fresh(max(usable, key=crl_number), trust, now)


def _check_fresh(crl: x509.CertificateRevocationList, trust: TrustStore, now: dt.datetime) -> None:
    next_update = crl.next_update_utc
    if next_update is None or next_update >= now:
        return
    issuer = crl.issuer.rfc4514_string()
    if not trust.allow_stale_crl:
        raise VerifyError(
            Reason.CRL_STALE,
            f"CRL of {issuer!r} is stale: its nextUpdate was {next_update.isoformat()}",
        )
    log.warning(
        "accepting a stale CRL of %r (nextUpdate %s, crl_stale: allow): publish a fresh CRL",
        issuer,
        next_update.isoformat(),
    )


def verify_chain(
    chain: Sequence[x509.Certificate | bytes],
    *,
    now: dt.datetime,
    trust: TrustStore,
    role: Role,
    subject: Subject | None = None,
    options: VerifyOptions = STRICT,
) -> list[x509.Certificate]:
    """Validate ``chain`` (leaf first) and return the built path, leaf first, root last.

    ``role`` picks the verifier: PEER uses a client verifier, GATEWAY a server verifier
    for ``subject`` (required then).
    """
    now = _utc(now)
    if not chain:
        raise VerifyError(Reason.NO_CERTIFICATE, "the peer sent no certificate")
    if len(chain) > options.max_sent_certs:
        raise VerifyError(
            Reason.CHAIN_INVALID,
            f"the peer sent {len(chain)} certificates (at most {options.max_sent_certs})",
        )
    certs = [_parse(item, i) for i, item in enumerate(chain)]
    leaf, intermediates = certs[0], certs[1:]
    if options.profile:
        _check_profile_leaf(leaf, role)
    _check_strength([leaf])
    builder = PolicyBuilder().store(trust.store).time(now)
    if options.max_chain_depth is not None:
        builder = builder.max_chain_depth(options.max_chain_depth)
    try:
        if role is Role.PEER:
            built = builder.build_client_verifier().verify(leaf, intermediates).chain
        else:
            if subject is None:
                raise PkiError("verifying a gateway needs the server name it must carry")
            try:
                verifier = builder.build_server_verifier(subject)
            except ValueError as exc:
                raise PkiError(f"invalid server name {subject.value!s:.80}: {exc}") from None
            built = verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _map_library_error(
            str(exc), leaf=leaf, candidates=certs, trust=trust, now=now, options=options
        ) from None
    _check_strength(built)
    _check_structure(built)
    if options.profile:
        root = built[-1]
        try:
            nets = ca_networks(root)
        except PkiError as exc:
            raise VerifyError(
                Reason.ADDRESS_OUTSIDE_NETWORK, f"issuing root {_label(root)}: {exc}"
            ) from None
        outside = [a for a in _addresses(leaf) if not any(a in n for n in nets)]
        if outside:
            shown = ", ".join(str(n) for n in nets)
            raise VerifyError(
                Reason.ADDRESS_OUTSIDE_NETWORK,
                f"address {outside[0]} is outside the issuing CA's networks ({shown})",
            )
    _revocation_check(built, trust, now)
    return list(built)


def verify_peer(
    chain: Sequence[x509.Certificate | bytes],
    *,
    now: dt.datetime,
    role: Role,
    trust: TrustStore,
    server_name: str | None = None,
    options: VerifyOptions = STRICT,
) -> PeerIdentity:
    """Verify a peer's (role PEER) or a gateway's (role GATEWAY) chain; leaf first.

    ``server_name`` is the gateway name the client pinned (DNS name or IP); required
    for GATEWAY, refused for PEER.
    """
    role = Role(role)
    if role is Role.GATEWAY:
        if not server_name:
            raise PkiError("verifying a gateway needs server_name (the pinned gateway name)")
        subject: Subject | None = _subject_for(server_name)
    else:
        if server_name is not None:
            raise PkiError("server_name only applies to verifying a gateway")
        subject = None
    built = verify_chain(chain, now=now, trust=trust, role=role, subject=subject, options=options)
    leaf = built[0]
    cns = _common_names(leaf)
    try:
        attrs = peer_attributes_of(leaf)
        generation = generation_of(leaf)
    except PkiError as exc:
        raise VerifyError(Reason.BAD_EXTENSION, str(exc)) from None
    san = _san(leaf)
    dns_names = tuple(san.get_values_for_type(x509.DNSName)) if san is not None else ()
    return PeerIdentity(
        name=cns[0] if cns else "",
        role=role,
        serial=leaf.serial_number,
        issuer=leaf.issuer.rfc4514_string(),
        fingerprint=fingerprint(leaf),
        addresses=_addresses(leaf),
        routes=attrs.routes,
        groups=frozenset(attrs.groups),
        dns_names=dns_names,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        chain_serials=tuple(
            (cert.issuer.rfc4514_string(), cert.serial_number) for cert in built[:-1]
        ),
        generation=generation,
        lineage=lineage(built[-1].subject),
        root_fingerprint=fingerprint(built[-1]),
    )


def check_revocation(identity: PeerIdentity, trust: TrustStore, *, now: dt.datetime) -> None:
    """Re-check a live session against (newer) CRLs; raise VerifyError if it must end.

    CRLs of a trusted root must verify with that root's key. A CRL of an intermediate
    cannot be re-verified here (the identity keeps no keys): a listed serial still
    counts as revoked, which can only fail closed.
    """
    now = _utc(now)
    roots_by_name: dict[str, list[x509.Certificate]] = {}
    for root in trust.roots:
        roots_by_name.setdefault(root.subject.rfc4514_string(), []).append(root)
    # An identity built without its chain still has its own (issuer, serial) checked.
    pairs = identity.chain_serials or ((identity.issuer, identity.serial),)
    for issuer, serial in pairs:
        crls = [c for c in trust.crls if c.issuer.rfc4514_string() == issuer]
        if not crls:
            if trust.crl_required:
                raise VerifyError(Reason.CRL_MISSING, f"no CRL for issuer {issuer!r}")
            continue
        issuer_roots = roots_by_name.get(issuer, [])
        if issuer_roots:
            usable = [c for c in crls if any(crl_problem(c, r) is None for r in issuer_roots)]
            if not usable:
                problem = crl_problem(crls[0], issuer_roots[0])
                raise VerifyError(Reason.CRL_INVALID, f"CRL of {issuer!r}: {problem}")
        else:
            usable = crls
        for crl in usable:
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                raise VerifyError(Reason.REVOKED, f"serial {serial:x} is revoked by {issuer!r}")
        _check_fresh(max(usable, key=crl_number), trust, now)
