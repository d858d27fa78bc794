"""Attack matrix, certificates: pathological certificates, revocation of a re-encoded
certificate, and a CertificateVerify made with someone else's key.

Each hostile certificate is refused by ``verify_peer`` with a stable reason and a
one-line message, and again through a real handshake against an in-process gateway,
which keeps serving the good peer afterwards (real TLS on 127.0.0.1: OpenSSL's own
refusals are part of what is tested).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import threading
from pathlib import Path

import pytest
from attack_fixtures import (
    Hostile,
    Verdict,
    build_hostile,
    der,
    ext,
    hostile_cases,
    oversized_leaf,
    probe,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from inprocess_fixtures import REAL_NOW, World
from pki_fixtures import DAY, NOW, Leaf, _read_tlv, _tlv, make_ca
from test_tls_support import GATEWAY_NAME, build_world

from vpnd.pki import verify_peer
from vpnd.pki.identity import Reason, Role, VerifyError
from vpnd.proto import CloseCode
from vpnd.transport.connection import serve
from vpnd.transport.tlsengine import TlsHandshakeError

pytestmark = pytest.mark.filterwarnings("ignore:Attribute.s length:UserWarning")
CASES = hostile_cases("10.77.0.2")
OPENSSL_CERT_ALERTS = {"certificate_unknown", "bad_certificate", "unsupported_certificate"}


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_pathological_certificate_is_refused_by_verify_peer(case: Hostile) -> None:
    ca = make_ca()
    leaf = build_hostile(ca, case, not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    with pytest.raises(VerifyError) as info:
        verify_peer([der(leaf.cert)], now=NOW, role=Role.PEER, trust=ca.trust())
    assert info.value.reason == case.reason, str(info.value)
    message = str(info.value)
    assert "\n" not in message and "\x00" not in message
    assert len(message) < 300, message  # 5000 SANs must not become a 5000-item message


def test_oversized_certificate_passes_the_verifier_only_because_the_tls_layer_bounds_it() -> None:
    """The size bound is OpenSSL's 100 KiB certificate list (see the handshake test);
    ``verify_peer`` itself parses a 100 KB certificate without trouble."""
    ca = make_ca()
    leaf = oversized_leaf(ca, 100_000, not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    assert len(der(leaf.cert)) > 100_000
    identity = verify_peer([der(leaf.cert)], now=NOW, role=Role.PEER, trust=ca.trust())
    assert identity.name == "alice"


def _files(leaf: Leaf, tmp: Path, label: str) -> tuple[Path, Path]:
    return leaf.write(tmp, label)


async def test_pathological_certificates_through_a_real_handshake(tmp_path: Path) -> None:
    """Hostile certificates signed by the trusted CA get a CLOSE naming the reason; a
    self-signed one and an oversized one are refused by OpenSSL with an alert. The
    gateway keeps no state for any of them and then admits a good peer."""

    w = World(tmp_path, tls=True)  # the TLS edge is what is tested
    await w.start_gateway()
    assert w.gateway is not None
    valid = {"not_before": REAL_NOW - DAY, "not_after": REAL_NOW + 30 * DAY}
    try:
        refusals = 0
        for i, case in enumerate(hostile_cases("10.8.0.2")):
            leaf = build_hostile(w.ca, case, **valid)
            cert, key = _files(leaf, tmp_path, f"hostile{i}")
            verdict = await probe(w.port, w.ca_path, cert, key)
            if verdict.kind == "unloadable":
                # OpenSSL will not even load it to send it; verify_peer's own test
                # above covers a crafted client that would.
                assert case.reason == "malformed", (case.label, verdict)
                continue
            refusals += 1
            if verdict.kind == "alert":  # OpenSSL refused it in the handshake
                assert verdict.text in OPENSSL_CERT_ALERTS, (case.label, verdict)
            else:  # vpnd's own profile check: a CLOSE frame naming the reason
                assert verdict == Verdict("close", CloseCode.AUTH_FAILED, case.reason), (
                    case.label,
                    verdict,
                )
        # Self-signed with 5000 SANs: OpenSSL refuses it before vpnd parses anything.
        stranger = make_ca(
            "stranger",
            networks=["10.8.0.0/24"],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 30 * DAY,
        )
        foreign = build_hostile(stranger, hostile_cases("10.8.0.2")[0], **valid)
        cert, key = _files(foreign, tmp_path, "foreign")
        assert await probe(w.port, w.ca_path, cert, key) == _alert("unknown_ca")
        # Over OpenSSL's 100 KiB certificate-list limit, even from the trusted CA.
        big = oversized_leaf(w.ca, 150_000, **valid)
        cert, key = _files(big, tmp_path, "big")
        verdict = await probe(w.port, w.ca_path, cert, key)
        assert verdict.kind in {"alert", "error"}, verdict
        assert not w.gateway.peers and len(w.gateway.table) == 0
        refused = sum(n for k, n in w.gateway.handshakes.items() if k.startswith("refused_"))
        assert refused == refusals + 2
        # ...and the gateway still serves the peers it trusts.
        good = w.start_client("bob", addr="10.8.0.3")
        await w.until(lambda: good.tun, "the good peer's TUN is up")
    finally:
        await w.close()


def _alert(name: str) -> Verdict:
    return Verdict("alert", text=name)


# ---- revocation by (issuer, serial), whatever the encoding ---------------------------


def _resigned(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The same TBSCertificate signed again: ECDSA is randomised, so the DER (and the
    SHA-256 fingerprint) differ while issuer and serial stay the same."""
    raw = der(cert)
    _, outer, _ = _read_tlv(raw, 0)
    _, _, tbs_end = _read_tlv(raw, outer)
    _, _, alg_end = _read_tlv(raw, tbs_end)
    algorithm = raw[tbs_end:alg_end]
    signature = key.sign(cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_certificate(
        _tlv(0x30, cert.tbs_certificate_bytes + algorithm + _tlv(0x03, b"\x00" + signature))
    )


def test_revocation_by_issuer_and_serial_survives_a_reencoded_certificate() -> None:
    ca = make_ca()
    alice = ca.issue("alice")
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    resigned = _resigned(alice.cert, ca.key)
    # Same serial, re-issued content: another lifetime and an extra extension.
    reissued = ca.raw_leaf(
        "alice",
        key=alice.key,
        serial=alice.cert.serial_number,
        not_before=NOW - 2 * DAY,
        not_after=NOW + 60 * DAY,
        extensions=[ext("1.3.6.1.4.1.99999.9", b"\x05\x00")],
    ).cert
    variants = {"re-signed": resigned, "re-issued": reissued}
    for label, cert in variants.items():
        assert der(cert) != der(alice.cert), label
        assert cert.serial_number == alice.cert.serial_number
        # Not revoked, each variant verifies: the difference is only the encoding.
        verify_peer([der(cert)], now=NOW, role=Role.PEER, trust=ca.trust())
    trust = ca.trust(revoked=[alice.cert.serial_number])
    for label, cert in variants.items():
        with pytest.raises(VerifyError) as info:
            verify_peer([der(cert)], now=NOW, role=Role.PEER, trust=trust)
        assert info.value.reason is Reason.REVOKED, label


async def test_reencoded_revoked_certificate_is_refused_in_the_handshake(tmp_path: Path) -> None:
    w = World(tmp_path, tls=True)  # the TLS edge is what is tested
    alice = w.ca.issue(
        "alice",
        addresses=["10.8.0.2"],
        not_before=REAL_NOW - DAY,
        not_after=REAL_NOW + 30 * DAY,
    )
    assert isinstance(w.ca.key, ec.EllipticCurvePrivateKey)
    twin = _resigned(alice.cert, w.ca.key)
    assert der(twin) != der(alice.cert)
    w.write_crl((alice.cert.serial_number,))
    await w.start_gateway()
    try:
        cert, key = Leaf(twin, alice.key, [twin]).write(tmp_path, "twin")
        verdict = await probe(w.port, w.ca_path, cert, key)
        assert verdict == _alert("certificate_revoked"), verdict
    finally:
        await w.close()


# ---- CertificateVerify signed with the wrong key -------------------------------------


def test_python_ssl_refuses_to_load_a_certificate_with_someone_elses_key(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ctx.load_cert_chain(world.clients["alice"].cert, world.clients["bob"].key)


def _scapy_handshake(world_dir: Path, key_of: str) -> list[tuple[str, str]]:
    """A TLS 1.3 client built with scapy, which (unlike OpenSSL) will present alice's
    certificate and sign CertificateVerify with any key we give it. Returns the
    gateway's refusals."""
    from scapy.layers.tls.automaton_cli import TLSClientAutomaton

    world_dir.mkdir()
    world = build_world(world_dir)
    refusals: list[tuple[str, str]] = []
    ready = threading.Event()
    port: list[int] = []
    # The gateway runs its own loop in a thread (scapy's client blocks this one); it
    # ends on the first refusal, or when the client is done.
    finished: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def gateway() -> None:
        async def main() -> None:
            end = asyncio.Event()
            finished.append((asyncio.get_running_loop(), end))

            def refused(_peer: object, err: TlsHandshakeError) -> None:
                refusals.append((err.reason, err.detail))
                end.set()

            server = await serve(
                "127.0.0.1", 0, world.server_ctx(), lambda conn: None, handshake_timeout=5,
                on_refused=refused,
            )  # fmt: skip
            port.append(server.sockets[0].getsockname()[1])
            ready.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(end.wait(), 20)
            server.close()

        asyncio.run(main())  # this thread's own loop, not a test wrapper

    thread = threading.Thread(target=gateway, daemon=True)
    thread.start()
    assert ready.wait(10)
    # scapy reads traditional-format keys only.
    key = serialization.load_pem_private_key(world.clients[key_of].key.read_bytes(), None)
    trad = world_dir / f"{key_of}-trad.key"
    trad.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    client = TLSClientAutomaton(  # type: ignore[no-untyped-call]
        server="127.0.0.1",
        dport=port[0],
        server_name=GATEWAY_NAME,
        mycert=str(world.clients["alice"].cert),
        mykey=str(trad),
        version="tls13",
        data=[b"quit"],
        curve="secp256r1",
        supported_groups=["secp256r1"],
        supported_signature_algorithms=["sha256+ecdsa"],
        verbose=False,
    )
    try:
        client.run(wait=True)
    except Exception:  # scapy ends with an exception on a fatal alert; the server tells us
        pass
    finally:
        loop, end = finished[0]
        with contextlib.suppress(RuntimeError):  # its loop may be gone already
            loop.call_soon_threadsafe(end.set)
        thread.join(25)
    return refusals


def test_certificate_verify_with_someone_elses_key_is_refused(tmp_path: Path) -> None:
    """Presenting alice's certificate without alice's key: the signature in
    CertificateVerify does not match the certificate, so OpenSSL aborts the handshake."""
    # Control: the same crafted client with alice's own key gets past client
    # authentication and is only refused later, for not offering the vpnd ALPN.
    control = _scapy_handshake(tmp_path / "own", "alice")
    assert [r for r, _ in control] == ["no_application_protocol"], control
    forged = _scapy_handshake(tmp_path / "forged", "bob")
    assert len(forged) == 1, forged
    reason, detail = forged[0]
    assert reason in {"handshake_failure", "decrypt_error"} and "bad signature" in detail


# ---- a self-signed peer certificate --------------------------------------------------


def _self_signed(name: str, address: str, not_before: dt.datetime, not_after: dt.datetime) -> Leaf:
    """A leaf that is its own issuer: clientAuth, a SAN, CA:FALSE, signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Leaf(cert, key, [cert])


async def test_self_signed_peer_certificate_is_refused(tmp_path: Path) -> None:
    ca = make_ca()
    leaf = _self_signed("alice", "10.77.0.2", NOW - DAY, NOW + 30 * DAY)
    with pytest.raises(VerifyError) as info:
        verify_peer([der(leaf.cert)], now=NOW, role=Role.PEER, trust=ca.trust())
    assert info.value.reason is Reason.UNKNOWN_CA

    w = World(tmp_path, tls=True)  # the TLS edge is what is tested
    await w.start_gateway()
    try:
        mine = _self_signed("alice", "10.8.0.2", REAL_NOW - DAY, REAL_NOW + 30 * DAY)
        cert, key = mine.write(tmp_path, "selfie")
        assert await probe(w.port, w.ca_path, cert, key) == _alert("unknown_ca")
    finally:
        await w.close()
