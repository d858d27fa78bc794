"""What the gateway logs and audits when a TLS handshake is refused, by either side.

A client that aborts the handshake judged *the gateway* (its CA, its name): the log
names the alert and says so, instead of repeating the advice meant for a client. A
refusal by the gateway audits the name and serial of the certificate presented.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import pytest
from test_tls_support import GATEWAY_NAME, World, build_world

from vpnd.gateway.shell import Gateway, GatewaySettings
from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.pki import load_trust_store
from vpnd.pki.keys import load_certificate
from vpnd.transport.connection import connect, serve
from vpnd.transport.tlsengine import TlsAlertReceived, TlsHandshakeError

HOST = "127.0.0.1"
BOUND = 30.0  # a hang guard, not a speed assertion


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("pki"))


def _gateway(world: World) -> Gateway:
    settings = GatewaySettings(
        tun_name="vpn0",
        mtu=1400,
        overlay_networks=(ipaddress.ip_network("10.8.0.0/16"),),
        gateway_addresses=(ipaddress.ip_interface("10.8.0.1/16"),),
    )
    return Gateway(
        settings,
        tun=FakeTun("vpn0"),
        net=FakeNetConfigurator(),
        trust=load_trust_store(world.ca_file, None),  # on_refused needs no CRL
    )


async def _refusal_lines(
    world: World, caplog: pytest.LogCaptureFixture, client: str, **kw: Any
) -> tuple[list[logging.LogRecord], BaseException | None]:
    """Run one handshake of ``client`` against a gateway; return the audit records."""

    async def main() -> BaseException | None:
        gw = _gateway(world)
        refused = asyncio.Event()

        def on_refused(peer: tuple[str, int] | None, err: TlsHandshakeError) -> None:
            gw.on_refused(peer, err)
            refused.set()

        server = await serve(HOST, 0, world.server_ctx(), lambda c: None, on_refused=on_refused)
        port = server.sockets[0].getsockname()[1]
        failure: BaseException | None = None
        try:
            ctx = world.client_ctx(client, ca=kw.get("ca"))
            name = kw.get("server_hostname", GATEWAY_NAME)
            try:
                conn = await connect(HOST, port, ctx, server_hostname=name, timeout=BOUND)
            except (TlsHandshakeError, TlsAlertReceived) as err:
                failure = err
            else:
                done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

                def ended(reason: Exception | None) -> None:
                    if not done.done():
                        done.set_result(reason)

                conn.set_receiver(lambda d: None, ended)
                failure = await done  # TLS 1.3: the gateway's refusal is the first read
            await refused.wait()
        finally:
            server.close()
            await server.wait_closed()
            gw.tun.close()
        return failure

    with caplog.at_level(logging.INFO, logger="vpnd.audit"):
        async with asyncio.timeout(BOUND):
            failure = await main()
    records = [r for r in caplog.records if r.name == "vpnd.audit"]
    return records, failure


@pytest.mark.parametrize(
    ("kw", "alert"),
    [
        ({"ca": "other"}, "unknown_ca"),  # the client trusts another CA
        ({"server_hostname": "other.vpn.test"}, "bad_certificate"),  # pinned another name
    ],
)
async def test_client_rejecting_the_gateway_is_logged_as_such(
    world: World, caplog: pytest.LogCaptureFixture, kw: dict[str, str], alert: str
) -> None:
    args: dict[str, Any] = {"ca": world.other_ca_file} if kw.get("ca") == "other" else kw
    records, failure = await _refusal_lines(world, caplog, "alice", **args)
    assert isinstance(failure, TlsHandshakeError) and failure.reason == alert  # client side
    assert len(records) == 1, [r.getMessage() for r in records]
    line = records[0].getMessage()
    assert f"alert {alert}" in line
    assert "the client rejected our certificate" in line
    # Not the advice written for a client ("your certificate", "ask your admin").
    assert "your certificate" not in line and "ask your admin" not in line
    assert records[0].__dict__["by_peer"] is True
    assert records[0].__dict__["reason"] == alert


@pytest.mark.parametrize(
    ("client", "alert"), [("bob", "certificate_revoked"), ("eve", "unknown_ca")]
)
async def test_gateway_refusal_in_the_handshake_audits_the_presented_name_and_serial(
    world: World, caplog: pytest.LogCaptureFixture, client: str, alert: str
) -> None:
    cert = load_certificate(world.clients[client].cert)
    records, failure = await _refusal_lines(world, caplog, client)
    assert isinstance(failure, TlsAlertReceived) and failure.alert == alert
    assert len(records) == 1, [r.getMessage() for r in records]
    rec = records[0]
    line = rec.getMessage()
    serial = f"{cert.serial_number:x}"
    assert f"({client}, serial {serial})" in line
    assert alert in line
    assert rec.__dict__["peer"] == client
    assert rec.__dict__["serial"] == serial
    assert rec.__dict__["event"] == "auth_refused"
    assert "BEGIN CERTIFICATE" not in caplog.text and "MII" not in caplog.text


async def test_no_certificate_presented_audits_no_name(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that is refused before sending any certificate: nothing to name.
    records, _ = await _refusal_lines(world, caplog, "alice", server_hostname="other.vpn.test")
    assert "peer" not in records[0].__dict__ and "serial" not in records[0].__dict__
