"""Key generation and loading of keys, certificates and CSRs from files.

Every failure is a ``PkiError`` with one line saying what is wrong with which file;
no ``ValueError`` from cryptography escapes. Private key material never appears in a
message.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from vpnd.pki.identity import PkiError

KEY_TYPES_CA = ("ecdsa-p256", "ecdsa-p384")
KEY_TYPES_LEAF = ("ecdsa-p256", "ed25519")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# Largest file we read as a key/cert/CSR/CRL: anything bigger is a mistake, not PEM.
MAX_FILE_BYTES = 16 * 1024 * 1024

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ecdsa-p256": ec.SECP256R1,
    "ecdsa-p384": ec.SECP384R1,
}


def generate_key(key_type: str) -> PrivateKey:
    """Generate a private key: ``ecdsa-p256``, ``ecdsa-p384`` or ``ed25519``."""
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curve = _CURVES.get(key_type)
    if curve is None:
        known = ", ".join(sorted({*KEY_TYPES_CA, *KEY_TYPES_LEAF}))
        raise PkiError(f"unknown key type {key_type!r}: use one of {known}")
    return ec.generate_private_key(curve())


def key_type(key: object) -> str:
    """Name a private or public key's type: ``ecdsa-p256``, ``ed25519``, ``rsa-2048``..."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        curve = key.curve.name
        return {
            "secp256r1": "ecdsa-p256",
            "secp384r1": "ecdsa-p384",
            "secp521r1": "ecdsa-p521",
        }.get(curve, f"ecdsa-{curve}")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "ed448"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return f"dsa-{key.key_size}"
    return "unknown"


def public_key_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> PublicKey:
    """The certificate's public key if it is a type vpnd uses, else PkiError."""
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise PkiError(f"unsupported public key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key_type(key) in _CURVES:
        return key
    raise PkiError(f"unsupported public key type {key_type(key)}")


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with the best available algorithm when ``passphrase`` is given."""
    if passphrase is not None and not passphrase:
        raise PkiError("the passphrase is empty")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase is not None
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PkiError(f"{p}: {size} bytes is too large for a {what} file")
        return p.read_bytes()
    except PkiError:
        raise
    except FileNotFoundError:
        raise PkiError(f"{p}: no such file (expected a {what})") from None
    except IsADirectoryError:
        raise PkiError(f"{p}: is a directory, not a {what} file") from None
    except OSError as exc:
        raise PkiError(f"{p}: cannot read {what}: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key (PKCS#8 or traditional), decrypting it with ``passphrase``."""
    p = Path(path)
    data = _read(p, "private key")
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise PkiError(f"{p}: not a PEM private key")
    encrypted = (
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    )
    if encrypted and passphrase is None:
        raise PkiError(f"{p.name} is encrypted: give --passphrase-file")
    if not encrypted and passphrase is not None:
        raise PkiError(f"{p.name} is not encrypted but a passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:
        # Encrypted in a way our marker check missed (e.g. traditional Proc-Type header).
        if passphrase is None:
            raise PkiError(f"{p.name} is encrypted: give --passphrase-file") from None
        raise PkiError(f"{p.name} is not encrypted but a passphrase was given") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        if passphrase is not None:
            raise PkiError(f"{p}: wrong passphrase (or a damaged key file)") from None
        raise PkiError(f"{p}: not a valid PEM private key ({_first_line(exc)})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and key_type(key) in _CURVES:
        return key
    raise PkiError(
        f"{p}: unsupported key type {key_type(key)}: vpnd uses ecdsa-p256, ecdsa-p384 or ed25519"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (a single DER certificate is accepted too)."""
    p = Path(path)
    data = _read(p, "certificate")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        if data[:1] == b"\x30":
            try:
                return [x509.load_der_x509_certificate(data)]
            except ValueError as exc:
                raise PkiError(f"{p}: not a valid certificate ({_first_line(exc)})") from None
        raise PkiError(f"{p}: holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{p}: damaged PEM certificate ({_first_line(exc)})") from None


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """The first certificate in a PEM file."""
    return load_certificates(path)[0]


def load_csr(path: str | os.PathLike[str]) -> x509.CertificateSigningRequest:
    """A certificate signing request, PEM or DER."""
    p = Path(path)
    data = _read(p, "certificate signing request")
    try:
        if b"-----BEGIN CERTIFICATE REQUEST-----" in data:
            return x509.load_pem_x509_csr(data)
        if data[:1] == b"\x30":
            return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise PkiError(f"{p}: damaged certificate signing request ({_first_line(exc)})") from None
    raise PkiError(f"{p}: not a certificate signing request (expected PEM 'CERTIFICATE REQUEST')")


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex: the form vpnd logs and pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
