"""Shared helpers for the vpnctl CLI tests: run main() in-process.

The fixtures they use (``pki``, ``out``, ``vpnctl_clean_env``) live in conftest.py.
"""

from __future__ import annotations

import io

from vpnctl import cli


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vpnctl: error: ")
    assert "Traceback" not in err
