"""Enrollment over real TLS on loopback: certless routing, pinning, then a real session."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from enroll_fixtures import Signer
from inprocess_fixtures import DAY, REAL_NOW, World
from pki_fixtures import make_ca

from vpnd.client.enroll import EnrollError, enroll, tls_dialer
from vpnd.gateway.enrollment import EnrollmentHandler, EnrollmentSettings
from vpnd.pki import certificate_pem
from vpnd.pki.enrollment import Enrolled, redeem_invite
from vpnd.pki.enrollment_token import EnrollmentToken
from vpnd.pki.identity import Role
from vpnd.pki.inventory import Inventory
from vpnd.pki.invites import create_invite
from vpnd.proto.enrollment import EnrollRequest
from vpnd.transport.connection import TlsConnection, connect, serve
from vpnd.transport.tlsctx import client_context, enrollment_client_context, server_context
from vpnd.transport.tlsengine import TlsAlertReceived

pytestmark = pytest.mark.looptime(False)  # real sockets


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.world = World(tmp)
        self.inventory = tmp / "inventory.sqlite"
        Inventory.create(self.inventory).close()
        self.signer = Signer(self.world.ca.cert, self.world.ca.key, b"")
        self.servers: list[asyncio.Server] = []
        self.port = 0

    def handler(
        self, ca_pem: bytes | None = None, server_name: str = "gw.test"
    ) -> EnrollmentHandler:
        def redeem(req: EnrollRequest, now: dt.datetime) -> Enrolled:
            with Inventory.open(self.inventory) as inv:
                return redeem_invite(
                    inv,
                    self.signer,
                    invite_id=req.invite_id,
                    secret=req.secret,
                    csr_der=req.csr_der,
                    lifetime_s=86400.0,
                    now=now,
                )

        pem = ca_pem or self.world.ca_path.read_bytes()
        return EnrollmentHandler(
            EnrollmentSettings(server_name=server_name), ca_pem=lambda: pem, redeem=redeem
        )

    async def start(self, *, cert: Path | None = None, key: Path | None = None) -> int:
        w = self.world
        if w.gateway is None:
            await w.start_gateway()
        assert w.gateway is not None
        ctx = server_context(
            ca=w.ca_path,
            cert=cert or w.gw_cert,
            key=key or w.gw_key,
            crl=w.crl_path,
            client_cert_optional=True,
        )
        server = await serve("127.0.0.1", 0, ctx, w.gateway.on_connection, handshake_timeout=5)
        self.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def invite(self, name: str, port: int) -> EnrollmentToken:
        with Inventory.open(self.inventory) as inv:
            return create_invite(
                inv,
                self.world.ca.cert,
                name=name,
                server=f"127.0.0.1:{port}",
                groups=("staff",),
                ttl_s=3600,
                now=dt.datetime.now(dt.UTC).replace(microsecond=0),
            ).token

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        await self.world.close()


async def test_invite_enroll_then_a_verified_session(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        port = await lab.start()
        assert lab.world.gateway is not None
        lab.world.gateway.enrollment = lab.handler()
        token = lab.invite("alice", port)
        out = tmp_path / "laptop"
        got = await enroll(token, out, dial=tls_dialer(token, timeout=5), timeout=5)
        assert got.name == "alice"
        # The enrolled files make a real, verified session with the same gateway.
        ctx = client_context(ca=out / "ca.pem", cert=out / "client.pem", key=out / "client.key")
        conn = await connect("127.0.0.1", port, ctx, server_hostname="gw.test", timeout=5)
        gw = lab.world.gateway
        for _ in range(500):  # real sockets: nothing pokes the world's activity
            if any(p.identity.name == "alice" for p in gw.peers.values()):
                break
            await asyncio.sleep(0.01)
        assert any(p.identity.name == "alice" for p in gw.peers.values()), gw.handshakes
        conn.close()
        # Used once: a second redeem is refused.
        with pytest.raises(EnrollError, match="already used"):
            await enroll(token, tmp_path / "again", dial=tls_dialer(token, timeout=5), timeout=5)
    finally:
        await lab.close()


def _settle(fut: asyncio.Future[Exception | None], err: Exception | None) -> None:
    if not fut.done():
        fut.set_result(err)


async def _certless_answer(port: int) -> tuple[bytes, Exception | None]:
    conn: TlsConnection = await connect(
        "127.0.0.1", port, enrollment_client_context(None), server_hostname="gw.test", timeout=5
    )
    got: list[bytes] = []
    ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    conn.set_receiver(got.append, lambda e: _settle(ended, e))
    reason = await asyncio.wait_for(ended, 5)
    return b"".join(got), reason


async def test_certless_without_enrollment_is_refused_not_admitted(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        port = await lab.start()  # optional client certs, but no handler set
        data, _ = await _certless_answer(port)
        assert data[:1] == b"\x06"  # a CLOSE frame: refused like any unverified peer
        assert lab.world.gateway is not None and not lab.world.gateway.peers
    finally:
        await lab.close()


async def test_foreign_certificate_still_refused_in_the_handshake(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        port = await lab.start()
        assert lab.world.gateway is not None
        lab.world.gateway.enrollment = lab.handler()
        other = make_ca("other", not_before=REAL_NOW - DAY, not_after=REAL_NOW + 9 * DAY)
        leaf = other.issue(
            "mallory",
            addresses=["10.77.0.5"],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + DAY,
        )
        cert, key = leaf.write(tmp_path, "mallory")
        ctx = client_context(ca=lab.world.ca_path, cert=cert, key=key)
        conn = await connect("127.0.0.1", port, ctx, server_hostname="gw.test", timeout=5)
        ended: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        conn.set_receiver(lambda _d: None, lambda e: _settle(ended, e))
        reason = await asyncio.wait_for(ended, 5)
        assert isinstance(reason, TlsAlertReceived) and reason.alert == "unknown_ca"
        assert lab.world.gateway.enrollment.counts == {}
    finally:
        await lab.close()


async def test_impostor_relaying_the_real_bundle_gets_no_secret(tmp_path: Path) -> None:
    """A gateway certified by another CA that serves the pinned CA's bundle: the pin
    check passes on the first connection, the pinned TLS check stops the second."""
    lab = Lab(tmp_path)
    try:
        evil = make_ca("evil", not_before=REAL_NOW - DAY, not_after=REAL_NOW + 9 * DAY)
        imp = evil.issue(
            "gw",
            role=Role.GATEWAY,
            addresses=["10.77.0.1"],
            dns_names=["gw.test"],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + DAY,
        )
        cert, key = imp.write(tmp_path, "impostor")
        port = await lab.start(cert=cert, key=key)
        assert lab.world.gateway is not None
        lab.world.gateway.enrollment = handler = lab.handler(certificate_pem(lab.world.ca.cert))
        token = lab.invite("alice", port)
        with pytest.raises(EnrollError, match="not certified by the pinned CA"):
            await enroll(token, tmp_path / "l", dial=tls_dialer(token, timeout=5), timeout=5)
        assert "issued" not in handler.counts and not any(
            k.startswith("refused") for k in handler.counts
        )
    finally:
        await lab.close()


async def test_client_yaml_must_pin_a_name_the_gateway_carries(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        port = await lab.start()
        assert lab.world.gateway is not None
        lab.world.gateway.enrollment = lab.handler(server_name="elsewhere.test")
        token = lab.invite("alice", port)
        with pytest.raises(EnrollError, match="does not carry"):
            await enroll(token, tmp_path / "l", dial=tls_dialer(token, timeout=5), timeout=5)
        assert not (tmp_path / "l").exists()
    finally:
        await lab.close()
