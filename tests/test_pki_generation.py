"""The generation extension: issued by issue_certificate, read back by verify_peer."""

from __future__ import annotations

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st
from pki_fixtures import NOW, make_ca

from vpnd.pki import (
    OID_GENERATION,
    PkiError,
    Reason,
    Role,
    VerifyError,
    VerifyOptions,
    describe_certificate,
    generation_of,
    verify_peer,
)
from vpnd.pki.identity import OID_ARC
from vpnd.pki.profile import (
    GENERATION_OID,
    MAX_GENERATION,
    decode_generation,
    encode_generation,
)


def test_oid_is_the_second_of_the_project_arc() -> None:
    assert OID_GENERATION.endswith(".2")
    assert OID_GENERATION.removesuffix(".2") == OID_ARC
    assert GENERATION_OID.dotted_string == OID_GENERATION


@pytest.mark.parametrize(("value", "der_hex"), [(1, "020101"), (127, "02017f"), (128, "02020080")])
def test_encoding_is_a_der_integer(value: int, der_hex: str) -> None:
    assert encode_generation(value).hex() == der_hex
    assert decode_generation(bytes.fromhex(der_hex)) == value


@pytest.mark.parametrize("value", [0, -1, MAX_GENERATION + 1, True])
def test_encode_refuses_out_of_range(value: int) -> None:
    with pytest.raises(PkiError, match="generation"):
        encode_generation(value)


@pytest.mark.parametrize(
    ("der_hex", "fragment"),
    [
        ("020100", "out of range"),  # 0
        ("0201ff", "out of range"),  # -1
        ("02020001", "not DER"),  # non-minimal
        ("02010100", "trailing"),
        ("0c0161", "not a valid DER INTEGER"),  # a UTF8String
        ("", "not a valid DER INTEGER"),
        ("0209" + "01" * 9, "out of range"),
        ("02" + "11" + "01" * 17, "too large"),
    ],
)
def test_decode_refuses_garbage(der_hex: str, fragment: str) -> None:
    with pytest.raises(PkiError, match=fragment):
        decode_generation(bytes.fromhex(der_hex))


@given(st.binary(max_size=24))
def test_decode_never_crashes(data: bytes) -> None:
    try:
        value = decode_generation(data)
    except PkiError:
        return
    assert 1 <= value <= MAX_GENERATION
    assert encode_generation(value) == data


def test_issue_writes_generation_non_critical() -> None:
    ca = make_ca()
    leaf = ca.issue("alice", generation=7)
    ext = leaf.cert.extensions.get_extension_for_oid(GENERATION_OID)
    assert ext.critical is False
    assert generation_of(leaf.cert) == 7
    assert generation_of(ca.issue("bob").cert) == 1  # default


def test_issue_refuses_bad_generation() -> None:
    ca = make_ca()
    with pytest.raises(PkiError, match="generation must be between"):
        ca.issue("alice", generation=0)


def test_verify_peer_fills_generation() -> None:
    ca = make_ca()
    identity = verify_peer(
        ca.issue("alice", generation=42).chain, now=NOW, role=Role.PEER, trust=ca.trust()
    )
    assert identity.generation == 42


def test_absent_extension_means_generation_one() -> None:
    ca = make_ca()
    # A certificate from before the generation extension (built without it).
    old = ca.raw_leaf("alice")
    identity = verify_peer(old.chain, now=NOW, role=Role.PEER, trust=ca.trust())
    assert identity.generation == 1


@pytest.mark.parametrize(
    ("value", "critical", "fragment"),
    [
        (b"\x02\x01\x00", False, "out of range"),
        (b"\x04\x01\x01", False, "not a valid DER INTEGER"),
        (b"\x02\x01\x02", True, ""),
    ],
)
@pytest.mark.parametrize("profile", [True, False])
def test_malformed_generation_is_refused(
    value: bytes, critical: bool, fragment: str, profile: bool
) -> None:
    ca = make_ca()
    bad = ca.raw_leaf(extensions=[(x509.UnrecognizedExtension(GENERATION_OID, value), critical)])
    with pytest.raises(VerifyError) as err:
        verify_peer(
            bad.chain,
            now=NOW,
            role=Role.PEER,
            trust=ca.trust(),
            options=VerifyOptions(profile=profile),
        )
    # A critical unknown extension is the library's refusal; otherwise ours, with a reason.
    if critical:
        assert err.value.reason in (Reason.BAD_EXTENSION, Reason.CHAIN_INVALID)
    else:
        assert err.value.reason is Reason.BAD_EXTENSION
        assert fragment in str(err.value)


def test_describe_shows_the_generation() -> None:
    ca = make_ca()
    assert describe_certificate(ca.issue("alice", generation=5).cert).generation == 5
    assert describe_certificate(ca.issue("alice", generation=5).cert).to_json()["generation"] == 5
    broken = ca.raw_leaf(extensions=[(x509.UnrecognizedExtension(GENERATION_OID, b"x"), False)])
    assert describe_certificate(broken.cert).generation == 1  # never raises
