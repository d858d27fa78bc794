"""verify_peer / check_revocation / load_trust_store: every Reason, on purpose."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki_fixtures import DAY, NOW, Leaf, TestCA, cn_name, make_ca, resign_sha1, rsa_key

from vpnd.pki import (
    PeerIdentity,
    PkiError,
    Reason,
    Role,
    TrustStore,
    VerifyError,
    VerifyOptions,
    certificate_pem,
    check_revocation,
    crl_pem,
    fingerprint,
    load_trust_store,
    verify_peer,
)
from vpnd.pki.profile import PEER_ATTRIBUTES_OID

CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER = ExtendedKeyUsageOID.SERVER_AUTH


def refused(
    leaf: Leaf | list[x509.Certificate | bytes],
    trust: TrustStore,
    *,
    role: Role = Role.PEER,
    now: dt.datetime = NOW,
    server_name: str | None = None,
    options: VerifyOptions | None = None,
) -> VerifyError:
    chain = leaf.chain if isinstance(leaf, Leaf) else leaf
    with pytest.raises(VerifyError) as err:
        verify_peer(
            chain,
            now=now,
            role=role,
            trust=trust,
            server_name=server_name,
            options=options or VerifyOptions(),
        )
    message = str(err.value)
    assert "\n" not in message and message.startswith(err.value.reason.value + ": ")
    return err.value


def accepted(
    leaf: Leaf,
    trust: TrustStore,
    *,
    role: Role = Role.PEER,
    now: dt.datetime = NOW,
    server_name: str | None = None,
) -> PeerIdentity:
    return verify_peer(leaf.chain, now=now, role=role, trust=trust, server_name=server_name)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return make_ca(networks=["10.77.0.0/16", "fd00:77::/64"])


# --- accepted chains ---------------------------------------------------------------


def test_peer_identity(ca: TestCA) -> None:
    alice = ca.issue(
        "alice",
        addresses=["10.77.0.2", "fd00:77::2"],
        groups=["ops", "admins"],
        routes=["192.168.1.0/24"],
    )
    ident = accepted(alice, ca.trust())
    assert ident.name == "alice"
    assert ident.role is Role.PEER
    assert ident.serial == alice.cert.serial_number
    assert ident.issuer == "CN=test-ca"
    assert ident.fingerprint == fingerprint(alice.cert)
    assert ident.addresses == (
        ipaddress.ip_address("10.77.0.2"),
        ipaddress.ip_address("fd00:77::2"),
    )
    assert ident.groups == frozenset({"ops", "admins"})
    assert ident.routes == (ipaddress.ip_network("192.168.1.0/24"),)
    assert ident.dns_names == ()
    assert ident.not_before == NOW - DAY
    assert ident.not_after == NOW + 30 * DAY
    assert ident.chain_serials == (("CN=test-ca", alice.cert.serial_number),)


def test_der_chain_and_ed25519(ca: TestCA) -> None:
    bob = ca.issue("bob", key_type="ed25519")
    der = [c.public_bytes(Encoding.DER) for c in bob.chain]
    ident = verify_peer(der, now=NOW, role=Role.PEER, trust=ca.trust())
    assert ident.name == "bob"


def test_gateway_by_dns_and_ip(ca: TestCA) -> None:
    gw = ca.issue("gw1", role=Role.GATEWAY, addresses=["10.77.0.1"], dns_names=["gw.example.test"])
    ident = accepted(gw, ca.trust(), role=Role.GATEWAY, server_name="GW.example.test")
    assert (ident.role, ident.dns_names) == (Role.GATEWAY, ("gw.example.test",))
    assert accepted(gw, ca.trust(), role=Role.GATEWAY, server_name="10.77.0.1").name == "gw1"


def test_intermediate_chain_serials() -> None:
    root = make_ca("root", path_length=1)
    sub = root.intermediate("sub-ca")
    carol = sub.issue("carol")
    ident = accepted(carol, sub.trust())
    assert ident.issuer == "CN=sub-ca"
    assert ident.chain_serials == (
        ("CN=sub-ca", carol.cert.serial_number),
        ("CN=root", sub.cert.serial_number),
    )


def test_ca_rotation_same_name(ca: TestCA) -> None:
    """Old and new CA share a name: each CRL is matched by signature, not by name alone."""
    new = make_ca("test-ca", networks=["10.77.0.0/16"])
    old_leaf, new_leaf = ca.issue("old"), new.issue("new")
    trust = TrustStore(
        roots=(ca.cert, new.cert), crls=(ca.crl([new_leaf.cert.serial_number]), new.crl())
    )
    accepted(old_leaf, trust)
    # The old CA "revoking" the new leaf's serial must not affect the new CA's leaf.
    accepted(new_leaf, trust)
    trust = TrustStore(roots=(ca.cert, new.cert), crls=(ca.crl(), new.crl([new_leaf])))
    assert refused(new_leaf, trust).reason is Reason.REVOKED


def test_no_crl_needed_when_not_required(ca: TestCA) -> None:
    accepted(ca.issue(), ca.trust(crls=[], crl_required=False))


# --- refused chains: one test per Reason ----------------------------------------------


def test_no_certificate(ca: TestCA) -> None:
    assert refused([], ca.trust()).reason is Reason.NO_CERTIFICATE


def test_malformed(ca: TestCA) -> None:
    assert refused([b"\x30\x03junk"], ca.trust()).reason is Reason.MALFORMED
    good = ca.issue()
    assert refused([good.cert, b"nope"], ca.trust()).reason is Reason.MALFORMED


def test_unknown_ca(ca: TestCA) -> None:
    other = make_ca("other-ca")
    err = refused(other.issue(), ca.trust())
    assert err.reason is Reason.UNKNOWN_CA


def test_bad_signature(ca: TestCA) -> None:
    forged = ca.raw_leaf(signer=ec.generate_private_key(ec.SECP256R1()))
    assert refused(forged, ca.trust()).reason is Reason.BAD_SIGNATURE


def test_expired_and_not_yet_valid(ca: TestCA) -> None:
    leaf = ca.issue(not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    err = refused(leaf, ca.trust())
    assert err.reason is Reason.EXPIRED and "CN=alice" in err.detail
    future = ca.issue(not_before=NOW + DAY, not_after=NOW + 2 * DAY)
    assert refused(future, ca.trust()).reason is Reason.NOT_YET_VALID
    # The same certificate, checked at a time inside its validity, passes.
    accepted(future, ca.trust(), now=NOW + DAY + dt.timedelta(hours=1))


def test_expired_intermediate() -> None:
    root = make_ca("root", path_length=1)
    sub = root.intermediate(not_before=NOW - 10 * DAY, not_after=NOW + DAY)
    leaf = sub.issue(not_after=NOW + DAY)
    accepted(leaf, sub.trust())
    assert (
        refused(leaf, sub.trust(), now=NOW + DAY + dt.timedelta(seconds=1)).reason is Reason.EXPIRED
    )


def test_revoked_leaf(ca: TestCA) -> None:
    alice, bob = ca.issue("alice"), ca.issue("bob")
    trust = ca.trust(revoked=[alice])
    err = refused(alice, trust)
    assert err.reason is Reason.REVOKED and f"{alice.cert.serial_number:x}" in err.detail
    accepted(bob, trust)


def test_revoked_intermediate() -> None:
    root = make_ca("root", path_length=1)
    sub = root.intermediate("sub-ca")
    leaf = sub.issue()
    trust = sub.trust(crls=[sub.crl(), root.crl([sub.cert])])
    err = refused(leaf, trust)
    assert err.reason is Reason.REVOKED and "CN=sub-ca" in err.detail


def test_revocation_matches_issuer_and_serial() -> None:
    """The same serial revoked by another CA does not revoke this certificate."""
    root = make_ca("root", path_length=1)
    sub = root.intermediate("sub-ca")
    leaf = sub.issue(serial=4242)
    accepted(leaf, sub.trust(crls=[sub.crl(), root.crl([4242])]))
    assert refused(leaf, sub.trust(crls=[sub.crl([4242]), root.crl()])).reason is Reason.REVOKED


def test_crl_missing(ca: TestCA) -> None:
    assert refused(ca.issue(), ca.trust(crls=[])).reason is Reason.CRL_MISSING
    root = make_ca("root", path_length=1)
    sub = root.intermediate("sub-ca")
    # The leaf's issuer has a CRL, the intermediate's issuer (root) does not.
    err = refused(sub.issue(), sub.trust(crls=[sub.crl()]))
    assert err.reason is Reason.CRL_MISSING and "CN=root" in err.detail


def test_crl_badly_signed(ca: TestCA) -> None:
    impostor = make_ca("test-ca")
    err = refused(ca.issue(), ca.trust(crls=[impostor.crl()]))
    assert err.reason is Reason.CRL_INVALID and "signature" in err.detail


def test_crl_stale(ca: TestCA, caplog: pytest.LogCaptureFixture) -> None:
    stale = ca.crl(this_update=NOW - 10 * DAY, next_update=NOW - DAY)
    leaf = ca.issue()
    assert refused(leaf, ca.trust(crls=[stale])).reason is Reason.CRL_STALE
    with caplog.at_level(logging.WARNING, logger="vpnd.pki"):
        accepted(leaf, ca.trust(crls=[stale], allow_stale_crl=True))
        accepted(leaf, ca.trust(crls=[stale], allow_stale_crl=True))
    warnings = [r for r in caplog.records if r.name == "vpnd.pki" and r.levelno == logging.WARNING]
    assert len(warnings) == 2  # every time, not once
    assert "stale" in warnings[0].getMessage()
    # A stale CRL still revokes.
    stale_revoking = ca.crl([leaf], this_update=NOW - 10 * DAY, next_update=NOW - DAY)
    assert (
        refused(leaf, ca.trust(crls=[stale_revoking], allow_stale_crl=True)).reason
        is Reason.REVOKED
    )


def test_newest_crl_decides_freshness(ca: TestCA) -> None:
    old = ca.crl(number=1, this_update=NOW - 10 * DAY, next_update=NOW - DAY)
    new = ca.crl(number=2)
    accepted(ca.issue(), ca.trust(crls=[old, new]))


def test_no_eku(ca: TestCA) -> None:
    assert refused(ca.raw_leaf(eku=None), ca.trust()).reason is Reason.NO_EKU


def test_wrong_eku(ca: TestCA) -> None:
    server_only = ca.raw_leaf(eku=[SERVER])
    assert refused(server_only, ca.trust()).reason is Reason.WRONG_EKU
    client_only = ca.raw_leaf("gw1", eku=[CLIENT], dns_names=["gw.test"])
    assert (
        refused(client_only, ca.trust(), role=Role.GATEWAY, server_name="gw.test").reason
        is Reason.WRONG_EKU
    )
    both = ca.raw_leaf(eku=[CLIENT, SERVER])
    err = refused(both, ca.trust())
    assert err.reason is Reason.WRONG_EKU and "only clientAuth" in err.detail
    any_eku = ca.raw_leaf(eku=[CLIENT, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    assert refused(any_eku, ca.trust()).reason is Reason.WRONG_EKU
    gateway_cert = ca.issue("gw1", role=Role.GATEWAY, dns_names=["gw.test"])
    assert refused(gateway_cert, ca.trust()).reason is Reason.WRONG_EKU


def test_weak_keys(ca: TestCA) -> None:
    err = refused(ca.raw_leaf(key=rsa_key(1024)), ca.trust())
    assert err.reason is Reason.WEAK_KEY and "1024" in err.detail
    small_curve = ca.raw_leaf(key=ec.generate_private_key(ec.SECP224R1()))
    assert refused(small_curve, ca.trust()).reason is Reason.WEAK_KEY


def test_weak_signature_leaf(ca: TestCA) -> None:
    sha1 = resign_sha1(ca.issue().cert, ca.key)
    assert (
        sha1.signature_hash_algorithm is not None and sha1.signature_hash_algorithm.name == "sha1"
    )
    err = refused([sha1], ca.trust())
    assert err.reason is Reason.WEAK_SIGNATURE and "SHA1" in err.detail


def test_weak_signature_intermediate() -> None:
    root = make_ca("root", path_length=1)
    sub = root.intermediate("sub-ca")
    leaf = sub.issue()
    sha1_sub = resign_sha1(sub.cert, root.key)
    err = refused([leaf.cert, sha1_sub], sub.trust())
    assert err.reason is Reason.WEAK_SIGNATURE
    assert err.detail == "CN=sub-ca: signature algorithm ecdsa-with-SHA1 is too weak"


def test_ca_as_leaf(ca: TestCA) -> None:
    assert refused(ca.raw_leaf(ca=True), ca.trust()).reason is Reason.CA_AS_LEAF


def test_no_san(ca: TestCA) -> None:
    assert refused(ca.raw_leaf(san=False), ca.trust()).reason is Reason.NO_SAN
    dns_only = ca.raw_leaf(addresses=[], dns_names=["alice.test"])
    err = refused(dns_only, ca.trust())
    assert err.reason is Reason.NO_SAN and "iPAddress" in err.detail


@pytest.mark.parametrize(
    "subject",
    [
        cn_name("Alice"),
        cn_name("alice.example.com"),
        cn_name("a/b"),
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")]),
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "a"),
                x509.NameAttribute(NameOID.COMMON_NAME, "b"),
            ]
        ),
    ],
    ids=["uppercase", "dotted", "slash", "no-cn", "two-cns"],
)
def test_bad_name(ca: TestCA, subject: x509.Name) -> None:
    assert refused(ca.raw_leaf(subject=subject), ca.trust()).reason is Reason.BAD_NAME


def test_address_outside_network(ca: TestCA) -> None:
    err = refused(ca.raw_leaf(addresses=["10.78.0.1"]), ca.trust())
    assert err.reason is Reason.ADDRESS_OUTSIDE_NETWORK and "10.78.0.1" in err.detail


def test_address_check_uses_the_issuing_root() -> None:
    """A root without IP name constraints vouches for no overlay address at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    bare_root = (
        x509.CertificateBuilder()
        .subject_name(cn_name("bare-root"))
        .issuer_name(cn_name("bare-root"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 10 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    bare = TestCA(cert=bare_root, key=key)
    leaf = bare.raw_leaf(addresses=["10.77.0.5"])
    err = refused(leaf, bare.trust())
    assert err.reason is Reason.ADDRESS_OUTSIDE_NETWORK and "no name constraints" in err.detail
    # The core alone (profile off) accepts it: the rule is vpnd's, not RFC 5280's.
    verify_peer(
        leaf.chain,
        now=NOW,
        role=Role.PEER,
        trust=bare.trust(),
        options=VerifyOptions(profile=False),
    )


def test_name_constraints_without_profile(ca: TestCA) -> None:
    err = refused(
        ca.raw_leaf(addresses=["10.78.0.1"]), ca.trust(), options=VerifyOptions(profile=False)
    )
    assert err.reason is Reason.NAME_CONSTRAINTS


def test_bad_extension(ca: TestCA) -> None:
    bad = ca.raw_leaf(
        extensions=[(x509.UnrecognizedExtension(PEER_ATTRIBUTES_OID, b"\x30\x02\x30\x00"), False)]
    )
    assert refused(bad, ca.trust()).reason is Reason.BAD_EXTENSION


def test_name_mismatch(ca: TestCA) -> None:
    gw = ca.issue("gw1", role=Role.GATEWAY, addresses=["10.77.0.1"], dns_names=["gw.example.test"])
    err = refused(gw, ca.trust(), role=Role.GATEWAY, server_name="evil.example.test")
    assert err.reason is Reason.NAME_MISMATCH


def test_chain_invalid_pathlen() -> None:
    root = make_ca("root", path_length=0)  # may not have intermediates
    sub = root.intermediate("sub-ca")
    err = refused(sub.issue(), sub.trust())
    assert err.reason is Reason.CHAIN_INVALID and "path length" in err.detail


def test_chain_too_long(ca: TestCA) -> None:
    leaf = ca.issue()
    err = refused([leaf.cert] * 9, ca.trust())
    assert err.reason is Reason.CHAIN_INVALID and "9 certificates" in err.detail


# --- API misuse is a PkiError, not a verification result ------------------------------


def test_api_misuse(ca: TestCA) -> None:
    gw = ca.issue("gw1", role=Role.GATEWAY, dns_names=["gw.test"])
    with pytest.raises(PkiError, match="server_name"):
        verify_peer(gw.chain, now=NOW, role=Role.GATEWAY, trust=ca.trust())
    with pytest.raises(PkiError, match="server_name only applies"):
        verify_peer(gw.chain, now=NOW, role=Role.PEER, trust=ca.trust(), server_name="gw.test")
    with pytest.raises(PkiError, match="server_name"):
        verify_peer(gw.chain, now=NOW, role=Role.GATEWAY, trust=ca.trust(), server_name="*.bad")
    with pytest.raises(PkiError, match="timezone-aware"):
        verify_peer(gw.chain, now=NOW.replace(tzinfo=None), role=Role.PEER, trust=ca.trust())
    with pytest.raises(PkiError, match="no CA certificate"):
        TrustStore(roots=(), crls=())


# --- check_revocation: live sessions against a newer CRL ------------------------------


def test_check_revocation(ca: TestCA) -> None:
    alice = ca.issue("alice")
    ident = accepted(alice, ca.trust())
    check_revocation(ident, ca.trust(), now=NOW)
    with pytest.raises(VerifyError) as err:
        check_revocation(ident, ca.trust(revoked=[alice]), now=NOW)
    assert err.value.reason is Reason.REVOKED
    with pytest.raises(VerifyError) as err:
        check_revocation(ident, ca.trust(crls=[]), now=NOW)
    assert err.value.reason is Reason.CRL_MISSING
    check_revocation(ident, ca.trust(crls=[], crl_required=False), now=NOW)
    stale = ca.crl(this_update=NOW - 10 * DAY, next_update=NOW - DAY)
    with pytest.raises(VerifyError) as err:
        check_revocation(ident, ca.trust(crls=[stale]), now=NOW)
    assert err.value.reason is Reason.CRL_STALE
    check_revocation(ident, ca.trust(crls=[stale], allow_stale_crl=True), now=NOW)
    impostor = make_ca("test-ca")
    with pytest.raises(VerifyError) as err:
        check_revocation(ident, ca.trust(crls=[impostor.crl([alice])]), now=NOW)
    assert err.value.reason is Reason.CRL_INVALID


def test_check_revocation_intermediate() -> None:
    root = make_ca("root", path_length=1)
    sub = root.intermediate("sub-ca")
    ident = accepted(sub.issue(), sub.trust())
    check_revocation(ident, sub.trust(), now=NOW)
    with pytest.raises(VerifyError) as err:
        check_revocation(ident, sub.trust(crls=[sub.crl(), root.crl([sub.cert])]), now=NOW)
    assert err.value.reason is Reason.REVOKED


# --- load_trust_store ---------------------------------------------------------------


def test_load_trust_store(tmp_path: Path, ca: TestCA) -> None:
    ca_path, crl_path = ca.write(tmp_path)
    trust = load_trust_store(ca_path, crl_path)
    assert trust.roots == (ca.cert,)
    assert trust.crl_required and not trust.allow_stale_crl
    accepted(ca.issue(), trust)
    client_side = load_trust_store(ca_path, None)
    assert client_side.crls == () and not client_side.crl_required
    assert load_trust_store(ca_path, crl_path, allow_stale_crl=True).allow_stale_crl


def test_load_trust_store_refuses(tmp_path: Path, ca: TestCA) -> None:
    leaf_path = tmp_path / "leaf.pem"
    leaf_path.write_bytes(certificate_pem(ca.issue().cert))
    with pytest.raises(PkiError, match="is not a CA"):
        load_trust_store(leaf_path, None)
    ca_path, _ = ca.write(tmp_path)
    bad_crl = tmp_path / "bad-crl.pem"
    bad_crl.write_bytes(crl_pem(make_ca("test-ca").crl()))
    with pytest.raises(PkiError, match="signature"):
        load_trust_store(ca_path, bad_crl)
    with pytest.raises(PkiError, match="no such file"):
        load_trust_store(tmp_path / "missing.pem", None)
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(PkiError, match="holds no PEM certificate"):
        load_trust_store(empty, None)


def test_check_revocation_without_chain_serials(ca: TestCA) -> None:
    alice = ca.issue("alice")
    ident = dataclasses.replace(accepted(alice, ca.trust()), chain_serials=())
    with pytest.raises(VerifyError) as err:
        check_revocation(ident, ca.trust(revoked=[alice]), now=NOW)
    assert err.value.reason is Reason.REVOKED
