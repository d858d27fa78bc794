"""Logging an operator can grep: text or JSON lines, per-peer context, never secrets."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

# Attributes every LogRecord has; anything else was passed via `extra=` and is context.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any structured context."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        line = json.dumps(doc, default=str, ensure_ascii=False)
        # json escapes only C0 controls, '"' and '\\'. DEL, C1 (NEL), U+2028/U+2029 and the
        # other non-printables would pass raw: U+2028/9 end a line in JavaScript and in
        # many viewers, so a peer-supplied name could forge a log line. Escape them all
        # (\uXXXX, surrogate pairs above the BMP): the line stays valid, equal JSON.
        if line.isprintable():
            return line
        return "".join(ch if ch.isprintable() else _json_escape(ch) for ch in line)


def _json_escape(ch: str) -> str:
    return json.dumps(ch)[1:-1]  # ensure_ascii: "\u2028", "\ud83d\ude00"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # Peer-supplied text (a refused certificate's CN, say) must not forge log lines:
        # not with \n or \r, nor with VT, NEL, U+2028 or terminal escape sequences.
        if line.isprintable():
            return line
        return "".join(ch if ch.isprintable() else _escape(ch) for ch in line)


def _escape(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class PeerLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the peer's name and certificate fingerprint (aioquic style)."""

    def process(
        self, msg: str, kwargs: MutableMapping[str, Any]
    ) -> tuple[str, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        prefix = extra.get("peer") or extra.get("remote") or "?"
        fp = extra.get("fingerprint")
        tag = f"[{prefix} {str(fp)[:16]}]" if fp else f"[{prefix}]"
        return f"{tag} {msg}", kwargs
