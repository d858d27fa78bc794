"""The peer-attributes extension and describe_certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from pki_fixtures import NOW, make_ca, rsa_key

from vpnd.pki import (
    PeerAttributes,
    PkiError,
    Role,
    decode_peer_attributes,
    describe_certificate,
    encode_peer_attributes,
    fingerprint,
    peer_attributes_of,
)
from vpnd.pki.profile import MAX_GROUPS, MAX_ROUTES, PEER_ATTRIBUTES_OID

V4 = ipaddress.ip_network("192.168.10.0/24")
V6 = ipaddress.ip_network("2001:db8::/48")


def test_round_trip() -> None:
    attrs = PeerAttributes(groups=("admins", "db_ops"), routes=(V4, V6))
    der = encode_peer_attributes(attrs)
    assert decode_peer_attributes(der) == attrs


def test_empty_round_trip_and_exact_der() -> None:
    # SEQUENCE { SEQUENCE {}, SEQUENCE {} }: the documented ASN.1, byte for byte.
    assert encode_peer_attributes(PeerAttributes()) == bytes.fromhex("300430003000")
    assert decode_peer_attributes(bytes.fromhex("300430003000")) == PeerAttributes()


def test_route_encoding_is_address_then_prefix() -> None:
    der = encode_peer_attributes(PeerAttributes(routes=(V4,)))
    assert der.endswith(bytes([0x04, 0x05, 192, 168, 10, 0, 24]))


@pytest.mark.parametrize(
    ("der_hex", "fragment"),
    [
        ("", "not a valid DER"),
        ("00", "not a valid DER"),
        ("3004300030003000", "trailing bytes"),
        ("30813004300030", "not a valid DER"),  # truncated
        ("308104300030", "not"),  # non-minimal length
        ("30800000", "not a valid DER"),  # indefinite length
        ("3002300030", "not a valid DER"),
        ("310430003000", "not a valid DER"),  # SET, not SEQUENCE
        ("300730030c01ff3000", "not a valid DER"),  # invalid UTF-8
        ("300730030c01413000", "invalid group name"),  # "A" is not canonical
        ("300a30060c01610c01613000", "duplicate group"),
        ("3009300030050403c0a80a", "a route is 3 bytes"),
        ("300b3000300704050a0000002a", "invalid route"),  # /42 on IPv4
        ("300b3000300704050a00000108", "invalid route"),  # host bits set
    ],
)
def test_decode_refuses_garbage(der_hex: str, fragment: str) -> None:
    with pytest.raises(PkiError, match=fragment) as err:
        decode_peer_attributes(bytes.fromhex(der_hex))
    assert "\n" not in str(err.value)


def test_decode_bounds() -> None:
    too_many = PeerAttributes(groups=tuple(f"g{i}" for i in range(MAX_GROUPS + 1)))
    with pytest.raises(PkiError, match="too many groups"):
        encode_peer_attributes(too_many)
    routes = tuple(
        ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(MAX_ROUTES + 1)
    )
    with pytest.raises(PkiError, match="too many routes"):
        encode_peer_attributes(PeerAttributes(routes=routes))
    # Decoding enforces the same bounds on foreign input.
    ok = encode_peer_attributes(PeerAttributes(groups=tuple(f"g{i}" for i in range(MAX_GROUPS))))
    assert len(decode_peer_attributes(ok).groups) == MAX_GROUPS
    group = bytes.fromhex("0c026767")
    body = group * (MAX_GROUPS + 1)
    der = _seq(_seq(body) + _seq(b""))
    with pytest.raises(PkiError, match="groups"):
        decode_peer_attributes(der)
    with pytest.raises(PkiError, match="too large"):
        decode_peer_attributes(b"\x30" * 20000)


def _seq(body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 128 else bytes([0x82, n >> 8, n & 0xFF])
    return b"\x30" + length + body


def test_encode_refuses_non_canonical() -> None:
    with pytest.raises(PkiError, match="canonical"):
        encode_peer_attributes(PeerAttributes(groups=("Admins",)))
    with pytest.raises(PkiError, match="duplicate group"):
        encode_peer_attributes(PeerAttributes(groups=("a", "a")))
    with pytest.raises(PkiError, match="duplicate routes"):
        encode_peer_attributes(PeerAttributes(routes=(V4, V4)))


@given(st.binary(max_size=300))
def test_decode_never_crashes(data: bytes) -> None:
    try:
        attrs = decode_peer_attributes(data)
    except PkiError:
        return
    assert encode_peer_attributes(attrs) == data  # only exact DER is accepted


@given(
    st.lists(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True), max_size=8, unique=True),
    st.lists(
        st.integers(0, 2**32 - 1).map(lambda n: ipaddress.ip_network((n, 32))),
        max_size=8,
        unique=True,
    ),
)
def test_round_trip_property(groups: list[str], routes: list[ipaddress.IPv4Network]) -> None:
    attrs = PeerAttributes(groups=tuple(groups), routes=tuple(routes))
    assert decode_peer_attributes(encode_peer_attributes(attrs)) == attrs


def test_peer_attributes_of_certificate() -> None:
    ca = make_ca()
    leaf = ca.issue("alice", groups=["ops", "Admins", "ops"], routes=["192.168.10.0/24"])
    assert peer_attributes_of(leaf.cert) == PeerAttributes(groups=("admins", "ops"), routes=(V4,))
    ext = leaf.cert.extensions.get_extension_for_oid(PEER_ATTRIBUTES_OID)
    assert not ext.critical
    bare = ca.raw_leaf("bob")
    assert peer_attributes_of(bare.cert) == PeerAttributes()
    critical = ca.raw_leaf(
        "carol",
        extensions=[
            (x509.UnrecognizedExtension(PEER_ATTRIBUTES_OID, bytes.fromhex("300430003000")), True)
        ],
    )
    with pytest.raises(PkiError, match="must not be critical"):
        peer_attributes_of(critical.cert)


def test_describe_vpnd_certificates() -> None:
    ca = make_ca(networks=["10.77.0.0/16", "fd00:77::/64"])
    gw = ca.issue(
        "gw1", role=Role.GATEWAY, addresses=["10.77.0.1", "fd00:77::1"], dns_names=["GW.test"]
    )
    info = describe_certificate(gw.cert)
    assert info.name == "gw1"
    assert info.role == "gateway"
    assert info.eku == ("serverAuth",)
    assert info.addresses == (ipaddress.ip_address("10.77.0.1"), ipaddress.ip_address("fd00:77::1"))
    assert info.dns_names == ("gw.test",)
    assert not info.is_ca
    assert info.key_type == "ecdsa-p256"
    assert info.issuer == "CN=test-ca"
    assert info.subject == "CN=gw1"
    assert info.fingerprint == fingerprint(gw.cert)
    doc = info.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["serial"] == f"{gw.cert.serial_number:x}"
    assert doc["addresses"] == ["10.77.0.1", "fd00:77::1"]
    ca_info = describe_certificate(ca.cert)
    assert (ca_info.role, ca_info.is_ca, ca_info.name) == ("ca", True, "test-ca")
    peer = describe_certificate(ca.issue("alice", groups=["ops"], key_type="ed25519").cert)
    assert (peer.role, peer.groups, peer.key_type) == ("peer", ("ops",), "ed25519")


def test_describe_foreign_certificates_never_raises() -> None:
    ca = make_ca()
    # No CN, no SAN, no EKU, an RSA key, a broken peer-attributes extension.
    foreign = ca.raw_leaf(
        key=rsa_key(1024),
        subject=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme, Inc.")]),
        san=False,
        eku=None,
        extensions=[(x509.UnrecognizedExtension(PEER_ATTRIBUTES_OID, b"garbage"), False)],
    )
    info = describe_certificate(foreign.cert)
    assert info.name == ""
    assert info.role == "unknown"
    assert info.addresses == () and info.dns_names == () and info.groups == () and info.routes == ()
    assert info.eku == ()
    assert info.key_type == "rsa-1024"
    assert info.subject == "O=Acme\\, Inc."
    both = ca.raw_leaf(eku=[ExtendedKeyUsageOID.CLIENT_AUTH, x509.ObjectIdentifier("1.2.3.4")])
    assert describe_certificate(both.cert).eku == ("clientAuth", "1.2.3.4")
    assert describe_certificate(both.cert).role == "unknown"
    assert describe_certificate(foreign.cert).not_before == NOW - dt.timedelta(days=1)
