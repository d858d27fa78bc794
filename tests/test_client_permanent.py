"""A client stops on a permanent local error and keeps retrying network errors.

Permanent local errors: no CAP_NET_ADMIN (TUN open refused), an unusable own key or
certificate, our certificate outside its validity period. Retrying them cannot help and
made the gateway admit the same client once a second, forever.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from inprocess_fixtures import DAY, REAL_NOW, WatchedTun, World

from vpnd.client.runner import LocalError
from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.pki.crl import crl_pem
from vpnd.transport.stream import Stream
from vpnd.transport.tlsctx import TlsConfigError

ROOT = Path(__file__).resolve().parents[1]
BOUND = 20.0  # hang guard only

pytestmark = pytest.mark.looptime


class Attempts:
    """A client whose connector and TUN factory are counted (and can be made to fail)."""

    def __init__(
        self,
        w: World,
        *,
        tun_error: Exception | None = None,
        connect_error: Exception | None = None,
        local_check: Callable[[], str | None] | None = None,
    ) -> None:
        self.connects = 0
        self.tuns: list[FakeTun] = []
        leaf = w.ca.issue("alice", addresses=["10.8.0.2"], not_before=REAL_NOW - DAY,
                          not_after=REAL_NOW + 30 * DAY)  # fmt: skip
        cert, _key = leaf.write(w.tmp, "alice")
        net = FakeNetConfigurator()

        def tun_factory(name: str, offload: bool) -> FakeTun:
            if tun_error is not None:
                raise tun_error
            tun = WatchedTun(name, w.activity, vnet_hdr=offload, net=net)
            self.tuns.append(tun)
            return tun

        async def dial() -> Stream:
            self.connects += 1
            if connect_error is not None:
                raise connect_error
            return w.dial_memory(cert)

        self.client = w.new_client(
            dial,
            tun_factory=tun_factory,
            net=net,
            initial_delay=0.01,
            max_delay=0.02,
            local_check=local_check,
        )


async def bounded(work: Awaitable[None]) -> None:
    """``await work`` with a hang guard (free under looptime)."""
    await asyncio.wait_for(work, BOUND)


async def test_tun_permission_denied_stops_after_one_attempt(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        a = Attempts(w, tun_error=PermissionError(1, "Operation not permitted"))
        with pytest.raises(LocalError) as err:
            await bounded(a.client.run())
        assert a.connects == 1  # admitted once, not once a second forever
        assert "tun0" in str(err.value) and "\n" not in str(err.value)
        assert w.gateway is not None
        await w.until(
            lambda: w.gateway is not None and not w.gateway.peers, "the gateway dropped the session"
        )
    finally:
        await w.close()


async def test_tun_factory_tun_error_from_the_daemon_stops_too(tmp_path: Path) -> None:
    from vpnd.net.errors import TunError

    w = World(tmp_path)
    await w.start_gateway()
    try:
        need = "TUN tun0: permission denied: need CAP_NET_ADMIN (run as root)"
        a = Attempts(w, tun_error=TunError(need))
        with pytest.raises(LocalError, match="CAP_NET_ADMIN"):
            await bounded(a.client.run())
        assert a.connects == 1
    finally:
        await w.close()


async def test_unusable_own_key_stops_without_retrying(tmp_path: Path) -> None:
    w = World(tmp_path)
    bad = TlsConfigError(f"cannot load certificate {tmp_path}/alice.pem with key x: denied")
    a = Attempts(w, connect_error=bad)
    with pytest.raises(LocalError, match="cannot use our own TLS files"):
        await a.client.run()
    assert a.connects == 1


async def test_own_certificate_outside_its_validity_never_connects(tmp_path: Path) -> None:
    w = World(tmp_path)
    a = Attempts(w, local_check=lambda: "pki.cert: own certificate expired at X")
    with pytest.raises(LocalError, match="expired"):
        await a.client.run()
    assert a.connects == 0


async def test_network_errors_are_retried(tmp_path: Path) -> None:
    w = World(tmp_path)
    refused = ConnectionRefusedError(111, "Connection refused")
    a = Attempts(w, connect_error=refused, local_check=lambda: None)
    task = asyncio.create_task(a.client.run())
    await w.until(lambda: a.connects >= 3, "three attempts", timeout=BOUND)
    assert not task.done()  # still retrying
    a.client.stop()
    await asyncio.wait_for(task, BOUND)  # returns normally: no LocalError
    assert a.client.last_outcome is not None and not a.client.last_outcome.fatal


# --- the real daemon, without CAP_NET_ADMIN --------------------------------------------


def _client_files(tmp: Path) -> Path:
    w = World(tmp)  # writes ca.pem and crl.pem; its CA is dated around the real now
    leaf = w.ca.issue("alice", addresses=["10.8.0.2"], not_before=REAL_NOW - DAY,
                      not_after=REAL_NOW + 30 * DAY)  # fmt: skip
    _, key = leaf.write(tmp, "alice")
    key.chmod(0o600)
    (tmp / "ca.pem").write_bytes(w.ca.cert.public_bytes(Encoding.PEM))
    (tmp / "crl.pem").write_bytes(crl_pem(w.ca.crl(this_update=REAL_NOW - DAY,
                                                   next_update=REAL_NOW + 7 * DAY)))  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = tmp / "client.yaml"
    config.write_text(
        "mode: client\n"
        f'server: "127.0.0.1:{closed}"\n'
        "server_name: gw.test\n"
        "pki:\n  ca: ca.pem\n  cert: alice.pem\n  key: alice.key\n"
        "tun:\n  name: vpnprm0\n"
        f"control_socket: {tmp}/vpnd.sock\n"
        "reconnect:\n  initial_delay: 0.1\n  max_delay: 0.2\n"
    )
    return config


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping CAP_NET_ADMIN needs to start as root")
def test_daemon_without_cap_net_admin_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    config = _client_files(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
            sys.executable, "-m", "vpnd", "--config", str(config)]  # fmt: skip
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=BOUND,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"vpnd kept running (retrying?): {exc.stderr!r}") from None
    assert proc.returncode not in (0, None), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "CAP_NET_ADMIN" in lines[0] and "Traceback" not in proc.stderr
    assert not Path("/sys/class/net/vpnprm0").exists()
