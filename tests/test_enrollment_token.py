"""Invite tokens: round trip, tampering, truncation and garbage each give one clear line."""

from __future__ import annotations

import base64
import json

import pytest
from pki_fixtures import make_ca

from vpnd.pki.enrollment_token import (
    TOKEN_PREFIX,
    EnrollmentToken,
    TokenError,
    ca_pin,
    format_server,
    hash_secret,
    new_invite,
    parse_server,
    parse_token,
    secret_matches,
)

PIN = "ab" * 32


def _token(server: str = "vpn.example.com:4443") -> EnrollmentToken:
    invite_id, secret = new_invite()
    return EnrollmentToken(server=server, ca_pin=PIN, invite_id=invite_id, secret=secret)


@pytest.mark.parametrize("server", ["vpn.example.com:4443", "192.0.2.7:443", "[2001:db8::1]:4443"])
def test_round_trip(server: str) -> None:
    token = _token(server)
    text = token.encode()
    assert text.startswith(TOKEN_PREFIX)
    assert "\n" not in text and " " not in text
    assert parse_token(text) == token
    assert parse_token(f"  {text[:20]}\n{text[20:]}\n") == token  # wrapped by a mail client


def test_secret_has_at_least_128_bits_and_is_fresh() -> None:
    a, b = new_invite(), new_invite()
    assert a != b
    assert len(base64.urlsafe_b64decode(a[1] + "=" * (-len(a[1]) % 4))) >= 16


def test_secret_is_not_in_repr() -> None:
    token = _token()
    assert token.secret not in repr(token)


def test_hash_matches_only_the_right_secret() -> None:
    invite_id, secret = new_invite()
    stored = hash_secret(invite_id, secret)
    assert secret not in stored
    assert secret_matches(invite_id, secret, stored)
    assert not secret_matches(invite_id, secret[:-1] + ("A" if secret[-1] != "A" else "B"), stored)
    assert not secret_matches(new_invite()[0], secret, stored)  # salted by the invite id


def test_one_changed_character_is_caught() -> None:
    text = _token().encode()
    for pos in range(len(TOKEN_PREFIX), len(text), 7):
        flipped = "B" if text[pos] != "B" else "C"
        with pytest.raises(TokenError, match=r"damaged|truncated"):
            parse_token(text[:pos] + flipped + text[pos + 1 :])


def test_recomputed_checksum_still_needs_valid_fields() -> None:
    import hashlib

    body = json.dumps({"s": "x:1", "p": "zz", "i": "00" * 8, "k": "a" * 43}).encode()
    blob = body + hashlib.sha256(body).digest()[:4]
    text = TOKEN_PREFIX + base64.urlsafe_b64encode(blob).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="CA pin"):
        parse_token(text)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 10, 40])
def test_truncation(cut: int) -> None:
    text = _token().encode()
    with pytest.raises(TokenError, match=r"truncated|damaged"):
        parse_token(text[:-cut])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "must start with"),
        ("hello", "must start with"),
        ("vpnd1-", "truncated"),
        ("vpnd1-!!!!", "characters"),
        ("vpnd1-" + "A" * 3000, "too long"),
        ("vpnd1-" + base64.urlsafe_b64encode(b"nonsense-here").decode().rstrip("="), "damaged"),
    ],
)
def test_garbage(text: str, match: str) -> None:
    with pytest.raises(TokenError, match=match) as info:
        parse_token(text)
    assert "\n" not in str(info.value)


def test_error_never_shows_the_secret() -> None:
    token = _token()
    bad = EnrollmentToken(
        server="no port", ca_pin=PIN, invite_id=token.invite_id, secret=token.secret
    )
    with pytest.raises(TokenError) as info:
        bad.encode()
    assert token.secret not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expect"),
    [("gw:1", ("gw", 1)), ("10.0.0.1:65535", ("10.0.0.1", 65535)), ("[::1]:5", ("::1", 5))],
)
def test_parse_server(text: str, expect: tuple[str, int]) -> None:
    assert parse_server(text) == expect
    assert format_server(*expect) == text


@pytest.mark.parametrize("text", ["gw", "gw:0", "gw:70000", ":443", "::1:443", "[zz]:1", "a b:1"])
def test_parse_server_refuses(text: str) -> None:
    with pytest.raises(TokenError):
        parse_server(text)


def test_ca_pin_is_sha256_of_der() -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    ca = make_ca()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert ca_pin(ca.cert) == hashlib.sha256(der).hexdigest()


def test_every_last_character_change_is_caught() -> None:
    text = _token().encode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for ch in alphabet:
        if ch != text[-1]:
            with pytest.raises(TokenError):
                parse_token(text[:-1] + ch)
