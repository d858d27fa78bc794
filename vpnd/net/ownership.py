"""Which links vpnd owns: the ``vpnd:<pid>`` ifalias marker and the decision built on it.

Right after creating its TUN, vpnd sets the link's ifalias to ``vpnd:<pid>``. That
marker is the only thing that lets vpnd (or ``vpnd --check``, or ``vpnd cleanup``)
touch an existing link: a link without it is someone else's (eth0, a veth, a dummy,
another tool's TUN) and is never deleted. A marked link whose process is gone is a
stale leftover and may be removed; a marked link whose process lives belongs to a
running vpnd and is left alone.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["LinkOwner", "alias_owner", "classify_link", "format_alias", "pid_alive"]

ALIAS_PREFIX = "vpnd:"
_ALIAS = re.compile(r"vpnd:([1-9][0-9]{0,9})")


class LinkOwner(enum.Enum):
    FREE = "free"
    """No link of that name: vpnd may create it."""
    OURS_STALE = "ours-stale"
    """Marked by a vpnd process that is gone: may be deleted."""
    OURS_LIVE = "ours-live"
    """Marked by a vpnd process that still runs: leave it alone."""
    FOREIGN = "foreign"
    """Not vpnd's: never touch it."""


def format_alias(pid: int) -> str:
    """The ifalias vpnd puts on a link it created: ``vpnd:<pid>``."""
    if pid <= 0:
        raise ValueError(f"pid must be positive, not {pid}")
    return f"{ALIAS_PREFIX}{pid}"


def alias_owner(alias: str | None) -> int | None:
    """The pid in a ``vpnd:<pid>`` ifalias, or None if the alias is not vpnd's marker."""
    if alias is None:
        return None
    m = _ALIAS.fullmatch(alias.strip())
    return int(m.group(1)) if m else None


def pid_alive(pid: int, *, proc: str | os.PathLike[str] = "/proc") -> bool:
    """Does process ``pid`` exist (a zombie counts as gone: its files are closed)?"""
    try:
        stat = (Path(proc) / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # exists but unreadable: assume alive, the safe side
    try:
        state = stat.rsplit(")", 1)[1].split()[0]
    except IndexError:
        return True
    return state not in ("Z", "X")


def classify_link(
    exists: bool, alias: str | None, *, alive: Callable[[int], bool] = pid_alive
) -> LinkOwner:
    """Decide what vpnd may do with a link named like its TUN."""
    if not exists:
        return LinkOwner.FREE
    owner = alias_owner(alias)
    if owner is None:
        return LinkOwner.FOREIGN
    return LinkOwner.OURS_LIVE if alive(owner) else LinkOwner.OURS_STALE
