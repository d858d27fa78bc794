"""vpnd.service.daemon.run: the order of the start-up checks and the exit codes.

The real preflight runs (as root or not: it only reads); the services run over the
in-memory edges, and a real SIGTERM stops them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from pki_fixtures import DAY
from service_fixtures import REAL, FakeEdges, Site

from vpnd.service import daemon, preflight


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.setenv("VPND_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(daemon, "setup_logging", lambda *a: None)  # keep caplog's handler
    monkeypatch.setattr(preflight, "has_cap_net_admin", lambda *a: True)
    return Site(tmp_path)


class TermOnListen(FakeEdges):
    """Sends SIGTERM to this process once the listener is up (fully started)."""

    async def _listen(self, *args: Any, **kwargs: Any) -> Any:
        listener = await super()._listen(*args, **kwargs)
        asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGTERM)
        return listener


def use(monkeypatch: pytest.MonkeyPatch, edges: FakeEdges) -> None:
    monkeypatch.setattr(daemon, "Edges", lambda: edges)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_invalid_config_exits_2(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    path = site.write({"mode": "gateway"})
    assert daemon.run(str(path)) == 2
    assert capsys.readouterr().err.startswith("vpnd: ")


def test_a_gateway_runs_until_sigterm_and_exits_0(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = TermOnListen()
    use(monkeypatch, fake)
    path = site.write(site.gateway_doc(listen=f"127.0.0.1:{free_port()}"))
    with caplog.at_level(logging.INFO, logger="vpnd"):
        assert daemon.run(str(path)) == 0
    assert errors(caplog) == []
    assert "stopping: closing sessions and removing kernel state" in caplog.messages
    assert fake.listeners[0].closed and "vpnsvc0" not in fake.fake_net.links
    assert list((site.dir / "run").iterdir()) == []  # lock and state file gone


def test_a_start_up_error_of_the_service_exits_1_with_one_line(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeEdges()
    fake.listen_error = OSError(98, "Address already in use")
    use(monkeypatch, fake)
    path = site.write(site.gateway_doc(listen=f"127.0.0.1:{free_port()}"))
    with caplog.at_level(logging.INFO, logger="vpnd"):
        assert daemon.run(str(path)) == 1
    assert errors(caplog) == [f"cannot start: listen {_listen(path)}: Address already in use"]


def _listen(path: Path) -> str:
    return str(json.loads(path.read_text())["listen"])


def test_a_live_control_socket_refuses_a_second_vpnd_before_any_check(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use(monkeypatch, FakeEdges())
    path = site.write(site.gateway_doc(listen=f"127.0.0.1:{free_port()}"))
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(site.dir / "vpnd.sock"))
        live.listen()
        assert daemon.run(str(path)) == 1
    (line,) = errors(caplog)
    assert "another vpnd is listening there" in line


def test_an_unusable_runtime_dir_exits_1(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = site.dir / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("VPND_RUNTIME_DIR", str(blocker))
    path = site.write(site.gateway_doc(listen=f"127.0.0.1:{free_port()}"))
    assert daemon.run(str(path)) == 1
    (line,) = errors(caplog)
    assert line.startswith("cannot start: runtime_dir")


def test_a_client_whose_certificate_expires_stops_with_a_local_error_without_renewal(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    later = (REAL + 60 * DAY).timestamp()
    use(monkeypatch, FakeEdges(wall=lambda: later))
    path = site.write(site.client_doc(renewal={"enabled": False}))
    assert daemon.run(str(path)) == 1
    last = errors(caplog)[-1]
    assert last.startswith("stopping: pki.cert: own certificate") and "a local problem" in last


def test_a_client_runs_until_sigterm(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class TermOnDial(FakeEdges):
        async def _dial(self, *args: Any, **kwargs: Any) -> Any:
            asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGTERM)
            return await super()._dial(*args, **kwargs)

    use(monkeypatch, TermOnDial())
    path = site.write(site.client_doc())
    assert daemon.run(str(path)) == 0
    assert errors(caplog) == []
