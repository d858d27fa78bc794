"""sign_renewal / supersede / write_issuer_crl: the gateway's side of in-tunnel renewal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pki_fixtures import DAY, NOW, Leaf, TestCA, make_ca, rsa_key

from vpnd.pki import (
    PeerIdentity,
    Role,
    TrustStore,
    csr_for,
    generate_key,
    load_crls,
    verify_peer,
)
from vpnd.pki.crl import crl_number
from vpnd.pki.identity import PkiError
from vpnd.pki.inventory import STATUS_SUPERSEDED, Inventory
from vpnd.pki.issue_terms import identity_of, record_of
from vpnd.pki.issuer import Issuer, create_issuer
from vpnd.pki.keys import PrivateKey, certificate_pem, fingerprint
from vpnd.pki.profile import generation_of, peer_attributes_of
from vpnd.pki.renewal_signing import (
    BAD_CSR,
    BAD_LIFETIME,
    ISSUER_EXPIRED,
    KEY_TYPE,
    NAME_MISMATCH,
    NOT_CURRENT,
    PENDING_IDENTITY,
    REASON_CODES,
    REVOKED,
    SUPERSEDED,
    TERMS_INVALID,
    UNKNOWN_CERTIFICATE,
    UNKNOWN_IDENTITY,
    WRONG_ROLE,
    SigningRefused,
    sign_renewal,
    supersede,
    write_issuer_crl,
)

WEEK_S = 7 * 86400.0


@dataclass
class World:
    root: TestCA
    issuer: Issuer
    inv: Inventory

    def enroll(self, name: str = "alice", groups: Sequence[str] = ("dev",)) -> Leaf:
        """A root-signed certificate, recorded with its identity (as `vpnctl issue` does)."""
        index = len(self.inv.identities()) + 2
        leaf = self.root.issue(name, addresses=[f"10.77.0.{index}"], groups=groups)
        record = record_of(leaf.cert, issued_at=NOW - DAY, issuer_fp=fingerprint(self.root.cert))
        with self.inv.transaction():
            self.inv.add(record)
            self.inv.put_identity(identity_of(record, now=NOW - DAY))
        return leaf

    def trust(self) -> TrustStore:
        return TrustStore(roots=(self.root.cert,), crls=(self.root.crl(),), crl_required=False)

    def presented(self, chain: Sequence[x509.Certificate], now: dt.datetime = NOW) -> PeerIdentity:
        return verify_peer(list(chain), now=now, role=Role.PEER, trust=self.trust())

    def renew(
        self,
        presented: PeerIdentity,
        *,
        key: PrivateKey | None = None,
        now: dt.datetime = NOW,
        lifetime_s: float = WEEK_S,
        csr_der: bytes | None = None,
    ) -> tuple[list[x509.Certificate], PrivateKey]:
        new_key = key if key is not None else generate_key("ecdsa-p256")
        if csr_der is None:
            csr = csr_for(name=presented.name, key=new_key)
            csr_der = csr.public_bytes(serialization.Encoding.DER)
        signed = sign_renewal(
            self.inv,
            self.issuer,
            presented=presented,
            csr_der=csr_der,
            lifetime_s=lifetime_s,
            now=now,
        )
        chain = x509.load_pem_x509_certificates(signed.cert_pem + signed.chain_pem)
        assert chain[0].serial_number == signed.serial
        assert generation_of(chain[0]) == signed.generation
        assert chain[0].not_valid_after_utc == signed.not_after
        return chain, new_key


def make_issuer(root: TestCA, *, not_after: dt.datetime | None = None) -> Issuer:
    key = generate_key("ecdsa-p256")
    cert = create_issuer(
        root_cert=root.cert,
        root_key=root.key,
        name="issuer-1",
        key=key,
        not_before=NOW - 2 * DAY,
        not_after=not_after or NOW + 90 * DAY,
    )
    return Issuer(
        cert=cert, key=key, chain_pem=certificate_pem(cert), fingerprint=fingerprint(cert)
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = make_ca("root", path_length=1)
    return World(root=root, issuer=make_issuer(root), inv=Inventory.create(tmp_path / "inv.sqlite"))


def refused(world: World, presented: PeerIdentity, **kw: object) -> SigningRefused:
    with pytest.raises(SigningRefused) as err:
        world.renew(presented, **kw)  # type: ignore[arg-type]
    assert err.value.reason in REASON_CODES
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{err.value.reason}: ")
    return err.value


# --- the happy path ------------------------------------------------------------------------


def test_renewal_takes_terms_from_the_inventory_and_verifies(world: World) -> None:
    alice = world.enroll("alice", groups=("dev",))
    # The admin changed alice's groups since her certificate was issued.
    ident = world.inv.identity("alice")
    assert ident is not None
    with world.inv.transaction():
        world.inv.put_identity(dataclasses.replace(ident, groups=("ops",)))
    chain, key = world.renew(world.presented(alice.chain))
    new = world.presented(chain)
    assert new.name == "alice"
    assert new.groups == frozenset({"ops"})
    assert new.addresses == ident.addresses
    assert new.generation == 2
    assert chain[0].public_key() == key.public_key()
    assert chain[1] == world.issuer.cert
    assert chain[0].not_valid_after_utc == NOW + dt.timedelta(seconds=WEEK_S)
    # Recorded: new certificate with its issuer and generation; identity moved on.
    record = world.inv.get(new.serial)
    assert record is not None
    assert (record.generation, record.issuer_fp) == (2, world.issuer.fingerprint)
    after = world.inv.identity("alice")
    assert after is not None
    assert (after.generation, after.current_serial) == (2, new.serial)
    # The old certificate is not superseded until the new one is used.
    old = world.inv.get(alice.cert.serial_number)
    assert old is not None
    assert old.superseded_at is None


def test_csr_requests_are_ignored(world: World) -> None:
    alice = world.enroll("alice", groups=("dev",))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.77.0.99"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    chain, _ = world.renew(
        world.presented(alice.chain), csr_der=csr.public_bytes(serialization.Encoding.DER)
    )
    new = world.presented(chain)
    assert [str(a) for a in new.addresses] == ["10.77.0.2"]
    assert peer_attributes_of(chain[0]).groups == ("dev",)


def test_csr_without_a_cn_is_accepted(world: World) -> None:
    alice = world.enroll()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    chain, _ = world.renew(
        world.presented(alice.chain), csr_der=csr.public_bytes(serialization.Encoding.DER)
    )
    assert world.presented(chain).name == "alice"


def test_chain_of_renewals_counts_generations(world: World) -> None:
    chain: list[x509.Certificate] = world.enroll().chain
    for generation in range(2, 6):
        presented = world.presented(chain)
        chain, _ = world.renew(presented)
        assert supersede(
            world.inv, old_serial=presented.serial, new_serial=chain[0].serial_number, now=NOW
        )
        assert world.presented(chain).generation == generation
    assert len(world.inv.superseded()) == 4


def test_lifetime_is_capped_at_the_issuer_expiry(world: World) -> None:
    world.issuer = make_issuer(world.root, not_after=NOW + 2 * DAY)
    alice = world.enroll()
    chain, _ = world.renew(world.presented(alice.chain))
    assert chain[0].not_valid_after_utc == world.issuer.not_after


def test_expired_but_recorded_certificate_may_renew(world: World) -> None:
    # Quarantine: the gateway admits a recently expired peer only to renew; signing
    # itself does not judge validity (the verifier and the grace window did).
    alice = world.enroll()
    presented = dataclasses.replace(world.presented(alice.chain), not_after=NOW - DAY)
    chain, _ = world.renew(presented)
    assert generation_of(chain[0]) == 2


def test_retry_after_a_lost_renewal_supersedes_the_orphan(world: World) -> None:
    alice = world.enroll()
    presented = world.presented(alice.chain)
    lost, _ = world.renew(presented)  # signed, but the peer never received it
    retry, _ = world.renew(presented, now=NOW + dt.timedelta(minutes=1))
    orphan = world.inv.get(lost[0].serial_number)
    assert orphan is not None
    assert orphan.status(NOW) == STATUS_SUPERSEDED
    assert orphan.superseded_by == retry[0].serial_number
    assert generation_of(retry[0]) == 2  # it replaces the orphan, at its generation
    ident = world.inv.identity("alice")
    assert ident is not None
    assert ident.current_serial == retry[0].serial_number
    # Lost again and again: the peer can always retry with the certificate it holds.
    for minute in (2, 3, 4):
        again, _ = world.renew(presented, now=NOW + dt.timedelta(minutes=minute))
        assert generation_of(again[0]) == 2
    ident = world.inv.identity("alice")
    assert ident is not None and ident.generation == 2
    retry = again
    # Once the retry's certificate is used, the old one can no longer retry.
    assert supersede(
        world.inv,
        old_serial=presented.serial,
        new_serial=retry[0].serial_number,
        now=NOW + dt.timedelta(minutes=5),
    )
    assert refused(world, presented).reason == SUPERSEDED


def test_an_older_certificate_cannot_retry_once_the_renewal_is_used(world: World) -> None:
    alice = world.enroll()
    presented = world.presented(alice.chain)
    chain, _ = world.renew(presented)
    second, _ = world.renew(world.presented(chain))  # generation 3, generation 2 unused
    # alice's generation 1 is two behind: refused even though nothing is superseded.
    assert generation_of(second[0]) == 3
    assert refused(world, presented).reason == NOT_CURRENT


# --- refusals --------------------------------------------------------------------------------


def test_unknown_identity(world: World) -> None:
    stranger = world.root.issue("mallory", addresses=["10.77.0.50"])
    assert refused(world, world.presented(stranger.chain)).reason == UNKNOWN_IDENTITY


def test_pending_identity(world: World) -> None:
    alice = world.enroll()
    ident = world.inv.identity("alice")
    assert ident is not None
    with world.inv.transaction():
        world.inv.put_identity(dataclasses.replace(ident, state="pending"))
    assert refused(world, world.presented(alice.chain)).reason == PENDING_IDENTITY


def test_gateways_do_not_renew(world: World) -> None:
    alice = world.enroll()
    ident = world.inv.identity("alice")
    assert ident is not None
    with world.inv.transaction():
        world.inv.put_identity(dataclasses.replace(ident, role=Role.GATEWAY))
    assert refused(world, world.presented(alice.chain)).reason == WRONG_ROLE


def test_unrecorded_or_forged_serial(world: World) -> None:
    alice = world.enroll()
    # Same name and a valid signature, but never recorded: not the inventory's.
    other = world.root.issue("alice", addresses=["10.77.0.2"])
    assert refused(world, world.presented(other.chain)).reason == UNKNOWN_CERTIFICATE
    # Same serial, another certificate (fingerprint differs).
    forged = dataclasses.replace(world.presented(alice.chain), fingerprint="00" * 32)
    assert refused(world, forged).reason == UNKNOWN_CERTIFICATE


def test_revoked(world: World) -> None:
    alice = world.enroll()
    with world.inv.transaction():
        world.inv.mark_revoked(alice.cert.serial_number, NOW, "keyCompromise")
    err = refused(world, world.presented(alice.chain))
    assert err.reason == REVOKED
    assert f"{alice.cert.serial_number:x}" in str(err)


def test_superseded(world: World) -> None:
    alice = world.enroll()
    presented = world.presented(alice.chain)
    chain, _ = world.renew(presented)
    supersede(world.inv, old_serial=presented.serial, new_serial=chain[0].serial_number, now=NOW)
    assert refused(world, presented).reason == SUPERSEDED


def test_not_current_after_an_admin_reissue(world: World) -> None:
    alice = world.enroll()
    # The admin re-issued from the root: the current certificate is not a renewal.
    again = world.root.issue("alice", addresses=["10.77.0.2"])
    record = record_of(again.cert, issued_at=NOW, issuer_fp=fingerprint(world.root.cert))
    record = dataclasses.replace(record, generation=2)
    with world.inv.transaction():
        world.inv.add(record)
        world.inv.put_identity(identity_of(record, now=NOW))
    assert refused(world, world.presented(alice.chain)).reason == NOT_CURRENT


@pytest.mark.parametrize(
    "csr_der", [b"", b"\x30\x03\x02\x01\x01", b"garbage" * 10, b"\x30" * (9 * 1024)]
)
def test_bad_csr(world: World, csr_der: bytes) -> None:
    alice = world.enroll()
    assert refused(world, world.presented(alice.chain), csr_der=csr_der).reason == BAD_CSR


def test_csr_with_a_broken_signature(world: World) -> None:
    alice = world.enroll()
    der = bytearray(
        csr_for(name="alice", key=generate_key("ecdsa-p256")).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x55  # inside the signature
    err = refused(world, world.presented(alice.chain), csr_der=bytes(der))
    assert err.reason == BAD_CSR


def test_csr_key_type(world: World) -> None:
    alice = world.enroll()
    weak = rsa_key(1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .sign(weak, hashes.SHA256())
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    assert refused(world, world.presented(alice.chain), csr_der=der).reason == KEY_TYPE


def test_csr_for_another_name(world: World) -> None:
    alice = world.enroll()
    der = csr_for(name="bob", key=generate_key("ecdsa-p256")).public_bytes(
        serialization.Encoding.DER
    )
    assert refused(world, world.presented(alice.chain), csr_der=der).reason == NAME_MISMATCH


def test_issuer_expired_or_too_close(world: World) -> None:
    alice = world.enroll()
    presented = world.presented(alice.chain)
    world.issuer = make_issuer(world.root, not_after=NOW + dt.timedelta(seconds=5))
    assert refused(world, presented).reason == ISSUER_EXPIRED
    world.issuer = make_issuer(world.root, not_after=NOW + DAY)
    assert refused(world, presented, now=NOW + 2 * DAY).reason == ISSUER_EXPIRED


@pytest.mark.parametrize("lifetime", [0.0, -5.0, float("nan"), 1.0])
def test_bad_lifetime(world: World, lifetime: float) -> None:
    alice = world.enroll()
    err = refused(world, world.presented(alice.chain), lifetime_s=lifetime)
    assert err.reason == BAD_LIFETIME


def test_terms_outside_the_issuer_networks(world: World) -> None:
    alice = world.enroll()
    ident = world.inv.identity("alice")
    assert ident is not None
    with world.inv.transaction():
        world.inv.put_identity(
            dataclasses.replace(ident, addresses=(ipaddress.ip_address("10.99.0.1"),))
        )
    assert refused(world, world.presented(alice.chain)).reason == TERMS_INVALID


def test_a_refusal_records_nothing(world: World) -> None:
    alice = world.enroll()
    before = (world.inv.all_certificates(), world.inv.identities(), world.inv.change_stamp())
    refused(world, world.presented(alice.chain), csr_der=b"junk")
    assert (world.inv.all_certificates(), world.inv.identities()) == before[:2]
    assert world.inv.change_stamp() == before[2]
    with world.inv.transaction():
        world.inv.mark_revoked(alice.cert.serial_number, NOW, None)
    stamp = world.inv.change_stamp()
    refused(world, world.presented(alice.chain))
    assert world.inv.change_stamp() == stamp
    assert len(world.inv.all_certificates()) == len(before[0])


# --- supersede --------------------------------------------------------------------------------


def test_supersede_is_idempotent(world: World) -> None:
    alice = world.enroll()
    presented = world.presented(alice.chain)
    chain, _ = world.renew(presented)
    new = chain[0].serial_number
    assert supersede(world.inv, old_serial=presented.serial, new_serial=new, now=NOW) is True
    later = NOW + DAY
    assert supersede(world.inv, old_serial=presented.serial, new_serial=new, now=later) is False
    old = world.inv.get(presented.serial)
    assert old is not None
    assert old.superseded_at == NOW
    with pytest.raises(PkiError, match="not in the inventory"):
        supersede(world.inv, old_serial=0xDEAD, new_serial=new, now=NOW)


# --- the issuer CRL ---------------------------------------------------------------------------


def test_issuer_crl_lists_superseded_and_revoked(world: World, tmp_path: Path) -> None:
    alice, bob = world.enroll("alice"), world.enroll("bob")
    a1 = world.presented(alice.chain)
    a2, _ = world.renew(a1)
    supersede(world.inv, old_serial=a1.serial, new_serial=a2[0].serial_number, now=NOW)
    a3, _ = world.renew(world.presented(a2))
    supersede(world.inv, old_serial=a2[0].serial_number, new_serial=a3[0].serial_number, now=NOW)
    b2, _ = world.renew(world.presented(bob.chain))
    with world.inv.transaction():
        world.inv.mark_revoked(b2[0].serial_number, NOW, "keyCompromise")
    path = tmp_path / "issuer-crl.pem"
    write_issuer_crl(world.inv, world.issuer, path, now=NOW, days=3)
    [crl] = load_crls(path)
    assert crl.issuer == world.issuer.cert.subject
    assert crl.is_signature_valid(world.issuer.cert.public_key())  # type: ignore[arg-type]
    listed = {e.serial_number: e for e in crl}
    # a1 was root-signed: it belongs in the root's CRL, not the issuer's.
    assert set(listed) == {a2[0].serial_number, b2[0].serial_number}
    reason = listed[a2[0].serial_number].extensions.get_extension_for_class(x509.CRLReason)
    assert reason.value.reason is x509.ReasonFlags.superseded
    reason = listed[b2[0].serial_number].extensions.get_extension_for_class(x509.CRLReason)
    assert reason.value.reason is x509.ReasonFlags.key_compromise
    assert crl.next_update_utc == NOW + 3 * DAY
    assert path.stat().st_mode & 0o777 == 0o644
    # The verifier refuses the superseded certificate through this CRL.
    trust = TrustStore(roots=(world.root.cert,), crls=(world.root.crl(), crl))
    with pytest.raises(PkiError, match="revoked"):
        verify_peer(a2, now=NOW, role=Role.PEER, trust=trust)
    assert verify_peer(a3, now=NOW, role=Role.PEER, trust=trust).generation == 3


def test_issuer_crl_number_is_monotonic_and_separate(world: World, tmp_path: Path) -> None:
    path = tmp_path / "issuer-crl.pem"
    numbers = []
    for step in range(3):
        write_issuer_crl(world.inv, world.issuer, path, now=NOW + step * DAY, days=1)
        numbers.append(crl_number(load_crls(path)[0]))
    assert numbers == [1, 2, 3]
    assert world.inv.crl_number() == 0  # the root's counter is untouched
    assert world.inv.issuer_crl_number() == 3


def test_issuer_crl_drops_long_expired_entries(world: World, tmp_path: Path) -> None:
    alice = world.enroll()
    a1 = world.presented(alice.chain)
    a2, _ = world.renew(a1, lifetime_s=DAY.total_seconds())
    with world.inv.transaction():
        world.inv.mark_revoked(a2[0].serial_number, NOW, None)
    path = tmp_path / "issuer-crl.pem"
    write_issuer_crl(world.inv, world.issuer, path, now=NOW + 20 * DAY, days=1)
    assert [e.serial_number for e in load_crls(path)[0]] == [a2[0].serial_number]
    write_issuer_crl(world.inv, world.issuer, path, now=NOW + 40 * DAY, days=1)
    assert list(load_crls(path)[0]) == []


def test_issuer_crl_write_failure_keeps_the_number(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "issuer-crl.pem"
    with pytest.raises(PkiError, match="cannot write"):
        write_issuer_crl(world.inv, world.issuer, missing, now=NOW, days=1)
    assert world.inv.issuer_crl_number() == 0
    with pytest.raises(PkiError, match="positive"):
        write_issuer_crl(world.inv, world.issuer, tmp_path / "x.pem", now=NOW, days=0)
    assert not os.path.exists(tmp_path / "x.pem")


def test_no_key_material_in_refusals(world: World) -> None:
    alice = world.enroll()
    key = generate_key("ecdsa-p256")
    with world.inv.transaction():
        world.inv.mark_revoked(alice.cert.serial_number, NOW, None)
    err = refused(world, world.presented(alice.chain), key=key)
    pem = certificate_pem(alice.cert).decode()
    assert "BEGIN" not in str(err)
    assert pem.splitlines()[1] not in str(err)


def test_short_lifetimes_are_backdated_by_at_most_a_tenth() -> None:
    from vpnd.pki.issue_terms import BACKDATE, backdate_for

    assert backdate_for(7 * 86400.0) == BACKDATE
    assert backdate_for(12.0) == dt.timedelta(seconds=1.2)
    # The renewal point (2/3 of notAfter - notBefore) then lies in the certificate's future.
    lifetime = 12.0
    back = backdate_for(lifetime).total_seconds()
    assert 0.67 * (lifetime + back) > back
