"""The online issuing CA: creation, the root upgrade, loading, verification depth."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from vpnd.files.atomic import PRIVATE, PUBLIC, atomic_write
from vpnd.pki.authority import (
    ca_extensions,
    ca_networks,
    create_ca,
    ip_constraints,
    issue_certificate,
)
from vpnd.pki.identity import PkiError, Reason, Role, VerifyError
from vpnd.pki.issuer import (
    allows_issuer,
    create_issuer,
    expiry_forecast,
    load_issuer,
    path_length,
    upgrade_root,
)
from vpnd.pki.keys import PrivateKey, certificate_pem, generate_key, private_key_pem
from vpnd.pki.verify import TrustStore, VerifyOptions, verify_peer

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
NET = ipaddress.ip_network("10.8.0.0/16")


def root(path_length: int = 1) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_key("ecdsa-p256")
    cert = create_ca(
        name="root",
        networks=[NET],
        key=key,
        not_before=NOW - DAY,
        not_after=NOW + 3650 * DAY,
        path_length=path_length,
    )
    return cert, key


def issuer(
    ca: tuple[x509.Certificate, PrivateKey], **kw: object
) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_key("ecdsa-p256")
    args: dict[str, object] = {
        "root_cert": ca[0],
        "root_key": ca[1],
        "name": "issuer",
        "key": key,
        "not_before": NOW - DAY,
        "not_after": NOW + 90 * DAY,
    }
    args.update(kw)
    return create_issuer(**args), key  # type: ignore[arg-type]


def leaf(
    ca: tuple[x509.Certificate, PrivateKey], address: str = "10.8.0.5", days: int = 7
) -> x509.Certificate:
    return issue_certificate(
        ca_cert=ca[0],
        ca_key=ca[1],
        name="alice",
        public_key=generate_key("ed25519").public_key(),
        role=Role.PEER,
        addresses=[ipaddress.ip_address(address)],
        not_before=NOW - DAY,
        not_after=NOW + days * DAY,
    )


def trust(*roots: x509.Certificate) -> TrustStore:
    return TrustStore(roots=roots, crls=(), crl_required=False)


def test_new_roots_allow_exactly_one_issuer_level() -> None:
    ca = root()
    assert path_length(ca[0]) == 1 and allows_issuer(ca[0])
    iss = issuer(ca)
    assert path_length(iss[0]) == 0
    assert ca_networks(iss[0]) == (NET,)
    bc = iss[0].extensions.get_extension_for_class(x509.BasicConstraints)
    nc = iss[0].extensions.get_extension_for_class(x509.NameConstraints)
    assert bc.critical and nc.critical
    identity = verify_peer([leaf(iss), iss[0]], now=NOW, role=Role.PEER, trust=trust(ca[0]))
    assert identity.name == "alice"
    assert len(identity.chain_serials) == 2  # leaf and issuer, each checked for revocation


def test_an_issuer_is_limited_to_its_networks() -> None:
    ca = root()
    iss = issuer(ca, networks=[ipaddress.ip_network("10.8.1.0/24")])
    with pytest.raises(PkiError, match="outside the CA's overlay networks"):
        leaf(iss, "10.8.2.5")
    with pytest.raises(PkiError, match="outside the root CA's networks"):
        issuer(ca, networks=[ipaddress.ip_network("10.9.0.0/24")])


def test_an_issuer_never_outlives_its_root() -> None:
    ca = root()
    with pytest.raises(PkiError, match="outlive the root"):
        issuer(ca, not_after=NOW + 4000 * DAY)


def test_a_pathlen0_root_refuses_issuers_until_upgraded() -> None:
    old = root(path_length=0)
    with pytest.raises(PkiError, match="vpnctl ca upgrade"):
        issuer(old)
    before = leaf(old)
    new = upgrade_root(old[0], old[1])
    assert path_length(new) == 1
    assert new.subject == old[0].subject and new.serial_number != old[0].serial_number
    assert new.not_valid_after_utc == old[0].not_valid_after_utc
    assert ca_networks(new) == ca_networks(old[0])
    # Certificates of the old root verify against the upgraded one: same key, same name.
    verify_peer([before], now=NOW, role=Role.PEER, trust=trust(new))
    iss = issuer((new, old[1]))
    chain = [leaf(iss), iss[0]]
    verify_peer(chain, now=NOW, role=Role.PEER, trust=trust(new))
    with pytest.raises(VerifyError, match="vpnctl ca upgrade") as info:
        verify_peer(chain, now=NOW, role=Role.PEER, trust=trust(old[0]))
    assert info.value.reason is Reason.CHAIN_INVALID
    with pytest.raises(PkiError, match="nothing to do"):
        upgrade_root(new, old[1])


def _ca_under(
    parent: tuple[x509.Certificate, PrivateKey], name: str, path_length: int
) -> tuple[x509.Certificate, PrivateKey]:
    """A hand-built CA with room below it: what a stolen key might mint."""
    key = generate_key("ecdsa-p256")
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(parent[0].subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
    )
    builder = ca_extensions(builder, public, path_length)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(parent[1].public_key()),
        critical=False,
    ).add_extension(ip_constraints([NET]), critical=True)
    return builder.sign(parent[1], hashes.SHA256()), key


def test_two_levels_below_the_root_are_refused() -> None:
    # Every pathlen allows the chain: only the verifier's one-intermediate limit refuses.
    ca = root(path_length=3)
    mid = _ca_under(ca, "mid", 2)
    deeper = _ca_under(mid, "deeper", 1)
    chain = [leaf(deeper), deeper[0], mid[0]]
    unlimited = VerifyOptions(max_chain_depth=None)
    verify_peer(chain, now=NOW, role=Role.PEER, trust=trust(ca[0]), options=unlimited)
    with pytest.raises(VerifyError) as info:
        verify_peer(chain, now=NOW, role=Role.PEER, trust=trust(ca[0]))
    assert info.value.reason is Reason.CHAIN_INVALID
    # One level (the issuer's place) still verifies.
    verify_peer([leaf(mid), mid[0]], now=NOW, role=Role.PEER, trust=trust(ca[0]))


def write_issuer(tmp_path: Path, cert: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = tmp_path / "issuer.pem", tmp_path / "issuer.key"
    atomic_write(cert_path, certificate_pem(cert), PUBLIC)
    atomic_write(key_path, private_key_pem(key), PRIVATE)
    return cert_path, key_path


def test_load_issuer(tmp_path: Path) -> None:
    ca = root()
    iss = issuer(ca)
    cert_path, key_path = write_issuer(tmp_path, *iss)
    loaded = load_issuer(cert_path, key_path, roots=[ca[0]], now=NOW)
    assert loaded.cert == iss[0] and loaded.not_after == iss[0].not_valid_after_utc
    assert loaded.chain_pem == certificate_pem(iss[0])
    assert len(loaded.fingerprint) == 64


def test_load_issuer_refusals(tmp_path: Path) -> None:
    ca, other = root(), root()
    iss = issuer(ca)
    cert_path, key_path = write_issuer(tmp_path, *iss)
    with pytest.raises(PkiError, match=r"not signed by any CA in pki\.ca"):
        load_issuer(cert_path, key_path, roots=[other[0]], now=NOW)
    with pytest.raises(PkiError, match="expired"):
        load_issuer(cert_path, key_path, roots=[ca[0]], now=NOW + 100 * DAY)
    # A key of another CA.
    atomic_write(key_path, private_key_pem(generate_key("ecdsa-p256")), PRIVATE)
    with pytest.raises(PkiError, match="does not match"):
        load_issuer(cert_path, key_path, roots=[ca[0]], now=NOW)
    # The root itself is no issuer (pathlen 1, not 0).
    cert_path, key_path = write_issuer(tmp_path, *ca)
    with pytest.raises(PkiError, match="pathlen 0"):
        load_issuer(cert_path, key_path, roots=[ca[0]], now=NOW)


def test_expiry_forecast() -> None:
    ca = root()
    iss = issuer(ca)  # expires NOW + 90 days
    week = 7 * 86400.0
    assert expiry_forecast(iss[0], now=NOW, lifetime_s=week, warn_days=14) is None
    soon = expiry_forecast(iss[0], now=NOW + 75 * DAY, lifetime_s=week, warn_days=14)
    assert soon is not None and "in 15 days" in soon and "shortened from" in soon
    assert "vpnctl ca issuer" in soon
    gone = expiry_forecast(iss[0], now=NOW + 91 * DAY, lifetime_s=week, warn_days=14)
    assert gone is not None and "expired" in gone


def test_a_gateway_certificate_from_the_issuer_does_not_verify() -> None:
    ca = root()
    iss = issuer(ca)
    gw = issue_certificate(
        ca_cert=iss[0],
        ca_key=iss[1],
        name="gw",
        public_key=generate_key("ecdsa-p256").public_key(),
        role=Role.GATEWAY,
        addresses=[ipaddress.ip_address("10.8.0.1")],
        dns_names=["gw.test"],
        not_before=NOW - DAY,
        not_after=NOW + 7 * DAY,
    )
    # A stolen issuer key cannot impersonate a gateway to clients: the issuer is clientAuth.
    with pytest.raises(VerifyError):
        verify_peer(
            [gw, iss[0]], now=NOW, role=Role.GATEWAY, trust=trust(ca[0]), server_name="gw.test"
        )
