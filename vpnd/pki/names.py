"""Canonical forms of the names that go into certificates.

A peer name becomes a certificate CN, a file name in the PKI directory and a key in
the inventory, so it is deliberately narrow: lowercase ASCII letters, digits and
hyphens, no dots (OpenSSL checks a dotted CN against DNS name constraints).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import NameOID

from vpnd.pki.identity import PkiError

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_GROUP_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_DNS_NAME = 253


def _shown(raw: str) -> str:
    # Keep error messages on one short line whatever the input was.
    text = raw if len(raw) <= 40 else raw[:40] + "..."
    return repr(text)


def canonical_name(raw: str) -> str:
    """Return the canonical peer name for ``raw`` (stripped, lowercased) or raise PkiError."""
    if not isinstance(raw, str):
        raise PkiError(f"peer name must be a string, not {type(raw).__name__}")
    name = raw.strip().lower()
    if not name:
        raise PkiError("peer name is empty")
    if not name.isascii():
        raise PkiError(f"peer name {_shown(raw)} is not ASCII: use a-z, 0-9 and '-'")
    if len(name) > 63:
        raise PkiError(f"peer name {_shown(raw)} is {len(name)} characters long: at most 63")
    if not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"peer name {_shown(raw)} is invalid: use a-z, 0-9 and '-', starting with a "
            "letter or digit (no dots, slashes or spaces)"
        )
    return name


def canonical_group(raw: str) -> str:
    """Return the canonical firewall group name for ``raw`` or raise PkiError."""
    if not isinstance(raw, str):
        raise PkiError(f"group name must be a string, not {type(raw).__name__}")
    group = raw.strip().lower()
    if not group:
        raise PkiError("group name is empty")
    if not group.isascii() or len(group) > 63 or not _GROUP_RE.fullmatch(group):
        raise PkiError(
            f"group name {_shown(raw)} is invalid: use 1-63 of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return group


def canonical_dns_name(raw: str) -> str:
    """Return the canonical DNS name (lowercase, no trailing dot, no wildcard) or raise."""
    if not isinstance(raw, str):
        raise PkiError(f"DNS name must be a string, not {type(raw).__name__}")
    dns = raw.strip().lower().removesuffix(".")
    if not dns:
        raise PkiError("DNS name is empty")
    if not dns.isascii():
        raise PkiError(f"DNS name {_shown(raw)} is not ASCII: give the IDNA (xn--) form")
    if len(dns) > _MAX_DNS_NAME:
        raise PkiError(f"DNS name {_shown(raw)} is longer than {_MAX_DNS_NAME} characters")
    for label in dns.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise PkiError(
                f"DNS name {_shown(raw)} is invalid: each label is 1-63 of a-z, 0-9 and '-' "
                "(no wildcards, no leading or trailing '-')"
            )
    return dns


def lineage(name: x509.Name) -> str:
    """A CA's lineage: its DN without generationQualifier. A rotated root is the next
    generation of the same CA, so a peer's name under either is the same peer."""
    kept = [
        x509.RelativeDistinguishedName([a for a in rdn if a.oid != NameOID.GENERATION_QUALIFIER])
        for rdn in name.rdns
        if any(a.oid != NameOID.GENERATION_QUALIFIER for a in rdn)
    ]
    return x509.Name(kept).rfc4514_string()
