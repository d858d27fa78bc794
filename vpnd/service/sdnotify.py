"""systemd readiness notification (``Type=notify``) without libsystemd.

A no-op outside systemd: ``$NOTIFY_SOCKET`` is unset there.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vpnd.sdnotify")

ENV = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); True if it was sent, False if not under systemd."""
    where = os.environ.get(ENV)
    if not where:
        return False
    if where.startswith("@"):
        address = "\0" + where[1:]  # abstract namespace
    elif where.startswith("/"):
        address = where
    else:
        log.warning("%s=%r is not a unix socket path; not notifying", ENV, where)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("cannot notify systemd on %s: %s", where, err.strerror or err)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={_line(status)}" if status else ""))


def reloading() -> bool:
    return notify("RELOADING=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={_line(text)}")


def _line(text: str) -> str:
    # A newline would start a new (forged) assignment.
    return " ".join(text.split())
