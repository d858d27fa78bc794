"""Typed, exception-safe access to certificate and CRL extensions.

cryptography parses extensions lazily and raises ValueError or TypeError on malformed
ones (duplicate extensions, bad name constraints...); here that becomes PkiError.
"""

from __future__ import annotations

from typing import TypeVar

from cryptography import x509

from vpnd.pki.identity import PkiError

T = TypeVar("T", bound=x509.ExtensionType)


def all_extensions(
    obj: x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest,
) -> x509.Extensions:
    """The object's extensions; PkiError when they do not parse."""
    try:
        return obj.extensions
    except (ValueError, TypeError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise PkiError(f"malformed extensions: {detail}") from None


def get_extension(
    obj: x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest,
    cls: type[T],
) -> T | None:
    """The value of the ``cls`` extension, None when absent; PkiError when malformed."""
    try:
        return all_extensions(obj).get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def get_extension_or_none(
    obj: x509.Certificate | x509.CertificateRevocationList, cls: type[T]
) -> T | None:
    """Like ``get_extension`` but a malformed extension counts as absent."""
    try:
        return get_extension(obj, cls)
    except PkiError:
        return None
