"""The control socket over a real unix socket: modes, stale/live sockets, bad lines,
limits, several clients, non-root refusal, and the sync client's error messages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from control_fixtures import STATUS, FakeHandler, LineSocket, ServerThread

from vpnd.control.client import ControlClient, ControlClientError
from vpnd.control.protocol import MAX_LINE, ControlError, ErrorCode
from vpnd.control.results import ReloadReport
from vpnd.control.server import ControlServer, ControlServerError


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "vpnd.sock"


def reply(conn: LineSocket) -> dict[str, object]:
    doc = json.loads(conn.line())
    assert isinstance(doc, dict)
    return doc


def error_code(doc: dict[str, object]) -> str:
    err = doc["error"]
    assert isinstance(err, dict)
    return str(err["code"])


def test_socket_is_0600_in_a_new_0700_directory(sock_path: Path) -> None:
    with ServerThread(sock_path):
        assert stat.S_ISSOCK(sock_path.lstat().st_mode)
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
        assert ControlClient(sock_path).call("ping")["pong"] is True
    assert not sock_path.exists(), "the socket is removed on close"


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays, nobody listens: what a SIGKILLed vpnd leaves
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    with ServerThread(sock_path):
        assert ControlClient(sock_path).call("ping")["pong"] is True


def test_live_socket_is_refused_and_keeps_serving(sock_path: Path) -> None:
    with ServerThread(sock_path) as first:
        second = ControlServer(sock_path, FakeHandler())
        with pytest.raises(ControlServerError, match="another vpnd is already running on"):
            first.run(second.start())
        assert ControlClient(sock_path).call("ping")["pong"] is True


def test_a_regular_file_is_not_deleted(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    sock_path.write_text("precious")
    with pytest.raises(ControlServerError, match="exists and is not a socket"):
        ServerThread(sock_path).__enter__()
    assert sock_path.read_text() == "precious"


def test_malformed_line_then_the_connection_still_works(sock_path: Path) -> None:
    with ServerThread(sock_path), LineSocket(sock_path) as conn:
        conn.send(b"this is not json\n")
        doc = reply(conn)
        assert doc["ok"] is False and doc["id"] is None
        assert error_code(doc) == "bad_request"
        # Pipelined: several requests in one write, answered in order.
        conn.send(
            b'{"id": 1, "cmd": "ping"}\n{"id": 2, "cmd": "nope"}\n{"id": 3, "cmd": "status"}\n'
        )
        one, two, three = reply(conn), reply(conn), reply(conn)
        assert one["id"] == 1 and one["ok"] is True
        assert two["id"] == 2 and error_code(two) == "unknown_command"
        assert three["id"] == 3 and three["result"] == STATUS.to_json()


def test_oversize_line_gets_too_large_and_others_are_unaffected(sock_path: Path) -> None:
    with ServerThread(sock_path), LineSocket(sock_path) as big, LineSocket(sock_path) as other:
        big.send(b"x" * (MAX_LINE + 4096) + b"\n")
        assert error_code(reply(big)) == "too_large"
        assert big.closed()
        other.send(b'{"id": 5, "cmd": "ping"}\n')
        assert reply(other)["ok"] is True


def test_line_at_the_limit_is_read(sock_path: Path) -> None:
    with ServerThread(sock_path), LineSocket(sock_path) as conn:
        body = b'{"id":1,"cmd":"ping","p":"' + b"y" * (MAX_LINE - 28) + b'"}'
        assert len(body) == MAX_LINE
        conn.send(body + b"\n")
        doc = reply(conn)
        assert error_code(doc) == "bad_request" and doc["id"] == 1  # parsed: unknown field


def test_handler_errors_map_to_codes(sock_path: Path) -> None:
    handler = FakeHandler()
    with ServerThread(sock_path, handler):
        client = ControlClient(sock_path)
        with pytest.raises(ControlError) as info:
            client.call("kick", {"name": "mallory", "reason": ""})
        assert info.value.code is ErrorCode.NOT_FOUND
        assert client.kick("alice", "bye").closed == 1
        assert handler.kicked == [("alice", "bye")]

        handler.status_error = RuntimeError("secret detail\nwith a second line")
        with pytest.raises(ControlError) as info:
            client.call("status")
        assert info.value.code is ErrorCode.INTERNAL
        assert info.value.message == "status failed: RuntimeError"  # no traceback, no detail
        handler.status_error = None
        assert client.status() == STATUS  # the daemon survived

        handler.reload_error = ControlError(ErrorCode.INVALID_CONFIG, "gateway.yaml: tun.mtu: bad")
        with pytest.raises(ControlError) as info:
            client.reload()
        assert info.value.code is ErrorCode.INVALID_CONFIG


def test_concurrent_reload_is_busy(sock_path: Path) -> None:
    handler = FakeHandler()
    handler.reload_gate = threading.Event()
    results: list[ReloadReport] = []
    with ServerThread(sock_path, handler):
        first = threading.Thread(target=lambda: results.append(ControlClient(sock_path).reload()))
        first.start()
        try:
            assert handler.reload_entered.wait(5)
            with pytest.raises(ControlError) as info:
                ControlClient(sock_path).reload()
            assert info.value.code is ErrorCode.BUSY
        finally:
            handler.reload_gate.set()
            first.join(10)
        assert results == [handler.reload_report]
        assert ControlClient(sock_path).reload() == handler.reload_report  # free again


def test_several_clients_at_once(sock_path: Path) -> None:
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            client = ControlClient(sock_path)
            for _ in range(20):
                assert len(client.peers()) == 2
                assert client.status().pid == STATUS.pid
        except BaseException as exc:
            failures.append(exc)

    with ServerThread(sock_path):
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not failures


def test_client_limit_and_idle_timeout(sock_path: Path) -> None:
    with ServerThread(sock_path, max_clients=2, idle_timeout=0.3):
        with LineSocket(sock_path) as a, LineSocket(sock_path) as b:
            a.send(b'{"id":1,"cmd":"ping"}\n')
            b.send(b'{"id":1,"cmd":"ping"}\n')
            assert reply(a)["ok"] and reply(b)["ok"]  # both are being served
            with LineSocket(sock_path) as c:
                assert error_code(reply(c)) == "busy"
                assert c.closed()
            # Silent clients are dropped, which frees the slots.
            assert a.closed() and b.closed()
        assert ControlClient(sock_path).call("ping")["pong"] is True


def test_client_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sock"
    with pytest.raises(
        ControlClientError, match=r"no such socket .*nope\.sock \(is vpnd running\?\)"
    ):
        ControlClient(missing).call("ping")
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()
    with pytest.raises(ControlClientError, match="nobody is listening"):
        ControlClient(stale).call("ping")
    with pytest.raises(ControlClientError, match="unknown command"):
        ControlClient(stale).call("shutdown")


def test_client_timeout_and_garbage_reply(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    try:
        with pytest.raises(ControlClientError, match=r"did not answer within 0\.2s"):
            ControlClient(path, timeout=0.2).call("ping")
        accepted, _ = listener.accept()
        accepted.close()

        def garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b'{"id": 1, "ok": "maybe"}\n')

        t = threading.Thread(target=garbage)
        t.start()
        with pytest.raises(ControlClientError, match="malformed reply"):
            ControlClient(path).call("ping")
        t.join(5)
    finally:
        listener.close()


# --- a non-root client (uid 65534) ----------------------------------------------------------

NOBODY = 65534


def _raw_status(path: Path) -> str:
    with LineSocket(path) as conn:
        # The server may refuse (and close) before reading: the reply is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(b'{"id": 1, "cmd": "status"}\n')
        return conn.line().decode()


def _client_status(path: Path) -> str:
    try:
        ControlClient(path).call("status")
    except ControlClientError as err:
        return str(err)
    return "answered"


def _as_nobody(fn: Callable[[Path], str], path: Path) -> str:
    """Run ``fn(path)`` in a forked child that dropped to uid/gid 65534; return its text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            text = fn(path)
            status = 0
        except BaseException as exc:
            text = f"child failed: {exc!r}"
        finally:
            os.write(write_end, text.encode())
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()  # EOF when the child exits (it holds the only writer)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, output
    return output


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as uid 65534")
    # pytest's tmp_path sits under a 0700 directory nobody cannot traverse.
    path = Path(tempfile.mkdtemp(prefix="vpnd-ctl-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path)


def test_non_root_client_cannot_connect_to_the_0600_socket(shared_dir: Path) -> None:
    path = shared_dir / "vpnd.sock"
    with ServerThread(path):
        said = _as_nobody(_client_status, path)
    assert said == f"permission denied on {path} (run as root)"


def test_non_root_client_is_refused_by_peer_credentials(shared_dir: Path) -> None:
    path = shared_dir / "vpnd.sock"
    handler = FakeHandler()
    with ServerThread(path, handler):
        path.chmod(0o666)  # a mode mistake must not open the API: SO_PEERCRED still says no
        said = _as_nobody(_raw_status, path)
        assert ControlClient(path).status() == STATUS  # root still served
    doc = json.loads(said)
    assert doc["ok"] is False and error_code(doc) == "forbidden"
    assert "root" in doc["error"]["message"]
