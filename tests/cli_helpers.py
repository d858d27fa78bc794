"""Run the vpnctl and vpnd command lines in-process, and keep the shell's env out.

``vpnctl_clean_env`` is registered in conftest.py, so any test can ask for it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TextIO

import pytest

import vpnctl.cli
import vpnd.cli
from vpnd.control.client import ENV_SOCKET

Main = Callable[[list[str], TextIO, TextIO], int]

# Everything vpnctl reads from the environment: a PKI directory, the CA passphrase
# file, the control socket and the ssh-agent (provisioning must use the given keys).
CLI_ENV = (vpnctl.cli.ENV_PKI, vpnctl.cli.ENV_PASSPHRASE_FILE, ENV_SOCKET, "SSH_AUTH_SOCK")


def _run(main: Main, argv: tuple[str, ...]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def run_vpnctl(*argv: str) -> tuple[int, str, str]:
    """``vpnctl ARGV...``: (exit code, stdout, stderr)."""
    return _run(vpnctl.cli.main, argv)


def run_vpnd(*argv: str) -> tuple[int, str, str]:
    """``vpnd ARGV...``: (exit code, stdout, stderr)."""
    return _run(vpnd.cli.main, argv)


def assert_one_error_line(err: str, program: str = "vpnctl") -> str:
    """A refusal is exactly one ``PROGRAM: error:`` line, never a traceback; return it."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{program}: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def vpnctl_clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits a PKI directory, passphrase file, socket or agent from the shell."""
    for var in CLI_ENV:
        monkeypatch.delenv(var, raising=False)
