"""The client renews over its live session against the real gateway shell, in process:
CSR over the tunnel, answer verified, files written, make-before-break, no packet lost."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from inprocess_fixtures import DAY, REAL_NOW, Node, World, ipv4_packet

from vpnd.client.renewal import Renewer
from vpnd.config import ClientConfig, parse_config
from vpnd.gateway.shell import Peer
from vpnd.pki.authority import issue_certificate
from vpnd.pki.identity import Role
from vpnd.pki.keys import load_certificate, load_private_key
from vpnd.proto import RefusalCode

pytestmark = pytest.mark.looptime


class CaSigner:
    """The gateway's lifecycle, reduced to signing with the test CA (no inventory)."""

    renewal = True

    def __init__(self, w: World, *, refuse: bool = False) -> None:
        self.w = w
        self.refuse = refuse
        self.signed: list[int] = []
        self.requests = 0
        self.superseded: list[Any] = []

    def supersede(self, effect: Any) -> None:
        self.superseded.append(effect)

    def renew(self, peer: Peer, request_id: int, csr_der: bytes) -> None:
        self.requests += 1
        asyncio.get_running_loop().call_soon(self._answer, peer, request_id, csr_der)

    def _answer(self, peer: Peer, request_id: int, csr_der: bytes) -> None:
        session = peer.driver.session
        now = asyncio.get_running_loop().time()
        if self.refuse:
            session.refuse_renewal(request_id, RefusalCode.UNKNOWN_IDENTITY, "no record", now)
            peer.driver.pump()
            return
        csr = x509.load_der_x509_csr(csr_der)
        ident = peer.identity
        # Each renewal is issued a second later than the one before: it takes over.
        cert = issue_certificate(
            ca_cert=self.w.ca.cert,
            ca_key=self.w.ca.key,
            name=ident.name,
            public_key=csr.public_key(),  # type: ignore[arg-type]
            role=Role.PEER,
            addresses=list(ident.addresses),
            not_before=REAL_NOW - DAY + dt.timedelta(seconds=len(self.signed) + 1),
            not_after=REAL_NOW + 7 * DAY,
        )
        self.signed.append(cert.serial_number)
        session.send_renewed(request_id, cert.public_bytes(Encoding.PEM), now)
        peer.driver.pump()


def client_config(tmp: Path, name: str) -> ClientConfig:
    doc = {
        "mode": "client",
        "server": "127.0.0.1:4443",
        "server_name": "gw.test",
        "pki": {"ca": "ca.pem", "cert": f"{name}.pem", "key": f"{name}.key"},
        "tun": {"name": "tun0"},
        "control_socket": str(tmp / "client.sock"),
    }
    cfg = parse_config(doc, source="test", base_dir=tmp, check_files=False)
    assert isinstance(cfg, ClientConfig)
    return cfg


def renewer_for(
    w: World, node: Node, cfg: ClientConfig, wall: Callable[[], float] = REAL_NOW.timestamp
) -> Renewer:
    client = node.client

    async def adopt(rotate: bool) -> bool:
        return await client.rotate() if rotate else False

    return Renewer(
        client,
        config=lambda: cfg,
        own=lambda: load_certificate(cfg.pki.cert),
        trust=lambda: client.trust,
        passphrase=lambda: None,
        adopt=adopt,
        wall=wall,
        rng=random.Random(7),
    )


async def test_twenty_renewals_under_pings_lose_nothing(tmp_path: Path) -> None:
    """Every packet sent either way across 20 switches arrives, on one TUN that never
    goes down. The memory pipe delivers in order within a loop turn, so this catches
    packets the client's switch drops (a TUN left paused, a session closed with data
    queued, a reconnect); the TCP-level race between two real connections is what the
    netns test measures."""
    w = World(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    signer = CaSigner(w)
    w.gateway.lifecycle = signer
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"))
        tun = alice.tun[0]
        sent_up: list[bytes] = []
        sent_down: list[bytes] = []
        stop = asyncio.Event()

        async def pinger() -> None:
            # A packet each way on every loop turn (not every 10 ms: under looptime the
            # switch takes no loop time, so only this puts packets in flight across it).
            seq = 0
            while not stop.is_set():
                seq += 1
                up = ipv4_packet("10.8.0.2", "192.168.50.10", b"up%06d" % seq)
                down = ipv4_packet("192.168.50.10", "10.8.0.2", b"dn%06d" % seq, 7, 40000)
                tun.inject(up)
                sent_up.append(up)
                if seq > 1:  # the first one opens the flow the replies belong to
                    w.gw_tun.inject(down)
                    sent_down.append(down)
                await asyncio.sleep(0)

        for _ in range(20):
            stop.clear()
            task = asyncio.create_task(pinger())
            assert await renewer.renew_now() is not None, renewer.last_error
            stop.set()
            await task
            await asyncio.sleep(0.05)
        await w.until(lambda: set(sent_up) <= set(w.gw_tun.written), "every packet up arrived")
        await w.until(lambda: set(sent_down) <= set(tun.written), "every packet down arrived")
        assert len(sent_up) >= 20 * 10
        assert renewer.renewals == 20 and renewer.failures == 0
        # One TUN all along, never closed, never a disconnect.
        assert len(alice.tun) == 1 and not tun.closed
        assert alice.client.last_outcome is None
        owner = w.gateway.table.lookup(ipaddress.ip_address("10.8.0.2"))
        assert owner is not None and owner.identity.serial == signer.signed[-1]
        await w.until(lambda: w.gateway is not None and len(w.gateway.peers) == 1, "old gone")
        # What is on disk is the last certificate, with its key, the key 0600.
        cert = load_certificate(tmp_path / "alice.pem")
        key = load_private_key(tmp_path / "alice.key")
        assert cert.serial_number == signer.signed[-1]
        assert cert.public_key() == key.public_key()
        assert stat.S_IMODE((tmp_path / "alice.key").stat().st_mode) == 0o600
        status = renewer.status()
        assert status.renewals == 20 and status.state == "scheduled"
        assert status.not_after.startswith(str((REAL_NOW + 7 * DAY).date()))
    finally:
        await w.close()


@pytest.mark.looptime(False)  # real sockets: their I/O takes real time
async def test_twenty_renewals_over_real_tls_lose_no_ping_at_10ms(tmp_path: Path) -> None:
    """Two real TCP connections per switch, so packets are in flight on the old one
    while the new one takes over: a 10 ms ping each way, plus a packet each way on
    every loop turn, must lose nothing."""
    w = World(tmp_path, tls=True)
    await w.start_gateway()
    assert w.gateway is not None
    signer = CaSigner(w)
    w.gateway.lifecycle = signer
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"))
        tun = alice.tun[0]
        sent_up: list[bytes] = []
        sent_down: list[bytes] = []
        stop = asyncio.Event()

        async def pinger() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                up = ipv4_packet("10.8.0.2", "192.168.50.10", b"up%06d" % seq)
                down = ipv4_packet("192.168.50.10", "10.8.0.2", b"dn%06d" % seq, 7, 40000)
                tun.inject(up)
                sent_up.append(up)
                if seq > 1:
                    w.gw_tun.inject(down)
                    sent_down.append(down)
                await asyncio.sleep(0.01)

        async def flood() -> None:
            # Around each switch, a packet each way on every loop turn as well.
            seq = 0
            while not stop.is_set():
                seq += 1
                up = ipv4_packet("10.8.0.2", "192.168.50.10", b"fu%06d" % seq)
                down = ipv4_packet("192.168.50.10", "10.8.0.2", b"fd%06d" % seq, 7, 40000)
                tun.inject(up)
                w.gw_tun.inject(down)
                sent_up.append(up)
                sent_down.append(down)
                await asyncio.sleep(0)

        task = asyncio.create_task(pinger())
        # The first ping up opens the flow the packets down are replies in.
        await w.until(lambda: sent_up and sent_up[0] in w.gw_tun.written, "flow open")
        flooding = asyncio.create_task(flood())
        for _ in range(20):
            assert await renewer.renew_now() is not None, renewer.last_error
            await asyncio.sleep(0.03)
        stop.set()
        await task
        await flooding
        await w.until(lambda: set(sent_up) <= set(w.gw_tun.written), "every ping up arrived")
        await w.until(lambda: set(sent_down) <= set(tun.written), "every ping down arrived")
        assert renewer.renewals == 20 and len(alice.tun) == 1 and not tun.closed
        assert alice.client.last_outcome is None
    finally:
        await w.close()


async def test_a_refused_renewal_is_one_line_backs_off_and_keeps_the_tunnel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    w.gateway.lifecycle = CaSigner(w, refuse=True)
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        before = (tmp_path / "alice.pem").read_bytes()
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"))
        assert await renewer.renew_now() is None
        assert renewer.last_error == (
            "the gateway refused the renewal (unknown_identity): no record"
        )
        assert renewer.state == "backoff" and renewer.failures == 1
        assert renewer.schedule().failures == 1
        failed = [r for r in caplog.records if "certificate renewal failed" in r.getMessage()]
        assert len(failed) == 1 and failed[0].exc_info is None
        assert (tmp_path / "alice.pem").read_bytes() == before
        assert alice.client.connected.is_set() and alice.client.last_outcome is None
    finally:
        await w.close()


async def test_without_renewal_on_the_gateway_the_client_is_told_not_enabled(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"))
        assert await renewer.renew_now() is None
        assert renewer.last_error is not None and "(not_enabled)" in renewer.last_error
    finally:
        await w.close()


async def test_a_renew_hint_starts_a_renewal_at_once(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    signer = CaSigner(w)
    w.gateway.lifecycle = signer
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"))
        runner = asyncio.create_task(renewer.run())
        await asyncio.sleep(1)
        assert renewer.state == "scheduled" and not signer.signed  # not due for weeks
        assert w.gateway.renew_hint("alice", "groups changed") == 1
        await w.until(lambda: renewer.renewals == 1, "renewed on the hint")
        assert len(signer.signed) == 1
        runner.cancel()
    finally:
        await w.close()


class GraceWorld(World):
    """A gateway that admits a recently expired peer, only to renew."""

    def gateway_settings(self, *args: Any, **kwargs: Any) -> Any:
        import dataclasses

        base = super().gateway_settings(*args, **kwargs)
        return dataclasses.replace(base, quarantine_grace=86400.0, quarantine_seconds=30.0)


async def test_an_expired_peer_renews_in_quarantine_then_connects_normally(
    tmp_path: Path,
) -> None:
    w = GraceWorld(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    signer = CaSigner(w)
    w.gateway.lifecycle = signer
    try:
        expired = w.ca.issue(
            "alice", addresses=["10.8.0.2"], not_before=REAL_NOW - 8 * DAY,
            not_after=REAL_NOW - dt.timedelta(hours=1),
        )  # fmt: skip
        alice = w.start_client("alice", leaf=expired)
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"))
        runner = asyncio.create_task(renewer.run())
        await asyncio.wait_for(alice.client.connected.wait(), 10)
        assert renewer.renewals == 1 and len(signer.signed) == 1
        assert not alice.client.quarantined
        # The second connection is the normal one, with the renewed certificate.
        assert len(alice.streams) == 2 and len(alice.tun) == 1
        owner = w.gateway.table.lookup(ipaddress.ip_address("10.8.0.2"))
        assert owner is not None and owner.identity.serial == signer.signed[0]
        assert load_certificate(tmp_path / "alice.pem").serial_number == signer.signed[0]
        assert w.gateway.core.totals["quarantines"] == 1
        runner.cancel()
    finally:
        await w.close()


async def test_the_schedule_decides_on_wall_time_and_failures_back_off(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    assert w.gateway is not None
    signer = CaSigner(w, refuse=True)
    w.gateway.lifecycle = signer
    try:
        leaf = w.ca.issue(
            "alice", addresses=["10.8.0.2"], not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 2 * DAY,
        )  # fmt: skip
        alice = w.start_client("alice", leaf=leaf)
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        clock = [REAL_NOW.timestamp()]
        renewer = renewer_for(w, alice, client_config(tmp_path, "alice"), lambda: clock[0])
        sched = renewer.schedule()
        start = (REAL_NOW - DAY).timestamp()
        assert start + 0.62 * 3 * 86400 <= sched.target <= start + 0.72 * 3 * 86400
        await renewer.look()  # not due: one sleep, nothing sent
        assert renewer.state == "scheduled" and signer.requests == 0
        clock[0] = sched.target - 1
        await renewer.look()
        assert signer.requests == 0
        clock[0] = sched.target
        await renewer.look()  # due: refused, backs off
        assert signer.requests == 1 and renewer.state == "backoff"
        retry = sched.next_attempt_wall()
        assert 5 <= retry - clock[0] <= 10
        clock[0] = retry - 0.5
        await renewer.look()
        assert signer.requests == 1
        clock[0] = retry
        signer.refuse = False
        await renewer.look()  # the retry succeeds
        assert signer.requests == 2 and renewer.renewals == 1 and renewer.failures == 0
        # The renewed certificate has its own, later schedule.
        assert renewer.schedule().target > retry
    finally:
        await w.close()
