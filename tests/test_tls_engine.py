"""TlsEngine, contexts and alert mapping, driven purely in memory (no sockets)."""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_tls_support import GATEWAY_NAME, World, build_world, issue, make_ca, write_pair

from vpnd.transport.alerts import alert_from_ssl_error, describe_alert, is_peer_alert
from vpnd.transport.tlsctx import ALPN, TlsConfigError, client_context, server_context
from vpnd.transport.tlsengine import (
    TlsAlertReceived,
    TlsClosed,
    TlsEngine,
    TlsHandshakeError,
    TlsStateError,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("pki"))


def pair(
    world: World, client: str | ssl.SSLContext = "alice", *, hostname: str = GATEWAY_NAME
) -> tuple[TlsEngine, TlsEngine]:
    cctx = world.client_ctx(client) if isinstance(client, str) else client
    c = TlsEngine(cctx, server_side=False, server_hostname=hostname)
    s = TlsEngine(world.server_ctx(), server_side=True)
    return c, s


def shuttle(a: TlsEngine, b: TlsEngine) -> None:
    """Move pending ciphertext both ways once."""
    b.receive(a.outgoing())
    a.receive(b.outgoing())


def handshake(c: TlsEngine, s: TlsEngine) -> None:
    """Run both handshakes to completion; any failure propagates."""
    for _ in range(10):  # TLS 1.3 needs 1.5 round trips; 10 is a generous bound
        c_done = c.handshake()
        s.receive(c.outgoing())
        s_done = s.handshake()
        c.receive(s.outgoing())
        if c_done and s_done:
            return
    raise AssertionError("handshake did not finish")


def refuse(c: TlsEngine, s: TlsEngine) -> tuple[TlsHandshakeError, TlsAlertReceived]:
    """A handshake the server refuses: its error, and what the client then reads."""
    c.handshake()
    s.receive(c.outgoing())
    s.handshake()  # ServerHello..Finished
    c.receive(s.outgoing())
    assert c.handshake() is True  # TLS 1.3: the client is done before the server judges it
    s.receive(c.outgoing())
    with pytest.raises(TlsHandshakeError) as refused:
        s.handshake()
    assert refused.value.sent_alert
    c.receive(s.outgoing())
    with pytest.raises(TlsAlertReceived) as received:
        c.read()
    return refused.value, received.value


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


# -- handshake and data ------------------------------------------------------------


def test_mutual_handshake_alpn_and_data_both_ways(world: World) -> None:
    c, s = pair(world)
    handshake(c, s)
    assert (c.alpn, s.alpn) == (ALPN, ALPN)
    assert c.version == s.version == "TLSv1.3"
    c.write(b"ping")
    s.receive(c.outgoing())
    assert s.read() == b"ping"
    s.write(memoryview(b"pong"))
    c.receive(s.outgoing())
    assert c.read() == b"pong"
    assert c.read() == b""  # nothing more pending


def test_peer_chain_is_leaf_first_and_verified(world: World) -> None:
    c, s = pair(world)
    handshake(c, s)
    assert s.peer_chain_der() == [der(world.clients["alice"].cert), der(world.ca_file)]
    assert c.peer_chain_der() == [der(world.gateway.cert), der(world.ca_file)]


def test_one_megabyte_in_odd_sized_chunks_arrives_intact(world: World) -> None:
    c, s = pair(world)
    handshake(c, s)
    payload = hashlib.shake_256(b"vpnd").digest(1 << 20)
    for start in range(0, len(payload), 50_000):
        c.write(payload[start : start + 50_000])
    wire = c.outgoing()
    received = bytearray()
    for start in range(0, len(wire), 1337):  # cuts records at arbitrary points
        s.receive(wire[start : start + 1337])
        received += s.read()
    assert bytes(received) == payload


def test_data_before_close_notify_is_returned_first(world: World) -> None:
    c, s = pair(world)
    handshake(c, s)
    s.write(b"last words")
    s.close()
    s.close()  # idempotent
    c.receive(s.outgoing())
    assert c.read() == b"last words"
    with pytest.raises(TlsClosed):
        c.read()
    with pytest.raises(TlsClosed):  # sticky
        c.read()


def test_use_before_handshake_or_after_close_is_a_state_error(world: World) -> None:
    c, s = pair(world)
    with pytest.raises(TlsStateError):
        c.write(b"early")
    with pytest.raises(TlsStateError):
        s.read()
    handshake(c, s)
    c.close()
    with pytest.raises(TlsStateError):
        c.write(b"late")


def test_client_engine_requires_the_pinned_name(world: World) -> None:
    with pytest.raises(ValueError, match="server_hostname"):
        TlsEngine(world.client_ctx(), server_side=False)


# -- refusals by the server: reason on the server, alert on the client --------------


@pytest.mark.parametrize(
    ("client", "reason", "detail"),
    [
        ("eve", "unknown_ca", "unable to get local issuer certificate"),
        ("bob", "certificate_revoked", "certificate revoked"),
        ("carol", "certificate_expired", "certificate has expired"),
        ("dave", "bad_certificate", "certificate is not yet valid"),
        ("srv", "unsupported_certificate", "unsuitable certificate purpose"),
        ("far", "certificate_unknown", "permitted subtree violation"),
    ],
)
def test_server_refuses_with_the_matching_alert(
    world: World, client: str, reason: str, detail: str
) -> None:
    # eve's own context trusts our CA: she is refused for *her* certificate only.
    c, s = pair(world, client)
    refused, received = refuse(c, s)
    assert refused.reason == reason
    assert refused.detail == detail
    assert received.alert == reason
    with pytest.raises(TlsHandshakeError):  # a failed engine stays failed
        s.handshake()


def test_no_client_certificate_is_certificate_required(world: World) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=world.ca_file)
    bare.set_alpn_protocols([ALPN])
    refused, received = refuse(*pair(world, bare))
    assert refused.reason == received.alert == "certificate_required"


def test_weak_client_key_is_refused_by_security_level(world: World) -> None:
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the *client* load an RSA-1024 key
    weak.load_verify_locations(cafile=world.ca_file)
    weak.load_cert_chain(world.clients["weak"].cert, world.clients["weak"].key)
    weak.set_alpn_protocols([ALPN])
    refused, received = refuse(*pair(world, weak))
    assert refused.reason == received.alert == "bad_certificate"
    assert refused.detail == "EE certificate key too weak"


def test_trusted_ca_without_crl_fails_closed(world: World, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(world.ca_file.read_bytes() + world.other_ca_file.read_bytes())
    c = TlsEngine(world.client_ctx("eve"), server_side=False, server_hostname=GATEWAY_NAME)
    s = TlsEngine(world.server_ctx(ca=both), server_side=True)
    refused, received = refuse(c, s)
    assert refused.detail == "unable to get certificate CRL"
    assert received.alert == "unknown_ca"


def test_tls12_client_gets_protocol_version_during_handshake(world: World) -> None:
    old = world.client_ctx()
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    c, s = pair(world, old)
    c.handshake()
    s.receive(c.outgoing())
    with pytest.raises(TlsHandshakeError) as refused:
        s.handshake()
    assert refused.value.reason == "protocol_version"
    assert refused.value.sent_alert
    c.receive(s.outgoing())
    with pytest.raises(TlsAlertReceived) as received:
        c.handshake()
    assert received.value.alert == "protocol_version"
    assert "TLS 1.3 only" in str(received.value)


def test_client_without_alpn_is_refused_with_close_notify(world: World) -> None:
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.load_verify_locations(cafile=world.ca_file)
    alice = world.clients["alice"]
    plain.load_cert_chain(alice.cert, alice.key)
    plain.set_alpn_protocols(["h2"])
    obj_in, obj_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = plain.wrap_bio(obj_in, obj_out, server_hostname=GATEWAY_NAME)
    s = TlsEngine(world.server_ctx(), server_side=True)
    failure: TlsHandshakeError | None = None
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        s.receive(obj_out.read())
        try:
            s.handshake()
        except TlsHandshakeError as err:
            failure = err
            break
        obj_in.write(s.outgoing())
    assert failure is not None
    assert failure.reason == "no_application_protocol"
    close_notify = s.outgoing()
    assert close_notify
    obj_in.write(close_notify)
    # What a foreign client sees: a clean close (CPython's read() gives b"" for it).
    assert client.read(10) == b""


def test_client_refuses_a_server_that_does_not_select_vpnd_alpn(world: World) -> None:
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    foreign.load_cert_chain(world.gateway.cert, world.gateway.key)  # right cert, no ALPN
    c = TlsEngine(world.client_ctx(), server_side=False, server_hostname=GATEWAY_NAME)
    s = TlsEngine(foreign, server_side=True)
    with pytest.raises(TlsHandshakeError) as err:
        handshake(c, s)
    assert err.value.reason == "no_application_protocol"


# -- refusals by the client ----------------------------------------------------------


def test_client_refuses_gateway_with_wrong_dns_name(world: World) -> None:
    c, s = pair(world, hostname="other.vpn.test")
    c.handshake()
    s.receive(c.outgoing())
    s.handshake()
    c.receive(s.outgoing())
    with pytest.raises(TlsHandshakeError) as refused:
        c.handshake()
    assert refused.value.reason == "bad_certificate"
    assert "Hostname mismatch" in refused.value.detail
    assert refused.value.sent_alert
    s.receive(c.outgoing())
    with pytest.raises(TlsAlertReceived) as received:
        s.handshake()
    assert received.value.alert == "bad_certificate"


def test_client_refuses_gateway_from_untrusted_ca(world: World) -> None:
    c, s = pair(world, world.client_ctx(ca=world.other_ca_file))
    c.handshake()
    s.receive(c.outgoing())
    s.handshake()
    c.receive(s.outgoing())
    with pytest.raises(TlsHandshakeError) as refused:
        c.handshake()
    assert refused.value.reason == "unknown_ca"


# -- garbage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n", "decode_error"),
        (b"\x00" * 64, "protocol_version"),
        (b"\x16\x03\x01\xff\xff", "decode_error"),
        (b"\x16\x03\x01\x00\x05hello", "unexpected_message"),
    ],
)
def test_garbage_fails_the_server_handshake(world: World, data: bytes, reason: str) -> None:
    s = TlsEngine(world.server_ctx(), server_side=True)
    s.receive(data)
    with pytest.raises(TlsHandshakeError) as err:
        s.handshake()
    assert err.value.reason == reason


# -- alert mapping and descriptions --------------------------------------------------


def _ssl_error(reason: str, verify_code: int | None = None) -> ssl.SSLError:
    err: ssl.SSLError = (
        ssl.SSLCertVerificationError(1, "x") if verify_code is not None else ssl.SSLError(1, "x")
    )
    err.reason = reason
    if verify_code is not None:
        err.verify_code = verify_code  # type: ignore[attr-defined]
    return err


@pytest.mark.parametrize(
    ("reason", "code", "alert", "peer"),
    [
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", None, "certificate_revoked", True),
        ("TLSV1_ALERT_UNKNOWN_CA", None, "unknown_ca", True),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", None, "certificate_required", True),
        ("TLSV1_ALERT_NO_APPLICATION_PROTOCOL", None, "no_application_protocol", True),
        ("TLSV1_ALERT_USER_CANCELLED", None, "user_canceled", True),
        ("TLSV1_UNRECOGNIZED_NAME", None, "unrecognized_name", True),
        ("CERTIFICATE_VERIFY_FAILED", 23, "certificate_revoked", False),
        ("CERTIFICATE_VERIFY_FAILED", 20, "unknown_ca", False),
        ("CERTIFICATE_VERIFY_FAILED", 10, "certificate_expired", False),
        ("CERTIFICATE_VERIFY_FAILED", 26, "unsupported_certificate", False),
        ("CERTIFICATE_VERIFY_FAILED", 47, "certificate_unknown", False),
        ("WRONG_VERSION_NUMBER", None, "protocol_version", False),
        ("UNSUPPORTED_PROTOCOL", None, "protocol_version", False),
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", None, "certificate_required", False),
        ("SOMETHING_NEW", None, "handshake_failure", False),
    ],
)
def test_alert_from_ssl_error(reason: str, code: int | None, alert: str, peer: bool) -> None:
    err = _ssl_error(reason, code)
    assert alert_from_ssl_error(err) == alert
    assert is_peer_alert(err) is peer


def test_describe_alert_speaks_plainly() -> None:
    assert "does not trust the CA" in describe_alert("unknown_ca")
    assert "revoked" in describe_alert("certificate_revoked")
    assert "ask your admin for a new one" in describe_alert("certificate_revoked")
    assert "expired" in describe_alert("certificate_expired")
    assert "check the clock" in describe_alert("certificate_expired")
    assert "TLS 1.3" in describe_alert("protocol_version")
    assert "record_overflow" in describe_alert("record_overflow")  # unknown: named as is


# -- contexts ------------------------------------------------------------------------


def test_contexts_are_tls13_only_mutual_with_crl_checks(world: World) -> None:
    s = world.server_ctx()
    c = world.client_ctx()
    for ctx in (s, c):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert s.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    assert s.num_tickets == 0
    assert c.check_hostname
    no_crl = server_context(
        ca=world.ca_file, cert=world.gateway.cert, key=world.gateway.key, crl=None
    )
    assert not no_crl.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN


def test_encrypted_key_needs_its_passphrase(world: World, tmp_path: Path) -> None:
    issued = issue(make_ca("x-ca"), "x")
    files = write_pair(tmp_path, "x", issued, passphrase=b"s3cret")
    ok = client_context(ca=world.ca_file, cert=files.cert, key=files.key, key_passphrase=b"s3cret")
    assert ok.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsConfigError, match="encrypted but no passphrase"):
        client_context(ca=world.ca_file, cert=files.cert, key=files.key)
    with pytest.raises(TlsConfigError, match=str(files.key)):
        client_context(ca=world.ca_file, cert=files.cert, key=files.key, key_passphrase=b"nope")


def test_config_errors_name_the_file(world: World, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem\n")
    missing = tmp_path / "missing.pem"
    gw = world.gateway
    alice = world.clients["alice"]
    cases: list[tuple[Callable[[], ssl.SSLContext], Path]] = [
        (lambda: server_context(ca=missing, cert=gw.cert, key=gw.key, crl=None), missing),
        (lambda: server_context(ca=junk, cert=gw.cert, key=gw.key, crl=None), junk),
        (lambda: server_context(ca=world.ca_file, cert=gw.cert, key=gw.key, crl=junk), junk),
        # a CA file is not a CRL: refused rather than silently running without revocation
        (
            lambda: server_context(
                ca=world.ca_file, cert=gw.cert, key=gw.key, crl=world.other_ca_file
            ),
            world.other_ca_file,
        ),
        (lambda: client_context(ca=world.ca_file, cert=gw.cert, key=alice.key), alice.key),
        (lambda: client_context(ca=world.ca_file, cert=junk, key=alice.key), junk),
        (lambda: client_context(ca=world.ca_file, cert=alice.cert, key=missing), missing),
        # RSA-1024 is below security level 2, for our own certificate too
        (
            lambda: client_context(
                ca=world.ca_file, cert=world.clients["weak"].cert, key=world.clients["weak"].key
            ),
            world.clients["weak"].cert,
        ),
    ]
    for build, path in cases:
        with pytest.raises(TlsConfigError) as err:
            build()
        message = str(err.value)
        assert str(path) in message
        assert "\n" not in message
