"""Refusals leak no other peer's identity; logs carry names, serials and fingerprints only.

A tunnel scenario runs in process (real TLS, faked kernel) with every log record captured
as both text and JSON lines, then the captured output is searched for any encoding of any
certificate involved: PEM armour, base64 of the DER, hex of the DER and Python's bytes repr.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from inprocess_fixtures import REAL_NOW, World, issue_leaf, owners
from pki_fixtures import make_ca

from vpnd.pki.profile import describe_certificate
from vpnd.telemetry.logsetup import JsonFormatter, TextFormatter


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handlers = []
    for fmt in (TextFormatter(), JsonFormatter()):
        h = logging.StreamHandler(out)
        h.setFormatter(fmt)
        h.setLevel(logging.DEBUG)
        handlers.append(h)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    try:
        yield out
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(old_level)


def _encodings(der: bytes) -> list[str]:
    """Recognisable fragments of a certificate in any encoding a log line might use."""
    b64 = base64.b64encode(der).decode()
    body = der[20:60]  # past the fixed ASN.1 header: unique to this certificate
    return [
        b64[40:104],
        base64.b64encode(body).decode()[:32],
        body.hex(),
        body.hex(":"),
        repr(body)[2:40],
    ]


async def test_address_conflict_names_nobody_and_logs_hold_no_certificates(
    tmp_path: Path, captured: io.StringIO
) -> None:
    ders: list[bytes] = []

    w = World(tmp_path, tls=True)  # the handshake refusal is audited too
    await w.start_gateway()
    try:
        alice_leaf = issue_leaf(w, "alice", "10.8.0.2")
        eve_leaf = issue_leaf(w, "eve", "10.8.0.2")
        ders.extend(
            c.public_bytes(Encoding.DER) for c in (alice_leaf.cert, eve_leaf.cert, w.ca.cert)
        )
        alice = w.start_client("alice", leaf=alice_leaf)
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        eve = w.start_client("eve", leaf=eve_leaf)
        await w.until(lambda: eve.client.last_outcome is not None, "eve refused")
        eve.client.stop()
        outcome = eve.client.last_outcome
        assert outcome is not None and not outcome.established
        assert "10.8.0.2" in outcome.message  # its own claim: fine to tell
        info = describe_certificate(alice_leaf.cert)
        for secret in ("alice", f"{info.serial:x}", info.fingerprint, info.fingerprint[:16]):
            assert secret.lower() not in outcome.message.lower(), outcome.message
        assert owners(w) == {"alice": ["10.8.0.2/32"]}
        # a peer of an untrusted CA is refused too, and audited by name only
        mallory = w.start_client(
            "mallory",
            ca=make_ca(
                "evil-ca",
                networks=[ipaddress.ip_network("10.8.0.0/24")],
                not_before=REAL_NOW - dt.timedelta(days=1),
                not_after=REAL_NOW + dt.timedelta(days=100),
            ),
            addr="10.8.0.9",
        )
        await w.until(lambda: mallory.client.last_outcome is not None, "mallory refused")
        mallory.client.stop()
    finally:
        await w.close()

    logs = captured.getvalue()
    # the gateway's own log says who holds the address
    assert "already owned by alice" in logs
    assert "refused eve: address conflict with alice" in logs
    assert "BEGIN CERTIFICATE" not in logs
    assert "PRIVATE KEY" not in logs
    for der in ders:
        for fragment in _encodings(der):
            assert fragment not in logs, f"a certificate body appears in the logs: {fragment}"
