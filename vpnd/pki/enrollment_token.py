"""Invite tokens: one line that takes a laptop from nothing to an enrolled peer.

A token is ``vpnd1-`` followed by base64url (no padding) of ``JSON || check``, where
the JSON object holds

- ``s``: the gateway's ``host:port`` (``[v6]:port`` for an IPv6 literal);
- ``p``: the pin, SHA-256 (hex) of the root CA certificate's DER;
- ``i``: the invite id (public: it names the invite in the inventory and the audit log);
- ``k``: the single-use secret (at least 128 random bits), which only the token holds:
  the inventory keeps a salted SHA-256 of it, compared in constant time;

and ``check`` is the first 4 bytes of SHA-256 of the JSON. The check is not a security
measure (whoever can change the token can recompute it); it turns a mistyped, cut or
garbled token into one clear line instead of a confusing failure further on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vpnd.pki.identity import PkiError

TOKEN_PREFIX = "vpnd1-"  # noqa: S105 - a format prefix, not a secret
SECRET_BYTES = 32
"""256 bits from ``secrets``: far past guessing, so a fast hash is enough to store it."""
INVITE_ID_BYTES = 8
MAX_TOKEN_CHARS = 2048
_CHECK_BYTES = 4
_HASH_DOMAIN = b"vpnd invite secret v1\x00"
_PIN_RE = re.compile(r"[0-9a-f]{64}")
_ID_RE = re.compile(r"[0-9a-f]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")  # >= 22 base64url chars = >= 128 bits
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class TokenError(PkiError):
    """A token that cannot be used; ``str(err)`` is one line and never holds the secret."""


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    server: str
    """``host:port`` of the gateway."""
    ca_pin: str
    """SHA-256 hex of the root CA certificate (DER)."""
    invite_id: str
    secret: str = field(repr=False)

    @property
    def host(self) -> str:
        return parse_server(self.server)[0]

    @property
    def port(self) -> int:
        return parse_server(self.server)[1]

    def encode(self) -> str:
        """The one-line token (it holds the secret: show it only to the admin)."""
        check(self)
        body = json.dumps(
            {"s": self.server, "p": self.ca_pin, "i": self.invite_id, "k": self.secret},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        blob = body + hashlib.sha256(body).digest()[:_CHECK_BYTES]
        return TOKEN_PREFIX + base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


def parse_token(text: str) -> EnrollmentToken:
    """The token in ``text`` (surrounding whitespace ignored); ``TokenError`` otherwise."""
    raw = "".join(text.split())
    if not raw.startswith(TOKEN_PREFIX):
        raise TokenError(f"not a vpnd invite token: it must start with {TOKEN_PREFIX!r}")
    if len(raw) > MAX_TOKEN_CHARS:
        raise TokenError(f"invite token is too long ({len(raw)} characters)")
    blob = _b64decode(raw[len(TOKEN_PREFIX) :])
    if len(blob) <= _CHECK_BYTES:
        raise TokenError("invite token is truncated: copy the whole line")
    body, got = blob[:-_CHECK_BYTES], blob[-_CHECK_BYTES:]
    if not hmac.compare_digest(hashlib.sha256(body).digest()[:_CHECK_BYTES], got):
        raise TokenError("invite token is damaged (checksum mismatch): copy it again exactly")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenError("invite token is damaged (its content is not readable)") from None
    if not isinstance(data, dict) or set(data) != {"s", "p", "i", "k"}:
        raise TokenError("invite token has unexpected content (made by another vpnd version?)")
    if not all(isinstance(v, str) for v in data.values()):
        raise TokenError("invite token has unexpected content (made by another vpnd version?)")
    token = EnrollmentToken(
        server=data["s"], ca_pin=data["p"], invite_id=data["i"], secret=data["k"]
    )
    check(token)
    return token


def check(token: EnrollmentToken) -> None:
    """``TokenError`` unless every field has its expected form."""
    parse_server(token.server)
    if not _PIN_RE.fullmatch(token.ca_pin):
        raise TokenError("invite token's CA pin is not a SHA-256 hex fingerprint")
    if not _ID_RE.fullmatch(token.invite_id):
        raise TokenError("invite token's invite id is malformed")
    if not _SECRET_RE.fullmatch(token.secret):
        raise TokenError("invite token's secret is malformed or too short")


def parse_server(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``TokenError`` otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise TokenError(f"gateway address {text!r} is not HOST:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TokenError(f"gateway address {text!r}: the port must be 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise TokenError(f"gateway address {text!r}: bad IPv6 address") from None
        return host[1:-1], int(port_text)
    if ":" in host or not _HOST_RE.fullmatch(host):
        raise TokenError(
            f"gateway address {text!r}: the host must be a DNS name, an IPv4 address "
            "or [an IPv6 address]"
        )
    return host, int(port_text)


def format_server(host: str, port: int) -> str:
    """The ``s`` field for ``host`` and ``port`` (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_invite() -> tuple[str, str]:
    """A fresh (invite id, secret) pair from ``secrets``."""
    return secrets.token_hex(INVITE_ID_BYTES), secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(invite_id: str, secret: str) -> str:
    """What the inventory stores instead of the secret (hex; salted by the invite id)."""
    h = hashlib.sha256(_HASH_DOMAIN + invite_id.encode() + b"\x00" + secret.encode())
    return h.hexdigest()


def secret_matches(invite_id: str, secret: str, stored: str) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(hash_secret(invite_id, secret).encode(), stored.encode())


def ca_pin(cert: x509.Certificate) -> str:
    """The pin of a CA certificate: SHA-256 hex of its DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise TokenError("invite token holds characters a token never has: copy it again")
    if len(text) % 4 == 1:
        raise TokenError("invite token is truncated: copy the whole line")
    try:
        blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("invite token is damaged: copy it again exactly") from None
    # Only the canonical spelling: a changed last character must not decode the same.
    if base64.urlsafe_b64encode(blob).rstrip(b"=").decode() != text:
        raise TokenError("invite token is damaged: copy it again exactly")
    return blob
