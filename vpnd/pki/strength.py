"""Key and signature strength rules, applied by vpnd itself.

cryptography's verifier accepts RSA-1024 and small curves, so these are checked
explicitly on every certificate of a chain and on CRLs.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

MIN_RSA_BITS = 2048
STRONG_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})

_WEAK_SIGNATURE_OIDS = {
    SignatureAlgorithmOID.RSA_WITH_MD5: "md5WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "sha1WithRSAEncryption",
    SignatureAlgorithmOID._RSA_WITH_SHA1: "sha1WithRSA",
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "ecdsa-with-SHA1",
    SignatureAlgorithmOID.DSA_WITH_SHA1: "dsa-with-SHA1",
    x509.ObjectIdentifier("1.2.840.113549.1.1.2"): "md2WithRSAEncryption",
    x509.ObjectIdentifier("1.2.840.113549.1.1.3"): "md4WithRSAEncryption",
}


def weak_key(cert: x509.Certificate) -> str | None:
    """Why the certificate's public key is too weak, or None."""
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return f"unsupported public key algorithm {cert.public_key_algorithm_oid.dotted_string}"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})"
        if key.key_size % 8:
            return f"RSA modulus of {key.key_size} bits is not a whole number of bytes"
        return None
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA keys are not accepted"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in STRONG_CURVES:
            return f"elliptic curve {key.curve.name} is not accepted (use P-256 or P-384)"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return None
    return f"public key type {type(key).__name__} is not accepted"


def weak_signature(
    signed: x509.Certificate | x509.CertificateRevocationList,
) -> str | None:
    """Why the object's signature algorithm is too weak (SHA-1, MD5...), or None."""
    oid = signed.signature_algorithm_oid
    if oid in _WEAK_SIGNATURE_OIDS:
        return f"signature algorithm {_WEAK_SIGNATURE_OIDS[oid]} is too weak"
    try:
        algorithm = signed.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None  # unknown algorithms fail signature checking later, with their own reason
    if isinstance(algorithm, hashes.SHA1 | hashes.MD5):
        return f"signature hash {algorithm.name} is too weak"
    return None
