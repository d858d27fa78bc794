"""Helpers for the attack tests (no tests of its own): hostile certificates and a raw
client that reports exactly how the gateway answered.

``probe`` dials a gateway with any certificate and key, says HELLO, and returns the
first verdict: the CONFIG it was given, the CLOSE frame it got (code + message), or the
TLS alert that ended the handshake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID, ObjectIdentifier
from pki_fixtures import Leaf, TestCA

from vpnd.pki.authority import MAX_ADDRESSES
from vpnd.pki.identity import OID_PEER_ATTRIBUTES
from vpnd.proto import ConfigReceived, Session, SessionClosed, SessionConfig
from vpnd.transport.connection import connect
from vpnd.transport.stream import Stream
from vpnd.transport.tlsctx import TlsConfigError, client_context
from vpnd.transport.tlsengine import TlsAlertReceived, TlsError

PRIVATE_ARC = "1.3.6.1.4.1.99999"  # an arc no real extension uses


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def nested_sequences(depth: int, inner: bytes = b"\x05\x00") -> bytes:
    """``depth`` SEQUENCEs, each holding the next: a parser-recursion bomb."""
    out = inner
    for _ in range(depth):
        out = b"\x30" + der_len(len(out)) + out
    return out


def octet_string(size: int) -> bytes:
    return b"\x04" + der_len(size) + os.urandom(size)


def ext(
    oid: str | ObjectIdentifier, value: bytes, critical: bool = False
) -> tuple[x509.ExtensionType, bool]:
    """A raw extension with any OID (also a known one) and any value bytes."""
    if isinstance(oid, str):
        oid = ObjectIdentifier(oid)
    return (x509.UnrecognizedExtension(oid, value), critical)


@dataclass(frozen=True)
class Hostile:
    """One pathological certificate case: how to build it and what verify_peer says."""

    label: str
    reason: str
    kwargs: dict[str, object]


def hostile_cases(first_address: str) -> list[Hostile]:
    """Certificates vpnctl would never issue, each with the stable reason it must get."""
    base = ipaddress.ip_address(first_address)
    many_ips = [str(base + i) for i in range(5000)]
    return [
        Hostile("5000 iPAddress SANs", "bad_extension", {"addresses": many_ips}),
        Hostile(
            "5000 DNS SANs",
            "bad_extension",
            {"dns_names": [f"h{i}.example.net" for i in range(5000)]},
        ),
        Hostile("NUL byte in the CN", "bad_name", {"name": "ali\x00ce"}),
        Hostile("newline in the CN", "bad_name", {"name": "alice\nERROR forged line"}),
        Hostile("200-character CN", "bad_name", {"name": "a" * 200}),
        Hostile("NUL byte in a DNS SAN", "bad_name", {"dns_names": ["gw.test\x00.evil.example"]}),
        Hostile(
            "garbage keyUsage (known OID, wrong type)",
            "malformed",
            {"extensions": [ext(ExtensionOID.KEY_USAGE, b"\x30\x03abc", critical=True)]},
        ),
        Hostile(
            "3000-deep nesting in nameConstraints",
            "malformed",
            {"extensions": [ext(ExtensionOID.NAME_CONSTRAINTS, nested_sequences(3000), True)]},
        ),
        Hostile(
            "3000-deep nesting in the vpnd peer-attributes extension",
            "bad_extension",
            {"extensions": [ext(OID_PEER_ATTRIBUTES, nested_sequences(3000))]},
        ),
        Hostile(
            "garbage in the vpnd peer-attributes extension",
            "bad_extension",
            {"extensions": [ext(OID_PEER_ATTRIBUTES, b"\xff" * 64)]},
        ),
        Hostile(
            "unknown critical extension",
            "chain_invalid",
            {"extensions": [ext(f"{PRIVATE_ARC}.3", b"\x05\x00", critical=True)]},
        ),
    ]


def build_hostile(
    ca: TestCA, case: Hostile, *, not_before: dt.datetime, not_after: dt.datetime
) -> Leaf:
    kwargs = dict(case.kwargs)
    name = str(kwargs.pop("name", "alice"))
    # _validate=False: cryptography would refuse to *build* a 200-character CN.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name, _validate=False)])
    return ca.raw_leaf(
        name,
        subject=subject,
        not_before=not_before,
        not_after=not_after,
        **kwargs,  # type: ignore[arg-type]
    )


def oversized_leaf(
    ca: TestCA, size: int, *, not_before: dt.datetime, not_after: dt.datetime
) -> Leaf:
    """A leaf padded to about ``size`` bytes with a non-critical unknown extension."""
    return ca.raw_leaf(
        "alice",
        extensions=[ext(f"{PRIVATE_ARC}.1", octet_string(size))],
        not_before=not_before,
        not_after=not_after,
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


assert MAX_ADDRESSES < 5000  # the huge-SAN case must stay above the verifier's bound


# ---- a raw client ----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How the gateway answered: ``kind`` is config, close, alert or error (or
    unloadable: OpenSSL would not load the certificate to send it)."""

    kind: str
    code: int | None = None
    text: str = ""


async def probe(
    port: int,
    ca_path: Path,
    cert: Path,
    key: Path,
    *,
    server_name: str = "gw.test",
    timeout: float = 10.0,
) -> Verdict:
    """Dial 127.0.0.1:``port`` as a client with ``cert``/``key``, say HELLO, report."""
    conn = await _dial(port, ca_path, cert, key, server_name=server_name, timeout=timeout)
    if isinstance(conn, Verdict):
        return conn
    try:
        return await hello_verdict(conn, timeout)
    finally:
        conn.abort()


async def _dial(
    port: int, ca_path: Path, cert: Path, key: Path, *, server_name: str, timeout: float
) -> Stream | Verdict:
    """A TLS stream to the gateway, or the verdict that ended it before any session."""
    try:
        ctx = client_context(ca=ca_path, cert=cert, key=key)
    except TlsConfigError as err:
        return Verdict("unloadable", text=str(err))
    try:
        return await connect("127.0.0.1", port, ctx, server_hostname=server_name, timeout=timeout)
    except TlsAlertReceived as err:
        return Verdict("alert", text=err.alert)
    except (TlsError, OSError) as err:
        return Verdict("error", text=str(err))


async def hello_verdict(conn: Stream, timeout: float) -> Verdict:
    """Say HELLO on ``conn``; the first answer: CONFIG, CLOSE, or how the stream ended."""
    session = Session(SessionConfig(role="client"), time.monotonic())
    verdict: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()

    def settle(v: Verdict) -> None:
        if not verdict.done():
            verdict.set_result(v)

    def on_data(data: bytes) -> None:
        session.receive_data(data, time.monotonic())
        while (ev := session.next_event()) is not None:
            if isinstance(ev, ConfigReceived):
                settle(Verdict("config", text=str(ev.config.address)))
            elif isinstance(ev, SessionClosed):
                settle(Verdict("close", code=int(ev.code), text=ev.message))

    def on_close(reason: Exception | None) -> None:
        if isinstance(reason, TlsAlertReceived):
            settle(Verdict("alert", text=reason.alert))
        else:
            settle(Verdict("error", text=str(reason)))

    conn.set_receiver(on_data, on_close)
    conn.write(session.data_to_send())  # HELLO
    async with asyncio.timeout(timeout):
        return await verdict
