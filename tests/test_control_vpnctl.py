"""vpnctl status/peers/kick/reload in-process against a control server with a fake handler."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import run_vpnctl
from control_fixtures import STATUS, ServerThread, peer

from vpnctl.control_commands import duration, human_bytes
from vpnd.control.client import ENV_SOCKET
from vpnd.control.protocol import ControlError, ErrorCode
from vpnd.control.results import ReloadReport

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "vpnd.sock") as running:
        yield running


def columns(header: str, line: str, names: list[str]) -> list[str]:
    """Cut ``line`` at the offsets where ``header`` starts each column."""
    starts = [header.index(n) for n in names]
    ends = [*starts[1:], None]
    return [line[s:e].strip() for s, e in zip(starts, ends, strict=True)]


def test_status_text(server: ServerThread) -> None:
    code, out, err = run_vpnctl("--socket", str(server.path), "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    values = dict(line.split(None, 1) for line in lines if not line.startswith("policy"))
    assert values["role"] == "gateway"
    assert values["uptime"] == "1d02h"
    assert values["handshakes"] == "accepted 5, refused_revoked 1"
    assert values["drops"] == "spoofed_source 3"
    assert values["certificate"] == (
        "gw1 serial 1a2b, expires 2027-06-01 12:00:00Z (365 days left)"
    )
    assert values["crl"] == "number 4, next update 2026-06-08 12:00:00Z (in 7d00h)"
    # Aligned: every value starts in the same column.
    starts = {len(line) - len(line[len(line.split("  ")[0]) :].lstrip()) for line in lines}
    assert len(starts) == 1, out


def test_status_stale_crl_and_missing_crl(server: ServerThread) -> None:
    handler = server.handler
    assert STATUS.crl is not None
    stale = dataclasses.replace(STATUS.crl, seconds_left=-7200.0, stale=True)
    handler.status_info = dataclasses.replace(STATUS, crl=stale)
    code, out, _ = run_vpnctl("--socket", str(server.path), "status")
    assert code == 0 and "(STALE since 2h00m)" in out
    handler.status_info = dataclasses.replace(STATUS, crl=None)
    code, out, _ = run_vpnctl("status", "--socket", str(server.path))
    assert code == 0 and "none loaded" in out


def test_status_json_and_env_socket(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SOCKET, str(server.path))
    code, out, err = run_vpnctl("status", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == STATUS.to_json()


def test_peers_table(server: ServerThread) -> None:
    server.handler.peer_list = [
        peer("bob", "10.77.0.3", groups=[], drops={"spoofed_source": 2, "hairpin": 1}),
        peer("alice", "10.77.0.2", groups=["dev", "ops"], bytes_in=512, remote="[2001:db8::1]:4"),
    ]
    code, out, err = run_vpnctl("--socket", str(server.path), "peers")
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    names = ["NAME", "ADDRESS", "GROUPS", "REMOTE", "SINCE", "RX", "TX", "DROPS", "DAYS-LEFT"]
    assert header.split() == names
    assert [columns(header, r, names) for r in rows] == [
        [
            "alice",
            "10.77.0.2",
            "dev,ops",
            "[2001:db8::1]:4",
            "2026-06-01 12:00:00Z",
            "512 B",
            "3.0 MiB",
            "0",
            "30",
        ],
        [
            "bob",
            "10.77.0.3",
            "-",
            "192.0.2.1:50000",
            "2026-06-01 12:00:00Z",
            "1000 B",
            "3.0 MiB",
            "3",
            "30",
        ],
    ]


def test_peers_json(server: ServerThread) -> None:
    code, out, _ = run_vpnctl("peers", "--json", "--socket", str(server.path))
    assert code == 0
    assert json.loads(out) == [p.to_json() for p in server.handler.peer_list]


def test_peers_empty(server: ServerThread) -> None:
    server.handler.peer_list = []
    code, out, _ = run_vpnctl("--socket", str(server.path), "peers")
    assert code == 0 and out.split() == [
        "NAME",
        "ADDRESS",
        "GROUPS",
        "REMOTE",
        "SINCE",
        "RX",
        "TX",
        "DROPS",
        "DAYS-LEFT",
    ]


def test_kick(server: ServerThread) -> None:
    code, out, err = run_vpnctl(
        "--socket", str(server.path), "kick", "alice", "--reason", "laptop lost"
    )
    assert (code, out, err) == (0, "kicked alice: 1 session closed\n", "")
    assert server.handler.kicked == [("alice", "laptop lost")]
    code, out, _ = run_vpnctl("--socket", str(server.path), "kick", "bob", "--json")
    assert code == 0 and json.loads(out) == {"name": "bob", "closed": 1}


def test_kick_unknown_peer_is_exit_1(server: ServerThread) -> None:
    code, out, err = run_vpnctl("--socket", str(server.path), "kick", "mallory")
    assert (code, out) == (1, "")
    assert err == "vpnctl: error: not_found: no connected peer named 'mallory'\n"


def test_kick_bad_name_is_usage(server: ServerThread) -> None:
    code, _, err = run_vpnctl("--socket", str(server.path), "kick", "Not A Name!")
    assert code == 2 and err.startswith("vpnctl: error: ")
    assert server.handler.kicked == []


def test_reload(server: ServerThread) -> None:
    code, out, err = run_vpnctl("--socket", str(server.path), "reload")
    assert (code, err) == (0, "")
    assert out == "reloaded\n  policy: 3 rules -> 2 rules\n  closed bob (no longer allowed)\n"
    server.handler.reload_report = ReloadReport()
    assert run_vpnctl("--socket", str(server.path), "reload")[1] == "reloaded: nothing changed\n"
    code, out, _ = run_vpnctl("--socket", str(server.path), "reload", "--json")
    assert code == 0 and json.loads(out) == {"changed": [], "closed": [], "errors": []}


def test_reload_refused_or_partial_is_exit_1(server: ServerThread) -> None:
    server.handler.reload_error = ControlError(
        ErrorCode.INVALID_CONFIG, "gateway.yaml: tun.mtu: expected 576..65535, got 1"
    )
    code, out, err = run_vpnctl("--socket", str(server.path), "reload")
    assert (code, out) == (1, "")
    assert err == (
        "vpnctl: error: invalid_config: gateway.yaml: tun.mtu: expected 576..65535, got 1\n"
    )
    server.handler.reload_error = None
    server.handler.reload_report = ReloadReport(["crl: number 4 -> 5"], [], ["route 10.9.0.0/24"])
    code, out, err = run_vpnctl("--socket", str(server.path), "reload")
    assert code == 1
    assert "crl: number 4 -> 5" in out
    assert err == "vpnctl: error: reload: route 10.9.0.0/24\n"


def test_no_daemon_is_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "missing.sock"
    code, out, err = run_vpnctl("--socket", str(path), "status")
    assert (code, out) == (1, "")
    assert err == f"vpnctl: error: no such socket {path} (is vpnd running?)\n"


def test_malformed_reply_is_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "odd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b'{"id": 1, "ok": true, "result": {"peers": [{"name": "x"}]}}\n')

    t = threading.Thread(target=answer)
    t.start()
    try:
        code, out, err = run_vpnctl("--socket", str(path), "peers")
    finally:
        t.join(5)
        listener.close()
    assert (code, out) == (1, "")
    assert err == "vpnctl: error: malformed reply from vpnd: peers[0] lacks 'serial'\n"


def test_human_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 2**30, 3 * 2**50)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 GiB",
        "3072.0 TiB",
    ]
    assert [duration(s) for s in (0, 59.9, 61, 3600, 90061, -5)] == [
        "0s",
        "59s",
        "1m01s",
        "1h00m",
        "1d01h",
        "0s",
    ]


def test_client_status_shows_server_and_tunnel_state() -> None:
    import dataclasses

    from control_fixtures import STATUS

    from vpnctl.control_commands import status_text

    up = status_text(dataclasses.replace(STATUS, role="client", sessions=1))
    lines = dict(line.split(None, 1) for line in up.splitlines())
    assert lines["server"] == "0.0.0.0:4443" and lines["tunnel"] == "up"
    assert "policy rules" not in up and "crl" not in up
    down = status_text(dataclasses.replace(STATUS, role="client", sessions=0))
    assert "down (reconnecting)" in down
