"""sd_notify: datagrams reach $NOTIFY_SOCKET (path or abstract); no-op outside systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpnd.service import sdnotify


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv(sdnotify.ENV, str(path))
    yield sock
    sock.close()


def test_unset_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sdnotify.ENV, raising=False)
    assert sdnotify.notify("READY=1") is False


def test_ready_status_and_reload(receiver: socket.socket) -> None:
    assert sdnotify.ready("serving 3 peers\nMAINPID=1")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 3 peers MAINPID=1"
    assert sdnotify.reloading()
    assert receiver.recv(4096) == b"RELOADING=1"
    assert sdnotify.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"
    assert sdnotify.status("ok")
    assert receiver.recv(4096) == b"STATUS=ok"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vpnd-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv(sdnotify.ENV, "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_unreachable_or_odd_address_is_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sdnotify.ENV, str(tmp_path / "gone.sock"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv(sdnotify.ENV, "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False
