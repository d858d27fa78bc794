"""A PKI directory and the admin operations on it: the engine behind ``vpnctl``.

It orchestrates; the rules live by job: the files it keeps in ``vpnd.pki.layout``,
what a certificate may carry in ``vpnd.pki.issue_terms``, the address leases in
``vpnd.pki.leases``, all-or-nothing file sets in ``vpnd.pki.file_set``, and what it
returns in ``vpnd.pki.results``.

Atomicity: address allocation, signing, writing the files and recording happen inside
one ``BEGIN IMMEDIATE`` inventory transaction. Files are written before the commit, so
the inventory never records a certificate that was not produced; if writing fails
the transaction rolls back and no file of the set is replaced.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cryptography import x509

from vpnd.files.atomic import PRIVATE, PUBLIC, atomic_write
from vpnd.pki.authority import ca_networks, create_ca, issue_certificate, verify_csr
from vpnd.pki.crl import REASONS, RevokedEntry, build_crl, crl_pem
from vpnd.pki.file_set import write_together
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory import Inventory, serial_hex
from vpnd.pki.issue_terms import (
    BACKDATE,
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    certificate_terms,
    identity_of,
    next_generation,
    next_renewal,
    positive_days,
    record_of,
    refuse_name_collision,
    validity,
)
from vpnd.pki.keys import (
    KEY_TYPES_CA,
    KEY_TYPES_LEAF,
    PrivateKey,
    PublicKey,
    certificate_pem,
    fingerprint,
    generate_key,
    load_certificate,
    load_private_key,
    private_key_pem,
)
from vpnd.pki.layout import CA_CERT, CA_KEY, PkiLayout
from vpnd.pki.leases import check_in_networks, choose_addresses
from vpnd.pki.names import canonical_name
from vpnd.pki.profile import describe_certificate
from vpnd.pki.results import CaCreated, CrlSigned, Issued, ListedCertificate, Revocation

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PkiDir:
    """High-level PKI operations on one directory. Every refusal is a ``PkiError``.

    ``passphrase`` is the CA key's passphrase: used to encrypt the key in
    :meth:`init_ca` and to decrypt it for every signing operation. ``clock`` returns
    an aware UTC datetime; tests pass a stepped one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: bytes | None = None,
        clock: Clock = utc_now,
    ) -> None:
        if passphrase is not None and not passphrase:
            raise PkiError("the CA passphrase is empty")
        self.path = Path(path)
        self.layout = PkiLayout(self.path)
        self._passphrase = passphrase
        self._clock = clock

    # --- paths and state ---------------------------------------------------------------

    @property
    def ca_cert_path(self) -> Path:
        return self.layout.ca_cert

    @property
    def ca_key_path(self) -> Path:
        return self.layout.ca_key

    @property
    def inventory_path(self) -> Path:
        return self.layout.inventory

    @property
    def crl_path(self) -> Path:
        return self.layout.crl

    def now(self) -> dt.datetime:
        """The current time, truncated to seconds (X.509 precision)."""
        return self._clock().astimezone(dt.UTC).replace(microsecond=0)

    def ca_key_encrypted(self) -> bool:
        """Whether ca.key is passphrase-protected (so the caller knows to ask for one)."""
        try:
            head = self.ca_key_path.read_bytes()[:200]
        except FileNotFoundError:
            raise PkiError(
                f"no CA in {self.path} ({CA_KEY} missing); run 'vpnctl ca init'"
            ) from None
        except OSError as exc:
            raise PkiError(f"{self.ca_key_path}: cannot read: {exc.strerror or exc}") from None
        return b"ENCRYPTED" in head

    def ca_certificate(self) -> x509.Certificate:
        if not self.ca_cert_path.exists():
            raise PkiError(f"no CA in {self.path} ({CA_CERT} missing); run 'vpnctl ca init'")
        return load_certificate(self.ca_cert_path)

    # --- CA ------------------------------------------------------------------------------

    def init_ca(
        self,
        *,
        name: str,
        networks: Sequence[IPNetwork],
        days: int = DEFAULT_CA_DAYS,
        key_type: str = "ecdsa-p256",
        crl_days: int = DEFAULT_CRL_DAYS,
    ) -> CaCreated:
        """Create the CA key, certificate, inventory and an initial empty CRL.

        Refuses if any PKI file is already present. On failure, whatever this call
        created is removed again, so it can simply be retried.
        """
        positive_days(days, "CA lifetime")
        positive_days(crl_days, "CRL validity")
        if key_type not in KEY_TYPES_CA:
            raise PkiError(f"CA key type {key_type!r} is not one of {', '.join(KEY_TYPES_CA)}")
        nets = tuple(dict.fromkeys(networks))
        if not nets:
            raise PkiError("a CA needs at least one overlay network (--network CIDR)")
        present = self.layout.present()
        if present:
            raise PkiError(
                f"{self.path} already holds a CA ({', '.join(present)}); refusing to overwrite"
            )
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PkiError(f"cannot create {self.path}: {exc.strerror or exc}") from None

        now = self.now()
        key = generate_key(key_type)
        ca_cert = create_ca(
            name=name,
            networks=nets,
            key=key,
            not_before=now - BACKDATE,
            not_after=now + dt.timedelta(days=days),
        )
        created: list[Path] = []
        try:
            inv = Inventory.create(self.inventory_path, crl_days=crl_days)
            created.append(self.inventory_path)
            with inv, inv.transaction():
                created.append(self.ca_key_path)
                _write(self.ca_key_path, private_key_pem(key, self._passphrase), PRIVATE)
                created.append(self.ca_cert_path)
                _write(self.ca_cert_path, certificate_pem(ca_cert), PUBLIC)
                created.append(self.crl_path)
                self._sign_crl(inv, ca_cert, key, now, crl_days)
        except BaseException:
            for path in created:
                for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            raise
        return CaCreated(
            name=describe_certificate(ca_cert).name,
            fingerprint=fingerprint(ca_cert),
            networks=ca_networks(ca_cert),
            not_after=ca_cert.not_valid_after_utc,
            key_type=key_type,
            encrypted=self._passphrase is not None,
            files=self.layout.files(),
        )

    # --- issuing -------------------------------------------------------------------------

    def issue(
        self,
        name: str,
        *,
        out_dir: str | os.PathLike[str],
        role: Role = Role.PEER,
        addresses: Sequence[IPAddress] = (),
        groups: Sequence[str] = (),
        routes: Sequence[IPNetwork] = (),
        dns_names: Sequence[str] = (),
        days: int | None = None,
        key_type: str = "ecdsa-p256",
    ) -> Issued:
        """Generate a key pair and certificate; write ``NAME.key``, ``NAME.pem``, ``ca.pem``."""
        cn = canonical_name(name)
        if key_type not in KEY_TYPES_LEAF:
            raise PkiError(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES_LEAF)}")
        out = self._output_dir(out_dir)
        if cn == "ca":
            # NAME.pem would collide with the ca.pem written next to it.
            raise PkiError("the name 'ca' is reserved: its files would clash with ca.pem")
        key = generate_key(key_type)
        ca_pem = certificate_pem(self.ca_certificate())
        key_pem = private_key_pem(key)
        key_path, cert_path, ca_path = out / f"{cn}.key", out / f"{cn}.pem", out / CA_CERT

        def write(cert: x509.Certificate) -> tuple[Path, ...]:
            write_together(
                [
                    (key_path, key_pem, PRIVATE),
                    (cert_path, certificate_pem(cert), PUBLIC),
                    (ca_path, ca_pem, PUBLIC),
                ]
            )
            return (cert_path, key_path, ca_path)

        return self._issue(
            cn,
            public_key=key.public_key(),
            role=role,
            addresses=addresses,
            groups=groups,
            routes=routes,
            dns_names=dns_names,
            days=days,
            write=write,
        )

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        out_path: str | os.PathLike[str] | None,
        role: Role = Role.PEER,
        addresses: Sequence[IPAddress] = (),
        groups: Sequence[str] = (),
        routes: Sequence[IPNetwork] = (),
        dns_names: Sequence[str] = (),
        days: int | None = None,
        name: str | None = None,
        replace: bool = False,
    ) -> Issued:
        """Sign a CSR: its signature is checked, its CN canonicalised, and everything
        else it requests is ignored (the admin decides addresses and groups).

        The name is ``name`` if given, else the CSR's CN, canonicalised either way. A
        name that already has a valid certificate is refused unless ``replace``: else a
        CSR named "Bob" or " bob " would silently become bob, take bob's address and
        evict bob's session. A peer name never equals a gateway's (nor the reverse).

        With ``out_path`` the certificate is written there atomically (0644) before the
        record commits. With ``out_path=None`` (provisioning) nothing is written: the
        caller delivers ``Issued.certificate`` and then calls :meth:`mark_delivered`.
        """
        cn, public_key = verify_csr(csr)
        if name is not None:
            cn = canonical_name(name)
        target: Path | None = None
        if out_path is not None:
            target = Path(out_path)
            self._output_dir(target.parent if str(target.parent) else Path("."))
            if target.is_dir():
                raise PkiError(f"{target} is a directory; give the certificate file to write")
        dest = target

        def write(cert: x509.Certificate) -> tuple[Path, ...]:
            if dest is None:
                return ()
            _write(dest, certificate_pem(cert), PUBLIC)
            return (dest,)

        return self._issue(
            cn,
            public_key=public_key,
            role=role,
            addresses=addresses,
            groups=groups,
            routes=routes,
            dns_names=dns_names,
            days=days,
            write=write,
            taken_over=None if replace else "sign",
        )

    def mark_delivered(self, serial: int, delivered: bool = True) -> None:
        with self._inventory() as inv, inv.transaction():
            inv.mark_delivered(serial, delivered)

    def _issue(
        self,
        cn: str,
        *,
        public_key: PublicKey,
        role: Role,
        addresses: Sequence[IPAddress],
        groups: Sequence[str],
        routes: Sequence[IPNetwork],
        dns_names: Sequence[str],
        days: int | None,
        write: Callable[[x509.Certificate], tuple[Path, ...]],
        taken_over: str | None = None,
    ) -> Issued:
        """``taken_over``: the command name; refuse a name that has a valid certificate
        of the same role (None: allowed, as a renewal or a deliberate replacement)."""
        terms = certificate_terms(
            role=role,
            addresses=addresses,
            groups=groups,
            routes=routes,
            dns_names=dns_names,
            days=days,
        )
        now = self.now()
        ca_cert = self.ca_certificate()
        window = validity(ca_cert, now, terms.days)
        networks = ca_networks(ca_cert)
        for addr in terms.wanted:
            check_in_networks(addr, networks)
        ca_key = self._ca_key()

        with self._inventory() as inv, inv.transaction():
            refuse_name_collision(inv, cn, terms.role, now, command=taken_over)
            chosen = choose_addresses(
                inv, cn=cn, role=terms.role, wanted=terms.wanted, networks=networks, now=now
            )
            cert = issue_certificate(
                ca_cert=ca_cert,
                ca_key=ca_key,
                name=cn,
                public_key=public_key,
                role=terms.role,
                addresses=chosen,
                groups=terms.groups,
                routes=terms.routes,
                dns_names=terms.dns_names,
                not_before=window.not_before,
                not_after=window.not_after,
                generation=next_generation(inv, cn),
            )
            record = record_of(cert, issued_at=now, issuer_fp=fingerprint(ca_cert))
            inv.add(record)
            inv.put_identity(identity_of(record, now=now))
            files = write(cert)
        return Issued(record=record, certificate=cert, files=files, warnings=window.warnings)

    # --- revocation ----------------------------------------------------------------------

    def revoke(
        self,
        *,
        name: str | None = None,
        serial: int | None = None,
        reason: str | None = None,
    ) -> Revocation:
        """Revoke by serial, or every currently valid certificate of ``name``; re-sign the CRL.

        Asking for something already revoked is not an error: it is reported in
        ``already_revoked`` and the CRL is left alone.
        """
        if (name is None) == (serial is None):
            raise PkiError("revoke needs exactly one of a name or a serial")
        if reason is not None and reason not in REASONS:
            raise PkiError(f"unknown revocation reason {reason!r}: use one of {', '.join(REASONS)}")
        ca_cert = self.ca_certificate()
        ca_key = self._ca_key()
        now = self.now()
        with self._inventory() as inv, inv.transaction():
            if serial is not None:
                record = inv.get(serial)
                if record is None:
                    raise PkiError(
                        f"no certificate with serial {serial_hex(serial)} in the inventory"
                    )
                targets = [record]
            else:
                cn = canonical_name(name or "")
                records = inv.by_name(cn)
                if not records:
                    raise PkiError(f"no certificate was ever issued to {cn!r}")
                targets = [r for r in records if r.is_valid(now)]
                if not targets:
                    revoked = tuple(r for r in records if r.revoked_at is not None)
                    if revoked:
                        return Revocation(revoked=(), already_revoked=revoked, crl=None)
                    raise PkiError(
                        f"{cn} has no valid certificate (all have expired); "
                        "revoke one by --serial if you must"
                    )
            already = tuple(r for r in targets if r.revoked_at is not None)
            fresh = [r for r in targets if r.revoked_at is None]
            if not fresh:
                return Revocation(revoked=(), already_revoked=already, crl=None)
            for r in fresh:
                inv.mark_revoked(r.serial, now, reason)
            done = tuple(inv.get(r.serial) or r for r in fresh)
            crl = self._sign_crl(inv, ca_cert, ca_key, now, inv.crl_days())
        return Revocation(revoked=done, already_revoked=already, crl=crl)

    def refresh_crl(self, *, days: int | None = None) -> CrlSigned:
        """Re-sign the CRL (a cron job runs this before nextUpdate); CRLNumber increments."""
        if days is not None:
            positive_days(days, "CRL validity")
        ca_cert = self.ca_certificate()
        ca_key = self._ca_key()
        now = self.now()
        with self._inventory() as inv, inv.transaction():
            return self._sign_crl(inv, ca_cert, ca_key, now, days or inv.crl_days())

    def _sign_crl(
        self,
        inv: Inventory,
        ca_cert: x509.Certificate,
        ca_key: PrivateKey,
        now: dt.datetime,
        days: int,
    ) -> CrlSigned:
        number = inv.next_crl_number()
        entries = [
            RevokedEntry(
                serial=r.serial,
                revoked_at=r.revoked_at,
                reason=REASONS.get(r.revoke_reason) if r.revoke_reason else None,
            )
            for r in inv.revoked()
            if r.revoked_at is not None
        ]
        # Root-signed certificates a renewal superseded (the gateway publishes the issuer's
        # own in its CRL); an empty issuer_fp is a record from before issuers existed.
        root_fp = fingerprint(ca_cert)
        listed = {e.serial for e in entries}
        entries += [
            RevokedEntry(
                serial=r.serial, revoked_at=r.superseded_at, reason=x509.ReasonFlags.superseded
            )
            for r in inv.superseded()
            if r.superseded_at is not None
            and r.serial not in listed
            and r.issuer_fp in ("", root_fp)
            and r.not_after > now - dt.timedelta(days=30)
        ]
        next_update = now + dt.timedelta(days=days)
        crl = build_crl(
            ca_cert=ca_cert,
            ca_key=ca_key,
            revoked=entries,
            crl_number=number,
            this_update=now,
            next_update=next_update,
        )
        _write(self.crl_path, crl_pem(crl), PUBLIC)
        return CrlSigned(
            number=number,
            this_update=now,
            next_update=next_update,
            revoked_count=len(entries),
            path=self.crl_path,
        )

    # --- listing -------------------------------------------------------------------------

    def list_certificates(
        self, *, expiring_within_days: int | None = None
    ) -> list[ListedCertificate]:
        """Every recorded certificate with its status; with ``expiring_within_days``, only
        the valid ones that expire within that many days (what needs renewal)."""
        now = self.now()
        with self._inventory() as inv:
            records = inv.all_certificates()
            current = {i.current_serial for i in inv.identities() if i.current_serial}
        listed = [
            ListedCertificate(
                record=r,
                status=r.status(now),
                days_left=(r.not_after - now).days,
                renews_at=(
                    next_renewal(r.not_before, r.not_after)
                    if r.serial in current and r.is_valid(now)
                    else None
                ),
            )
            for r in records
        ]
        if expiring_within_days is not None:
            horizon = now + dt.timedelta(days=expiring_within_days)
            listed = [c for c in listed if c.status == "valid" and c.record.not_after <= horizon]
        return listed

    # --- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _inventory(self) -> Iterator[Inventory]:
        inv = Inventory.open(self.inventory_path)
        try:
            yield inv
        finally:
            inv.close()

    def signing_key(self) -> PrivateKey:
        """The root CA key, decrypted with the passphrase this PkiDir was given."""
        return self._ca_key()

    def _ca_key(self) -> PrivateKey:
        if not self.ca_key_path.exists():
            raise PkiError(f"no CA key in {self.path} ({CA_KEY} missing)")
        return load_private_key(self.ca_key_path, self._passphrase)

    def _output_dir(self, out_dir: str | os.PathLike[str]) -> Path:
        out = Path(out_dir)
        if not out.is_dir():
            raise PkiError(f"output directory {out} does not exist; create it first")
        if out.resolve() == self.path.resolve():
            raise PkiError(
                f"refusing to write peer files into the PKI directory {out}; use another --out"
            )
        return out


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        atomic_write(path, data, mode)
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from None
