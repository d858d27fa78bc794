"""JSON log lines: peer-supplied text cannot end a line, and the line stays the same JSON."""

from __future__ import annotations

import json
import logging

import pytest

from vpnd.telemetry.logsetup import JsonFormatter

HOSTILE = [
    "alice\u2028forged",
    "alice\u2029forged",
    "alice\x85forged",  # NEL
    "alice\x7fforged",  # DEL
    "alice\nforged",
    "alice\x1b[2Kforged",
    "alice\u200bforged",  # zero-width space: not printable either
]


@pytest.mark.parametrize("text", HOSTILE, ids=[repr(t)[1:13] for t in HOSTILE])
def test_json_log_lines_escape_line_separators_and_controls(text: str) -> None:
    record = logging.LogRecord("vpnd.audit", logging.WARNING, "x", 1, "refused %s", (text,), None)
    record.peer = text  # structured context (extra=) is escaped too
    line = JsonFormatter().format(record)
    assert line.isprintable(), repr(line)
    assert len(line.splitlines()) == 1
    assert "\u2028" not in line and "\u2029" not in line
    doc = json.loads(line)
    assert doc["msg"] == f"refused {text}"
    assert doc["peer"] == text


def test_json_log_lines_keep_printable_unicode_readable() -> None:
    record = logging.LogRecord("vpnd", logging.INFO, "x", 1, "peer %s \U0001f600", ("zoë",), None)
    line = JsonFormatter().format(record)
    assert "zoë" in line and "\U0001f600" in line
    assert json.loads(line)["msg"] == "peer zoë \U0001f600"
