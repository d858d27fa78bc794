"""`vpnd enroll`: usage and refusals are one line each, never a traceback."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnd

from vpnd.pki.enrollment_token import EnrollmentToken


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def _token(port: int) -> str:
    return EnrollmentToken(f"127.0.0.1:{port}", "ab" * 32, "0" * 16, "s" * 43).encode()


def test_garbage_token(tmp_path: Path) -> None:
    code, _, err = run_vpnd("enroll", "vpnd1-zzzz", "--dir", str(tmp_path / "d"))
    assert code == 1
    assert "token" in assert_one_error_line(err, "vpnd")


def test_unreachable_gateway(tmp_path: Path) -> None:
    code, out, err = run_vpnd(
        "enroll", _token(_closed_port()), "--dir", str(tmp_path / "d"), "--timeout", "3"
    )
    assert code == 1 and out == ""
    assert "cannot reach the gateway" in assert_one_error_line(err, "vpnd")
    assert not (tmp_path / "d").exists()


def test_token_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(_token(_closed_port()) + "\n"))
    code, _, err = run_vpnd("enroll", "-", "--dir", str(tmp_path / "d"), "--timeout", "3")
    assert code == 1 and "cannot reach" in assert_one_error_line(err, "vpnd")


def test_existing_enrollment_refused_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("old")
    code, _, err = run_vpnd("enroll", _token(_closed_port()), "--dir", str(tmp_path))
    assert code == 1 and "--force" in assert_one_error_line(err, "vpnd")
    assert (tmp_path / "client.key").read_text() == "old"


@pytest.mark.parametrize(
    "argv",
    [
        ("enroll", "--dir", "x"),
        ("enroll", "tok"),
        ("--config", "c.yaml", "enroll", "tok", "--dir", "x"),
        ("enroll", "tok", "--dir", "x", "--timeout", "0"),
    ],
)
def test_usage_errors(argv: tuple[str, ...]) -> None:
    code, _, err = run_vpnd(*argv)
    assert code == 2
    assert_one_error_line(err, "vpnd")
