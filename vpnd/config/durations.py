"""Durations as people write them: ``90``, ``90s``, ``30m``, ``24h``, ``7d``, ``2w``.

Shared by the config reader and vpnctl's ``--ttl``/``--lifetime`` flags so that both
accept exactly the same spellings.
"""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)")


class DurationError(ValueError):
    """Not a duration; the message says what is accepted."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``; DurationError with an example otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise DurationError(
            f"{text!r} is not a duration: use a number with s, m, h, d or w, e.g. 90s, 24h, 7d"
        )
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(value):
        raise DurationError(f"{text!r} is too long a duration")
    return value


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 604800 -> '7d', 5400 -> '90m', 0.5 -> '0.5s'."""
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
