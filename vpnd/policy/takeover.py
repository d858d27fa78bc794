"""Hold-down for a certificate that keeps taking its own session over (a likely copy).

Under ``duplicate: replace`` a second connection with a connected certificate evicts
the first, which is right for a laptop that roamed. Two hosts holding one certificate
would evict each other forever. After ``takeovers`` takeovers of one certificate within
``window`` seconds, the next newcomer is refused, and so is every newcomer until
``hold`` seconds pass with no attempt; the connected session stays.

Pure and driven by the caller's monotonic ``now``: no clock is read here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum

CLONE_REASON = "this certificate is in use from another host; possible copy"


class Verdict(Enum):
    ALLOW = "allow"
    """Take the session over (the takeover is recorded)."""
    HOLD_START = "hold_start"
    """Refuse: this attempt started a hold-down (audit it once)."""
    HELD = "held"
    """Refuse: the certificate is held down (the hold is extended)."""


@dataclass
class _State:
    times: deque[float] = field(default_factory=deque)
    held_until: float = float("-inf")


class TakeoverGuard:
    """Counts takeovers per certificate key; ``takeovers == 0`` disables the hold-down."""

    MAX_KEYS = 10000

    def __init__(self, takeovers: int, window: float, hold: float) -> None:
        self.takeovers = takeovers
        self.window = window
        self.hold = hold
        self._state: dict[Hashable, _State] = {}

    def takeover(self, key: Hashable, now: float) -> Verdict:
        """A newcomer wants to take over ``key``'s connected session at ``now``."""
        if self.takeovers <= 0:
            return Verdict.ALLOW
        st = self._state.get(key)
        if st is None:
            self._forget_stale(now)
            st = self._state[key] = _State()
        if now < st.held_until:
            st.held_until = now + self.hold
            return Verdict.HELD
        while st.times and st.times[0] <= now - self.window:
            st.times.popleft()
        if len(st.times) >= self.takeovers:
            st.times.clear()
            st.held_until = now + self.hold
            return Verdict.HOLD_START
        st.times.append(now)
        return Verdict.ALLOW

    def _forget_stale(self, now: float) -> None:
        """Bounded memory: drop keys with nothing recent, then the oldest if still full."""
        if len(self._state) < self.MAX_KEYS:
            return
        for key in [
            k
            for k, s in self._state.items()
            if now >= s.held_until and (not s.times or s.times[-1] <= now - self.window)
        ]:
            del self._state[key]
        while len(self._state) >= self.MAX_KEYS:
            del self._state[next(iter(self._state))]
