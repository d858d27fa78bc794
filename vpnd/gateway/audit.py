"""Audit-record helpers: what a record may say about a peer, and the log budgets.

A record names a certificate by name, serial and fingerprint, never by its body; a
refused peer's certificate may be anything, so reading it never raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography import x509

from vpnd.gateway.effects import Log
from vpnd.pki.identity import PeerIdentity
from vpnd.pki.profile import describe_certificate

Peername = tuple[str, int]


def presented(der: bytes | None) -> dict[str, str]:
    """Name, serial and fingerprint of a certificate a refused peer presented."""
    if not der:
        return {}
    try:
        info = describe_certificate(x509.load_der_x509_certificate(der))
    except Exception:  # a refused peer's certificate may be anything
        return {}
    return {"peer": info.name or "?", "serial": f"{info.serial:x}", "fingerprint": info.fingerprint}


def who(found: dict[str, str]) -> str:
    """`` (name, serial 1f)`` for a log line, or nothing."""
    return f" ({found['peer']}, serial {found['serial']})" if found else ""


def peer_fields(identity: PeerIdentity, remote: str) -> dict[str, object]:
    return {
        "peer": identity.name,
        "serial": identity.serial_hex,
        "fingerprint": identity.fingerprint,
        "remote": remote,
    }


def fmt_remote(peername: Peername | None) -> str:
    if peername is None:
        return "?"
    host, port = peername[0], peername[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_of(peername: Peername | None) -> str:
    return peername[0] if peername else "?"


@dataclass
class _Window:
    start: float
    used: int


class LogBudget:
    """At most ``per_minute`` lines per key per minute; the rest are counted, then summed
    up in one line appended to ``notes`` when the key's window ends."""

    def __init__(self, per_minute: int, notes: list[Log]) -> None:
        self.per_minute = per_minute
        self._notes = notes
        self._windows: dict[str, _Window] = {}

    def allow(self, key: str, now: float) -> bool:
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = _Window(now, 0)
            if len(self._windows) > 10000:  # bounded: forget the oldest windows
                for old in list(self._windows)[:5000]:
                    del self._windows[old]
        elif now - win.start >= 60:
            if win.used > self.per_minute:
                more = win.used - self.per_minute
                self._notes.append(
                    Log(logging.INFO, f"{key}: {more} more similar lines suppressed")
                )
            win.start, win.used = now, 0
        win.used += 1
        return win.used <= self.per_minute
