"""Enrollment end to end over in-memory streams: the gateway handler and `vpnd enroll`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from enroll_fixtures import EnrollLab, make_lab
from pki_fixtures import NOW, make_ca

from vpnd.client.enroll import EnrollError, enroll
from vpnd.config import ClientConfig, load_config
from vpnd.gateway.enrollment import EnrollmentHandler, EnrollmentSettings, TokenBucket
from vpnd.pki import certificate_pem
from vpnd.pki.authority import issue_certificate
from vpnd.pki.enrollment import Enrolled, redeem_invite
from vpnd.pki.enrollment_token import EnrollmentToken, ca_pin
from vpnd.pki.identity import Role
from vpnd.pki.keys import generate_key
from vpnd.pki.profile import describe_certificate
from vpnd.proto.enrollment import EnrollRequest
from vpnd.proto.frames import encode_frame
from vpnd.transport.memory import MemoryStream, memory_pipe
from vpnd.transport.stream import Stream

LIFE = 7 * 86400.0


class Recorder:
    """Wraps the client's end, keeping every byte it writes."""

    def __init__(self, inner: MemoryStream, sink: list[bytes]) -> None:
        self._inner = inner
        self._sink = sink

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def write(self, data: bytes | memoryview) -> None:
        self._sink.append(bytes(data))
        self._inner.write(data)


@dataclasses.dataclass
class Rig:
    lab: EnrollLab
    handler: EnrollmentHandler
    sent: list[bytes]
    connections: int = 0

    async def dial(self, pinned: bytes | None) -> Stream:
        self.connections += 1
        client, server = memory_pipe()
        self.handler.accept(server)
        return Recorder(client, self.sent)  # type: ignore[return-value]


def make_rig(
    tmp_path: Path, *, wall: Callable[[], float] = NOW.timestamp, **settings: object
) -> Rig:
    lab = make_lab(tmp_path)

    def redeem(req: EnrollRequest, now: dt.datetime) -> object:
        with lab.open() as inv:
            return redeem_invite(
                inv,
                lab.signer,
                invite_id=req.invite_id,
                secret=req.secret,
                csr_der=req.csr_der,
                lifetime_s=LIFE,
                now=now,
            )

    handler = EnrollmentHandler(
        EnrollmentSettings(server_name="gw.test", **settings),  # type: ignore[arg-type]
        ca_pem=lab.root_pem,
        redeem=redeem,  # type: ignore[arg-type]
        wall=wall,
    )
    return Rig(lab, handler, [])


async def test_enroll_writes_a_ready_client(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    token = rig.lab.invite("alice", groups=("staff",), address="10.77.0.9")
    out = tmp_path / "etc-vpnd"
    got = await enroll(token, out, dial=rig.dial)
    assert got.name == "alice"
    assert rig.connections == 2
    key_path = out / "client.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cfg = load_config(got.config)  # a real client config, every file present
    assert isinstance(cfg, ClientConfig)
    assert str(cfg.server) == "gw.test:4443"
    assert cfg.server_name == "gw.test"
    leaf = x509.load_pem_x509_certificates(cfg.pki.cert.read_bytes())[0]
    info = describe_certificate(leaf)
    assert info.name == "alice" and info.groups == ("staff",)
    assert [str(a) for a in info.addresses] == ["10.77.0.9"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert leaf.public_key() == key.public_key()
    # The private key never left: its scalar is in no byte the client sent.
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    wire = b"".join(rig.sent)
    assert len(wire) > 100
    assert scalar not in wire and key_path.read_bytes() not in wire
    assert rig.handler.counts == {"issued": 1}


async def test_reuse_is_refused_with_one_line(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    token = rig.lab.invite()
    await enroll(token, tmp_path / "a", dial=rig.dial)
    with pytest.raises(EnrollError, match="already used") as info:
        await enroll(token, tmp_path / "b", dial=rig.dial)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()


async def test_expired_token(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, wall=(NOW + dt.timedelta(days=2)).timestamp)
    token = rig.lab.invite()
    with pytest.raises(EnrollError, match="expired"):
        await enroll(token, tmp_path / "a", dial=rig.dial)


async def test_tampered_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    token = rig.lab.invite()
    forged = dataclasses.replace(token, secret="A" * 43)
    with caplog.at_level(logging.INFO), pytest.raises(EnrollError, match="does not know"):
        await enroll(forged, tmp_path / "a", dial=rig.dial)
    refusals = [r for r in caplog.records if getattr(r, "event", "") == "enroll_refused"]
    assert len(refusals) == 1
    assert getattr(refusals[0], "reason", None) == "invalid"
    assert token.invite_id in refusals[0].getMessage()
    for rec in caplog.records:
        assert forged.secret not in rec.getMessage()
        assert token.secret not in rec.getMessage()


async def test_wrong_pin_sends_nothing_secret(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    token = rig.lab.invite()
    other = dataclasses.replace(token, ca_pin=ca_pin(make_ca("other").cert))
    with pytest.raises(EnrollError, match="wrong pin"):
        await enroll(other, tmp_path / "a", dial=rig.dial)
    assert rig.connections == 1
    assert not any(token.secret.encode() in chunk for chunk in rig.sent)
    assert rig.handler.counts == {}
    # The invite is still good for the right gateway.
    await enroll(token, tmp_path / "b", dial=rig.dial)


async def test_existing_files_refused_unless_force(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    out = tmp_path / "etc"
    out.mkdir()
    (out / "client.yaml").write_text("old\n")
    with pytest.raises(EnrollError, match="--force"):
        await enroll(rig.lab.invite(), out, dial=rig.dial)
    assert rig.connections == 0
    assert (out / "client.yaml").read_text() == "old\n"
    await enroll(rig.lab.invite("bob", address="10.77.0.10"), out, dial=rig.dial, force=True)
    assert "old" not in (out / "client.yaml").read_text()
    (tmp_path / "file").write_text("x")
    with pytest.raises(EnrollError, match="not a directory"):
        await enroll(
            rig.lab.invite("carol", address="10.77.0.11"), tmp_path / "file", dial=rig.dial
        )


async def test_unreachable_gateway(tmp_path: Path) -> None:
    async def refused(_pinned: bytes | None) -> Stream:
        raise ConnectionRefusedError(111, "Connection refused")

    token = EnrollmentToken("gw.test:4443", "ab" * 32, "0" * 16, "s" * 43)
    with pytest.raises(EnrollError, match=r"cannot reach the gateway at gw.test:4443: Connection"):
        await enroll(token, tmp_path / "a", dial=refused)


async def test_silent_gateway_times_out(tmp_path: Path) -> None:
    async def silent(_pinned: bytes | None) -> Stream:
        client, _server = memory_pipe()
        return client

    token = EnrollmentToken("gw.test:4443", "ab" * 32, "0" * 16, "s" * 43)
    with pytest.raises(EnrollError, match="no answer"):
        await enroll(token, tmp_path / "a", dial=silent, timeout=0.05)


async def test_rate_limited(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, rate=0.001, burst=2)
    await enroll(rig.lab.invite(), tmp_path / "a", dial=rig.dial)
    with pytest.raises(EnrollError, match="busy"):
        await enroll(rig.lab.invite("bob", address="10.77.0.10"), tmp_path / "b", dial=rig.dial)
    assert rig.handler.counts["rate_limited"] == 1


async def test_junk_request_refused(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    client, server = memory_pipe()
    rig.handler.accept(server)
    got: list[bytes] = []
    done = asyncio.Event()
    client.set_receiver(got.append, lambda _e: done.set())
    client.write(encode_frame(0x01, b"{}"))  # a HELLO: not part of enrollment
    await asyncio.wait_for(done.wait(), 2)
    assert rig.handler.counts == {"bad_request": 1}
    assert b"".join(got)[-13:].endswith(b"bad request")


async def test_request_timeout(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, timeout=0.05)
    client, server = memory_pipe()
    rig.handler.accept(server)
    done = asyncio.Event()
    client.set_receiver(lambda _d: None, lambda _e: done.set())
    await asyncio.wait_for(done.wait(), 2)
    assert rig.handler.counts == {"timeout": 1}
    assert rig.handler.active == 0


def test_token_bucket() -> None:
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.5)
    assert not b.take(0.5)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("same_key", [True, False])
async def test_certificate_not_from_pinned_ca_or_not_our_key(
    tmp_path: Path, same_key: bool
) -> None:
    rig = make_rig(tmp_path)
    token = rig.lab.invite()
    # A gateway that offers the pinned root but answers with a certificate of another CA.
    evil = make_ca("evil")
    real = rig.handler._redeem

    def forged(req: EnrollRequest, now: dt.datetime) -> Enrolled:
        done = real(req, now)
        csr_key = x509.load_der_x509_csr(req.csr_der).public_key()
        other = generate_key("ecdsa-p256").public_key()
        fake = issue_certificate(
            ca_cert=evil.cert,
            ca_key=evil.key,
            name="alice",
            public_key=csr_key if same_key else other,  # type: ignore[arg-type]
            role=Role.PEER,
            addresses=[ipaddress.ip_address("10.77.0.9")],
            not_before=NOW - dt.timedelta(hours=1),
            not_after=NOW + dt.timedelta(days=1),
        )
        return dataclasses.replace(done, cert_pem=certificate_pem(fake))

    rig.handler._redeem = forged
    expect = "does not chain" if same_key else "not for the key made here"
    with pytest.raises(EnrollError, match=expect):
        await enroll(token, tmp_path / "a", dial=rig.dial)
    assert not (tmp_path / "a").exists()


async def test_oversized_or_unreadable_ca_bundle_spends_no_invite(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    token = rig.lab.invite()
    real = rig.handler._ca_pem
    rig.handler._ca_pem = lambda: b"x" * (64 * 1024)
    with pytest.raises(EnrollError, match="cannot issue certificates right now"):
        await enroll(token, tmp_path / "a", dial=rig.dial)

    def unreadable() -> bytes:
        raise FileNotFoundError(2, "No such file or directory")

    rig.handler._ca_pem = unreadable
    with pytest.raises(EnrollError, match="cannot issue certificates right now"):
        await enroll(token, tmp_path / "a", dial=rig.dial)
    rig.handler._ca_pem = real
    await enroll(token, tmp_path / "a", dial=rig.dial)  # the invite is still unused
