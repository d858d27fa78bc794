"""build_crl, load_crls and the usability rules for one CRL."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from pki_fixtures import DAY, NOW, make_ca

from vpnd.pki import REASONS, PkiError, RevokedEntry, build_crl, crl_number, crl_pem, load_crls
from vpnd.pki.crl import crl_problem


def test_reasons_cover_the_cli_names() -> None:
    assert set(REASONS) == {
        "keyCompromise",
        "superseded",
        "cessationOfOperation",
        "affiliationChanged",
        "unspecified",
        "caCompromise",
        "privilegeWithdrawn",
    }


def test_build_crl() -> None:
    ca = make_ca()
    entries = [
        RevokedEntry(serial=5, revoked_at=NOW - DAY, reason=REASONS["keyCompromise"]),
        RevokedEntry(serial=7, revoked_at=NOW, reason=None),
    ]
    crl = build_crl(
        ca_cert=ca.cert,
        ca_key=ca.key,
        revoked=entries,
        crl_number=42,
        this_update=NOW,
        next_update=NOW + 7 * DAY,
    )
    assert crl.issuer == ca.cert.subject
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl_number(crl) == 42
    assert crl.last_update_utc == NOW
    assert crl.next_update_utc == NOW + 7 * DAY
    five = crl.get_revoked_certificate_by_serial_number(5)
    assert five is not None
    assert five.revocation_date_utc == NOW - DAY
    assert (
        five.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    seven = crl.get_revoked_certificate_by_serial_number(7)
    assert seven is not None and len(seven.extensions) == 0
    assert crl.get_revoked_certificate_by_serial_number(6) is None
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    assert crl_problem(crl, ca.cert) is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"next_update": NOW - DAY}, "later than this_update"),
        ({"crl_number": -1}, "non-negative"),
        ({"revoked": [RevokedEntry(1, NOW), RevokedEntry(1, NOW)]}, "listed twice"),
        ({"revoked": [RevokedEntry(0, NOW)]}, "not a valid serial"),
        ({"revoked": [RevokedEntry(1, NOW, x509.ReasonFlags.remove_from_crl)]}, "not supported"),
        ({"this_update": NOW.replace(tzinfo=None)}, "timezone-aware"),
    ],
)
def test_build_crl_refuses(kwargs: dict[str, object], fragment: str) -> None:
    ca = make_ca()
    args: dict[str, object] = {
        "ca_cert": ca.cert,
        "ca_key": ca.key,
        "revoked": [],
        "crl_number": 1,
        "this_update": NOW,
        "next_update": NOW + DAY,
    }
    args.update(kwargs)
    with pytest.raises(PkiError, match=fragment):
        build_crl(**args)  # type: ignore[arg-type]


def test_build_crl_refuses_foreign_key() -> None:
    with pytest.raises(PkiError, match="does not match"):
        build_crl(
            ca_cert=make_ca().cert,
            ca_key=make_ca().key,
            revoked=[],
            crl_number=1,
            this_update=NOW,
            next_update=NOW + DAY,
        )


def test_load_crls(tmp_path: Path) -> None:
    a, b = make_ca("ca-a"), make_ca("ca-b")
    path = tmp_path / "crl.pem"
    path.write_bytes(crl_pem(a.crl([3])) + b"\n# comment\n" + crl_pem(b.crl()))
    crls = load_crls(path)
    assert [c.issuer for c in crls] == [a.cert.subject, b.cert.subject]
    der = tmp_path / "crl.der"
    der.write_bytes(a.crl().public_bytes(Encoding.DER))
    assert load_crls(der)[0].issuer == a.cert.subject


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "holds no PEM CRL"),
        (b"hello", "holds no PEM CRL"),
        (b"0\x00", "not a valid CRL"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "CRL #1 is damaged"),
    ],
)
def test_load_crls_garbage(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(content)
    with pytest.raises(PkiError, match=fragment):
        load_crls(path)


def test_load_crls_missing(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no such file"):
        load_crls(tmp_path / "nope.pem")


def _raw_crl(
    ca_cert: x509.Certificate, key: object, *, number: bool = True, critical: bool = False
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
    )
    if number:
        builder = builder.add_extension(x509.CRLNumber(1), critical=critical)
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def test_crl_problems() -> None:
    ca = make_ca()
    impostor = make_ca("test-ca")  # same name, different key
    assert (
        crl_problem(impostor.crl(), ca.cert)
        == "CRL signature does not verify with the issuer's key"
    )
    assert crl_problem(make_ca("other").crl(), ca.cert) == "CRL issuer name does not match"
    assert crl_problem(_raw_crl(ca.cert, ca.key, number=False), ca.cert) == "CRL has no CRLNumber"
    assert (
        crl_problem(_raw_crl(ca.cert, ca.key, critical=True), ca.cert)
        == "CRLNumber must not be critical"
    )
    no_crl_sign = ca.raw_leaf(
        ca=True,
        eku=None,
        extensions=[
            (x509.KeyUsage(False, False, False, False, False, True, False, False, False), True)
        ],
    )
    crl = _raw_crl(no_crl_sign.cert, no_crl_sign.key)
    assert crl_problem(crl, no_crl_sign.cert) == "CRL issuer's keyUsage lacks cRLSign"
