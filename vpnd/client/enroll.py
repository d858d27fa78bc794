"""``vpnd enroll TOKEN --dir DIR``: from an invite token to a ready client, key made here.

1. The key is generated locally; only a CSR (public key) ever leaves this host.
2. Connection one, TLS 1.3 without a client certificate and without verifying the
   gateway: the gateway sends its CA bundle (``ENROLL_CA``). One of those CAs must have
   the token's pin (SHA-256 of its DER), else we stop, having sent nothing.
3. Connection two, verified in the handshake against that pinned CA alone (no system
   store): the secret and the CSR go out (``ENROLL_REQUEST``) only on this one.
4. The answer (``ENROLL_ISSUED``) is checked: the certificate holds our key and chains
   to the pinned CA; client.yaml parses as a client config naming our files. Then key
   (0600), certificate, CA bundle and client.yaml are written together, atomically.

Every failure is one ``EnrollError`` line; the secret and the key are never printed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from vpnd.config import ClientConfig, ConfigError, parse_config
from vpnd.pki.authority import csr_for
from vpnd.pki.enrollment import (
    CA_FILE,
    CERT_FILE,
    CONFIG_FILE,
    CSR_PLACEHOLDER_NAME,
    KEY_FILE,
    enrollment_files,
)
from vpnd.pki.enrollment_token import EnrollmentToken, ca_pin
from vpnd.pki.file_set import write_together
from vpnd.pki.identity import PkiError
from vpnd.pki.keys import PrivateKey, certificate_pem, generate_key, private_key_pem
from vpnd.pki.profile import describe_certificate
from vpnd.proto.enrollment import (
    REFUSAL_TEXT,
    CaBundle,
    EnrollClosed,
    EnrollIssued,
    EnrollmentReader,
    EnrollMessage,
    EnrollRefusal,
    EnrollRefused,
    EnrollRequest,
    encode_request,
    refusal_name,
)
from vpnd.proto.errors import ProtocolError
from vpnd.transport.alerts import describe_alert
from vpnd.transport.connection import connect
from vpnd.transport.stream import Stream
from vpnd.transport.tlsctx import TlsConfigError, enrollment_client_context
from vpnd.transport.tlsengine import TlsAlertReceived, TlsError, TlsHandshakeError

T = TypeVar("T")
DEFAULT_TIMEOUT = 20.0
Dialer = Callable[[bytes | None], Awaitable[Stream]]
"""Opens a certless TLS connection to the gateway: verified against the given pinned CA
PEM, or (None) unverified, for fetching the CA bundle only."""


class EnrollError(Exception):
    """Enrollment failed; ``str(err)`` is one line for the person at the laptop."""


@dataclass(frozen=True, slots=True)
class Enrolled:
    name: str
    serial: str
    not_after: dt.datetime
    files: tuple[Path, ...]
    config: Path


def check_directory(directory: Path, *, force: bool) -> None:
    """Refuse a ``--dir`` that is a file, or that already holds an enrollment."""
    if directory.exists() and not directory.is_dir():
        raise EnrollError(f"{directory} exists and is not a directory")
    if force:
        return
    present = [p.name for p in enrollment_files(directory) if p.exists() or p.is_symlink()]
    if present:
        raise EnrollError(
            f"{directory} already holds {', '.join(present)}: this host looks enrolled; "
            "pass --force to replace them (the old key stops working)"
        )


def tls_dialer(token: EnrollmentToken, *, timeout: float) -> Dialer:
    host, port = token.host, token.port

    async def dial(pinned: bytes | None) -> Stream:
        try:
            ctx = enrollment_client_context(pinned)
        except TlsConfigError as err:
            raise EnrollError(str(err)) from None
        return await connect(host, port, ctx, server_hostname=host, timeout=timeout)

    return dial


async def enroll(
    token: EnrollmentToken,
    directory: Path,
    *,
    dial: Dialer,
    key_type: str = "ecdsa-p256",
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Enrolled:
    check_directory(directory, force=force)
    key = generate_key(key_type)
    csr = csr_for(name=CSR_PLACEHOLDER_NAME, key=key).public_bytes(serialization.Encoding.DER)
    where = token.server
    bundle = await _guarded(where, _fetch_bundle(dial), timeout)
    pinned = _pinned(bundle, token, where)
    pinned_pem = certificate_pem(pinned)
    request = EnrollRequest(token.invite_id, token.secret, csr)
    issued, gateway_names = await _guarded(where, _redeem(dial, pinned_pem, request), timeout)
    return _store(issued, key, pinned, token, directory, gateway_names=gateway_names)


async def _guarded(where: str, aw: Awaitable[T], timeout: float) -> T:
    """Network and TLS failures as one line each."""
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        raise EnrollError(f"no answer from the gateway at {where} within {timeout:g}s") from None
    except TlsHandshakeError as err:
        raise EnrollError(
            f"the gateway at {where} is not certified by the pinned CA ({err.reason}): "
            "wrong address, or someone in between; nothing secret was sent"
        ) from None
    except TlsAlertReceived as err:
        raise EnrollError(_alert_line(where, err.alert)) from None
    except TlsError as err:
        raise EnrollError(f"TLS with the gateway at {where} failed: {err}") from None
    except OSError as err:
        raise EnrollError(f"cannot reach the gateway at {where}: {_os_reason(err)}") from None


def _os_reason(err: OSError) -> str:
    # asyncio words a refused connect as "Connect call failed (addr)": say what failed.
    if err.errno is not None and err.errno > 0:
        return os.strerror(err.errno)
    return str(err.strerror or err or "connection failed")


def _alert_line(where: str, alert: str) -> str:
    if alert == "certificate_required":
        return (
            f"the gateway at {where} does not accept enrollment (it requires a client "
            "certificate): ask the admin to set enrollment.enabled"
        )
    return f"the gateway at {where} refused the connection: {alert} ({describe_alert(alert)})"


async def _fetch_bundle(dial: Dialer) -> EnrollMessage:
    stream = await dial(None)
    try:
        return await _Conversation(stream).next()
    finally:
        stream.close()


async def _redeem(
    dial: Dialer, pinned_pem: bytes, request: EnrollRequest
) -> tuple[EnrollMessage, tuple[str, ...] | None]:
    """The answer, and the DNS names of the (pinned-CA verified) gateway certificate."""
    stream = await dial(pinned_pem)
    names = _dns_names(stream.peer_chain())
    talk = _Conversation(stream)
    try:
        first = await talk.next()
        if not isinstance(first, CaBundle):
            return first, names
        stream.write(encode_request(request))
        return await talk.next(), names
    finally:
        stream.close()


def _dns_names(chain: tuple[bytes, ...]) -> tuple[str, ...] | None:
    """None when the transport shows no chain (an in-memory test pipe)."""
    if not chain:
        return None
    try:
        san = x509.load_der_x509_certificate(chain[0]).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (ValueError, x509.ExtensionNotFound):
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


class _Conversation:
    """Messages from one enrollment connection, in order; the end as an exception."""

    def __init__(self, stream: Stream) -> None:
        self._reader = EnrollmentReader("client")
        self._queue: asyncio.Queue[EnrollMessage | BaseException] = asyncio.Queue()
        stream.set_receiver(self._on_data, self._on_close)

    def _on_data(self, data: bytes) -> None:
        try:
            for msg in self._reader.feed(data):
                self._queue.put_nowait(msg)
        except ProtocolError as err:
            self._queue.put_nowait(EnrollError(f"the gateway sent something unexpected: {err}"))

    def _on_close(self, reason: Exception | None) -> None:
        if isinstance(reason, TlsError):
            self._queue.put_nowait(reason)  # an alert: _guarded says what it means
            return
        self._queue.put_nowait(EnrollError("the gateway closed the connection before answering"))

    async def next(self) -> EnrollMessage:
        got = await self._queue.get()
        if isinstance(got, BaseException):
            raise got
        return got


def _refused_line(msg: EnrollMessage, where: str) -> str:
    if isinstance(msg, EnrollRefused):
        try:
            text = REFUSAL_TEXT[EnrollRefusal(msg.code)]
        except ValueError:
            text = msg.message or "no reason given"
        return f"enrollment refused by {where} ({refusal_name(msg.code)}): {text}"
    if isinstance(msg, EnrollClosed):
        return f"the gateway at {where} closed the connection: {msg.message or msg.code}"
    return f"the gateway at {where} answered out of order ({type(msg).__name__})"


def _pinned(msg: EnrollMessage, token: EnrollmentToken, where: str) -> x509.Certificate:
    if not isinstance(msg, CaBundle):
        raise EnrollError(_refused_line(msg, where))
    try:
        certs = x509.load_pem_x509_certificates(msg.pem)
    except ValueError:
        raise EnrollError(f"the gateway at {where} sent an unreadable CA bundle") from None
    for cert in certs:
        if ca_pin(cert) == token.ca_pin:
            return cert
    shown = ", ".join(ca_pin(c)[:16] for c in certs) or "none"
    raise EnrollError(
        f"wrong pin: the gateway at {where} offers CA {shown}, the token pins "
        f"{token.ca_pin[:16]}: wrong gateway or someone in between; nothing secret was sent"
    )


def _store(
    msg: EnrollMessage,
    key: PrivateKey,
    pinned: x509.Certificate,
    token: EnrollmentToken,
    directory: Path,
    *,
    gateway_names: tuple[str, ...] | None,
) -> Enrolled:
    where = token.server
    if not isinstance(msg, EnrollIssued):
        raise EnrollError(_refused_line(msg, where))
    leaf = _check_chain(msg.cert_pem, key, pinned, where)
    try:
        bundle = x509.load_pem_x509_certificates(msg.ca_pem)
    except ValueError:
        raise EnrollError(f"the gateway at {where} sent an unreadable CA bundle") from None
    if pinned not in bundle:
        raise EnrollError(f"the CA bundle from {where} does not hold the pinned CA")
    config_text = _check_config(msg.client_yaml, directory, where, gateway_names)
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        paths = [directory / n for n in (KEY_FILE, CERT_FILE, CA_FILE, CONFIG_FILE)]
        write_together(
            [
                (paths[0], private_key_pem(key), 0o600),
                (paths[1], msg.cert_pem, 0o644),
                (paths[2], msg.ca_pem, 0o644),
                (paths[3], config_text.encode(), 0o644),
            ]
        )
    except PkiError as err:
        raise EnrollError(f"enrolled, but cannot write the files: {err}") from None
    except OSError as err:
        raise EnrollError(f"cannot create {directory}: {err.strerror or err}") from None
    # Name and serial as the certificate says, not as the message does.
    return Enrolled(
        name=describe_certificate(leaf).name,
        serial=f"{leaf.serial_number:x}",
        not_after=leaf.not_valid_after_utc,
        files=tuple(paths),
        config=paths[3],
    )


def _check_chain(
    cert_pem: bytes, key: PrivateKey, pinned: x509.Certificate, where: str
) -> x509.Certificate:
    """The leaf holds our key; each certificate is signed by the next, the last by the
    pinned CA."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise EnrollError(f"the gateway at {where} sent an unreadable certificate") from None
    if chain[0].public_key() != key.public_key():
        raise EnrollError(f"the certificate from {where} is not for the key made here")
    for cert, issuer in zip(chain, [*chain[1:], pinned], strict=True):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise EnrollError(
                f"the certificate from {where} does not chain to the pinned CA"
            ) from None
    return chain[0]


def _check_config(
    text: str, directory: Path, where: str, gateway_names: tuple[str, ...] | None
) -> str:
    """client.yaml must be a valid client config using exactly the files we write, and
    pin a name the gateway's certificate really carries."""
    try:
        data = yaml.safe_load(text)
        cfg = parse_config(data, source=CONFIG_FILE, base_dir=directory, check_files=False)
    except (yaml.YAMLError, ConfigError) as err:
        raise EnrollError(f"the client.yaml from {where} is not usable: {err}") from None
    if not isinstance(cfg, ClientConfig):
        raise EnrollError(f"the client.yaml from {where} is not a client config")
    base = Path(directory).absolute()
    want = (base / CA_FILE, base / CERT_FILE, base / KEY_FILE)
    got = (cfg.pki.ca, cfg.pki.cert, cfg.pki.key)
    if tuple(Path(p).absolute() for p in got) != want:
        raise EnrollError(f"the client.yaml from {where} names other key/certificate files")
    if gateway_names is not None and cfg.server_name not in gateway_names:
        raise EnrollError(
            f"the client.yaml from {where} pins server_name {cfg.server_name!r}, which the "
            "gateway's certificate does not carry"
        )
    return text
