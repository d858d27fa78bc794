"""Redeeming an invite: terms from the inventory, single use, expiry, no secret in errors."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from enroll_fixtures import csr_der, make_lab
from pki_fixtures import NOW

from vpnd.pki.enrollment import EnrollmentRefused, redeem_invite
from vpnd.pki.inventory import STATE_ACTIVE
from vpnd.pki.keys import generate_key
from vpnd.pki.profile import describe_certificate, generation_of

LIFE = 7 * 86400.0


def test_redeem_signs_with_inventory_terms_and_records_it(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    token = lab.invite("alice", groups=("staff", "dev"))
    key = generate_key("ecdsa-p256")
    with lab.open() as inv:
        got = redeem_invite(
            inv,
            lab.signer,
            invite_id=token.invite_id,
            secret=token.secret,
            csr_der=csr_der(key, name="mallory"),
            lifetime_s=LIFE,
            now=NOW,
        )
    certs = x509.load_pem_x509_certificates(got.cert_pem)
    assert [c.subject for c in certs[1:]] == [lab.issuer.cert.subject]
    info = describe_certificate(certs[0])
    assert info.name == got.name == "alice"  # not the CSR's CN
    assert set(info.groups) == {"staff", "dev"}
    assert [str(a) for a in info.addresses] == ["10.77.0.9"]
    assert certs[0].public_key() == key.public_key()
    assert certs[0].issuer == lab.issuer.cert.subject
    assert got.not_after == NOW + dt.timedelta(seconds=LIFE)
    with lab.open() as inv:
        invite = inv.invite(token.invite_id)
        assert invite is not None and invite.used_serial == got.serial
        ident = inv.identity("alice")
        assert ident is not None and ident.state == STATE_ACTIVE
        assert ident.current_serial == got.serial
        rec = inv.get(got.serial)
        assert (
            rec is not None
            and rec.issuer_fp
            and rec.addresses == (ipaddress.ip_address("10.77.0.9"),)
        )


def _refusal(tmp_path: Path, **kw: object) -> EnrollmentRefused:
    lab = make_lab(tmp_path)
    token = lab.invite()
    args: dict[str, object] = {
        "invite_id": token.invite_id,
        "secret": token.secret,
        "csr_der": csr_der(),
        "lifetime_s": LIFE,
        "now": NOW,
    }
    args.update(kw)
    with lab.open() as inv, pytest.raises(EnrollmentRefused) as info:
        redeem_invite(inv, lab.signer, **args)  # type: ignore[arg-type]
    assert token.secret not in str(info.value)
    return info.value


def test_second_use_refused(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    token = lab.invite()
    with lab.open() as inv:
        redeem_invite(
            inv,
            lab.signer,
            invite_id=token.invite_id,
            secret=token.secret,
            csr_der=csr_der(),
            lifetime_s=LIFE,
            now=NOW,
        )
        with pytest.raises(EnrollmentRefused) as info:
            redeem_invite(
                inv,
                lab.signer,
                invite_id=token.invite_id,
                secret=token.secret,
                csr_der=csr_der(),
                lifetime_s=LIFE,
                now=NOW,
            )
    assert info.value.code == "used"
    assert info.value.name == "alice"


def test_expired(tmp_path: Path) -> None:
    err = _refusal(tmp_path, now=NOW + dt.timedelta(hours=24))
    assert err.code == "expired"


def test_wrong_secret_and_unknown_look_alike(tmp_path: Path) -> None:
    assert _refusal(tmp_path, secret="x" * 43).code == "invalid"
    (tmp_path / "b").mkdir()
    assert _refusal(tmp_path / "b", invite_id="0" * 16).code == "invalid"


def test_wrong_secret_beats_used_and_expired(tmp_path: Path) -> None:
    # Only the secret's holder learns an invite's state.
    err = _refusal(tmp_path, secret="x" * 43, now=NOW + dt.timedelta(days=9))
    assert err.code == "invalid"


@pytest.mark.parametrize("bad", [b"", b"\x30\x03abc", b"garbage"])
def test_bad_csr(tmp_path: Path, bad: bytes) -> None:
    assert _refusal(tmp_path, csr_der=bad).code == "bad_csr"


def test_refusal_leaves_the_invite_unused(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    token = lab.invite()
    with lab.open() as inv:
        with pytest.raises(EnrollmentRefused):
            redeem_invite(
                inv,
                lab.signer,
                invite_id=token.invite_id,
                secret=token.secret,
                csr_der=b"bad",
                lifetime_s=LIFE,
                now=NOW,
            )
        invite = inv.invite(token.invite_id)
        assert invite is not None and invite.used_at is None
        ident = inv.identity("alice")
        assert ident is not None and ident.state == "pending"
        assert inv.all_certificates() == []


def test_lifetime_capped_by_the_issuer(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    token = lab.invite()
    with lab.open() as inv:
        got = redeem_invite(
            inv,
            lab.signer,
            invite_id=token.invite_id,
            secret=token.secret,
            csr_der=csr_der(),
            lifetime_s=1e10,
            now=NOW,
        )
    assert got.not_after == lab.issuer.cert.not_valid_after_utc


def test_generation_comes_from_the_identity(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    token = lab.invite("alice", generation=3)
    with lab.open() as inv:
        got = redeem_invite(
            inv,
            lab.signer,
            invite_id=token.invite_id,
            secret=token.secret,
            csr_der=csr_der(),
            lifetime_s=LIFE,
            now=NOW,
        )
        ident = inv.identity("alice")
        rec = inv.get(got.serial)
    leaf = x509.load_pem_x509_certificates(got.cert_pem)[0]
    assert generation_of(leaf) == 3
    assert ident is not None and ident.generation == 3
    assert rec is not None and rec.generation == 3
