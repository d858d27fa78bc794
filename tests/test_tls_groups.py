"""Key exchange is limited to X25519, P-256 and P-384 on both contexts: an FFDHE-only
client (cheap for it, ~175 ms of CPU for the gateway at ffdhe8192) is refused."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from test_tls_engine import handshake, pair
from test_tls_support import GATEWAY_NAME, World, build_world

from vpnd.transport.tlsctx import GROUPS, set_groups
from vpnd.transport.tlsengine import TlsEngine, TlsHandshakeError


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("pki"))


def client_offering(world: World, group: str) -> ssl.SSLContext:
    ctx = world.client_ctx("alice")
    ctx.set_ecdh_curve(group)  # a client that offers this one group only
    return ctx


@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1"])
def test_clients_offering_only_one_allowed_group_connect(world: World, group: str) -> None:
    c, s = pair(world, client_offering(world, group))
    handshake(c, s)
    c.write(b"ping")
    s.receive(c.outgoing())
    assert s.read() == b"ping"


@pytest.mark.parametrize("group", ["ffdhe2048", "ffdhe8192", "secp521r1"])
def test_a_client_offering_only_other_groups_is_refused(world: World, group: str) -> None:
    c, s = pair(world, client_offering(world, group))
    c.handshake()
    s.receive(c.outgoing())
    with pytest.raises(TlsHandshakeError):
        s.handshake()


def test_the_vpnd_client_offers_no_ffdhe_either(world: World) -> None:
    # A server that would take anything, but only FFDHE: the vpnd client must not agree.
    server = world.server_ctx()
    server.set_ecdh_curve("ffdhe2048")
    c = TlsEngine(world.client_ctx("alice"), server_side=False, server_hostname=GATEWAY_NAME)
    s = TlsEngine(server, server_side=True)
    c.handshake()
    s.receive(c.outgoing())
    with pytest.raises(TlsHandshakeError):
        s.handshake()


def test_set_groups_applies_the_whole_list_or_falls_back_to_x25519(world: World) -> None:
    assert set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), GROUPS)  # no fallback here
    server = world.server_ctx()
    assert not set_groups(server, ("no-such-group",))  # OpenSSL refuses the list
    c = TlsEngine(
        client_offering(world, "prime256v1"), server_side=False, server_hostname=GATEWAY_NAME
    )
    s = TlsEngine(server, server_side=True)
    c.handshake()
    s.receive(c.outgoing())
    with pytest.raises(TlsHandshakeError):  # X25519 only now, never OpenSSL's defaults
        s.handshake()


# -- a real OpenSSL client against a loopback server ----------------------------------


def _serve_once(world: World, sock: socket.socket, result: list[str]) -> None:
    conn, _ = sock.accept()
    conn.settimeout(10)
    try:
        with world.server_ctx().wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hello\n")
            result.append("ok")
    except (ssl.SSLError, OSError) as err:
        result.append(f"refused: {err}")
    finally:
        conn.close()


def s_client(world: World, group: str) -> tuple[str, str]:
    """(server outcome, s_client output) for one s_client -groups GROUP connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        sock.settimeout(10)
        port = sock.getsockname()[1]
        result: list[str] = []
        thread = threading.Thread(target=_serve_once, args=(world, sock, result))
        thread.start()
        files = world.clients["alice"]
        proc = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-tls1_3",
                "-groups",
                group,
                "-alpn",
                "vpnd/1",
                "-servername",
                GATEWAY_NAME,
                "-cert",
                str(files.cert),
                "-key",
                str(files.key),
                "-CAfile",
                str(world.ca_file),
            ],
            input=b"",
            capture_output=True,
            timeout=20,
            check=False,
        )
        thread.join(timeout=20)
    assert not thread.is_alive()
    return result[0], (proc.stdout + proc.stderr).decode(errors="replace")


openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")


@openssl
@pytest.mark.parametrize("group", ["ffdhe2048", "ffdhe8192"])
def test_openssl_s_client_with_ffdhe_only_is_refused(world: World, group: str) -> None:
    outcome, out = s_client(world, group)
    assert outcome.startswith("refused"), (outcome, out)
    assert "Server Temp Key" not in out, out


@openssl
@pytest.mark.parametrize(("group", "shown"), [("P-256", "prime256v1"), ("P-384", "secp384r1")])
def test_openssl_s_client_with_one_nist_curve_connects(
    world: World, group: str, shown: str
) -> None:
    outcome, out = s_client(world, group)
    assert outcome == "ok", (outcome, out)
    assert shown in out, out
