"""The two ``ssl.SSLContext`` profiles of vpnd: TLS 1.3 only, mutual auth, ALPN ``vpnd/1``.

OpenSSL does the chain, EKU and CRL checks inside the handshake so that a refused peer
gets the matching TLS alert (certificate_revoked, unknown_ca, ...) instead of a bare
EOF. vpnd's own checks (``vpnd.pki``) run on top of this after the handshake.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
from pathlib import Path

ALPN = "vpnd/1"

GROUPS = ("X25519", "P-256", "P-384")
"""The only key-exchange groups offered or accepted. OpenSSL's default list also has the
FFDHE groups: an unauthenticated client asking for ffdhe8192 costs the gateway ~175 ms of
CPU per handshake, against 2-3 ms for X25519."""


class TlsConfigError(Exception):
    """A TLS file (CA, CRL, certificate, key) cannot be used; one line naming the file."""


# Security level 2: RSA/DH >= 2048 bits, ECC >= 224 bits, no SHA-1 signatures, in the
# handshake *and* in the chain. The cipher list itself only matters below TLS 1.3.
_CIPHERS = "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(
    *,
    ca: Path,
    cert: Path,
    key: Path,
    crl: Path | None,
    key_passphrase: bytes | None = None,
    extra_crls: tuple[Path, ...] = (),
    client_cert_optional: bool = False,
) -> ssl.SSLContext:
    """Gateway context: requires a client certificate chaining to ``ca``.

    ``client_cert_optional`` (enrollment on): a client may also send *no* certificate;
    one it does send is still verified in the handshake exactly as before. The gateway
    then routes a certless connection to enrollment only, never to a session.

    With ``crl``, every certificate in the client's chain must be covered by a CRL of
    its issuer (VERIFY_CRL_CHECK_CHAIN); a CA without a CRL makes OpenSSL refuse with
    unable-to-get-CRL, i.e. revocation checking fails closed.
    """
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, cert, key, key_passphrase)
    _load_trust(ctx, ca, "CA")
    if crl is not None:
        # cafile=, not cadata=: CPython's cadata loader takes certificates only; the file
        # loader (X509_LOOKUP_file) also reads the CRLs.
        _load_trust(ctx, crl, "CRL")
        for extra in extra_crls:  # the online issuer's CRL: every level needs one
            _load_trust(ctx, extra, "CRL")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    # No session tickets: a resumed session would skip certificate (and CRL) checks.
    ctx.num_tickets = 0
    if client_cert_optional:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(
    *,
    ca: Path,
    cert: Path,
    key: Path,
    key_passphrase: bytes | None = None,
) -> ssl.SSLContext:
    """Peer context: the gateway must chain to ``ca`` and match the pinned DNS name.

    The pinned name is given per connection as ``server_hostname``.
    """
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    _load_chain(ctx, cert, key, key_passphrase)
    _load_trust(ctx, ca, "CA")
    ctx.check_hostname = True
    return ctx


def enrollment_client_context(pinned_ca_pem: bytes | None) -> ssl.SSLContext:
    """``vpnd enroll``'s context: no client certificate (it has none yet).

    With ``pinned_ca_pem`` (the one CA whose SHA-256 the token pins), the gateway must
    chain to it, with the serverAuth EKU, checked in the handshake; no system store is
    ever loaded. Without it, the gateway is *not* verified: only for fetching the CA
    bundle, whose pin the caller checks before sending anything secret.
    """
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    if pinned_ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # Any gateway of the pinned CA may enroll us: the token names an address, not
    # necessarily a name on the certificate. The client.yaml then pins a name.
    ctx.check_hostname = False
    try:
        ctx.load_verify_locations(cadata=pinned_ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as err:
        raise TlsConfigError(f"the pinned CA certificate cannot be used: {err}") from None
    return ctx


def _base(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(_CIPHERS)  # before loading our own cert: the level applies to it too
    ctx.set_alpn_protocols([ALPN])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    set_groups(ctx, GROUPS)
    return ctx


_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list() is a macro over SSL_CTX_ctrl()


def set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...]) -> bool:
    """Limit ``ctx`` to the key-exchange ``groups`` (OpenSSL names), in preference order.

    Python 3.11's ``set_ecdh_curve`` takes exactly one curve, which would lock out clients
    that offer only P-256 or P-384. So call OpenSSL's ``SSL_CTX_set1_groups_list`` on the
    context's ``SSL_CTX`` via ctypes, from the very libssl the ``_ssl`` module uses. The
    pointer sits right after the object header of CPython's ``PySSLContext``; it is
    cross-checked against ``ctx.options`` before use. If any of that is unavailable, fall
    back to X25519 alone (vpnd's own peers always offer it): never to OpenSSL's defaults.
    Returns whether the whole list was applied.
    """
    try:
        ptr = _ssl_ctx_pointer(ctx)
        lib = _libssl()
        ok = lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ":".join(groups).encode())
    except (OSError, AttributeError, ValueError):
        ok = 0
    if ok != 1:
        ctx.set_ecdh_curve("X25519")
        return False
    return True


_LIB: ctypes.CDLL | None = None


def _libssl() -> ctypes.CDLL:
    global _LIB  # noqa: PLW0603 - one dlopen per process
    if _LIB is None:
        lib = ctypes.CDLL(_ssl.__file__)  # dlsym searches its libssl dependency too
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        _LIB = lib
    return _LIB


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` inside ``ctx``; ValueError if it cannot be confirmed."""
    if type(ctx) is not ssl.SSLContext:
        raise ValueError("not a plain ssl.SSLContext")
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise ValueError("no SSL_CTX")
    # Same options through OpenSSL as through Python: it is this context's SSL_CTX.
    if _libssl().SSL_CTX_get_options(ptr) != int(ctx.options):
        raise ValueError("SSL_CTX pointer does not match the context")
    return ptr


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, passphrase: bytes | None) -> None:
    for path, what in ((cert, "certificate"), (key, "private key")):
        _check_readable(path, what)

    def _password() -> bytes:
        if passphrase is None:
            # Called only for an encrypted key; fail with a message, never prompt.
            raise TlsConfigError(f"private key {key} is encrypted but no passphrase was given")
        return passphrase

    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key, password=_password)
    except TlsConfigError:
        raise
    except ssl.SSLError as err:
        raise TlsConfigError(
            f"cannot use certificate {cert} with key {key}: {_ssl_reason(err)}"
        ) from None
    except (OSError, ValueError) as err:
        raise TlsConfigError(f"cannot load certificate {cert} with key {key}: {err}") from None


def _load_trust(ctx: ssl.SSLContext, path: Path, what: str) -> None:
    _check_readable(path, what)
    try:
        before = ctx.cert_store_stats()
        ctx.load_verify_locations(cafile=path)
        after = ctx.cert_store_stats()
    except ssl.SSLError as err:
        raise TlsConfigError(f"cannot load {what} file {path}: {_ssl_reason(err)}") from None
    except OSError as err:
        raise TlsConfigError(f"cannot read {what} file {path}: {err.strerror}") from None
    key = "crl" if what == "CRL" else "x509_ca"
    if after[key] <= before[key]:
        kind = "CRL" if what == "CRL" else "CA certificate"
        raise TlsConfigError(f"{what} file {path} contains no PEM {kind}")


def _check_readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise TlsConfigError(f"{what} file {path} does not exist or is not a regular file")


def _ssl_reason(err: ssl.SSLError) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    return str(err.strerror or err)
