"""When a client renews its certificate: a pure schedule over *wall* time.

Certificate validity is wall time, so this is the one place in the renewal path that
works in Unix seconds; the client still sleeps on its monotonic clock and asks
``due(wall)`` again whenever it wakes (a stepped wall clock is noticed at the next
look, never by a timer armed on the wrong clock).

The first attempt falls at ``at`` of the lifetime (2/3 by default) plus or minus
``jitter`` of the lifetime, drawn once, so a fleet issued together does not renew in
the same second (SPIRE-style). A failure backs off exponentially with jitter,
bounded by ``backoff_max`` and by a quarter of the time left before notAfter, so a
client keeps several tries in hand before expiry. A renew hint makes it due at once.
"""

from __future__ import annotations

import math
import random

BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 900.0
BACKOFF_FLOOR = 1.0


class RenewalSchedule:
    """Renewal timing for one certificate (make a new one for the renewed certificate)."""

    def __init__(
        self,
        not_before: float,
        not_after: float,
        *,
        at: float = 0.67,
        jitter: float = 0.05,
        rng: random.Random | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        """``not_before``/``not_after``: the certificate's validity in Unix seconds.
        ``at`` and ``jitter`` are fractions of the lifetime. ``ValueError`` if unusable."""
        for name, value in (("not_before", not_before), ("not_after", not_after)):
            if not math.isfinite(value):
                raise ValueError(f"{name} {value!r} is not a finite time")
        if not_after <= not_before:
            raise ValueError("the certificate's notAfter is not after its notBefore")
        if not 0.0 < at < 1.0:
            raise ValueError(f"renewal point 'at' must be between 0 and 1, got {at}")
        if not 0.0 <= jitter < min(at, 1.0 - at):
            raise ValueError(f"jitter {jitter} must be at least 0 and leave 'at' inside (0, 1)")
        if not 0.0 < backoff_initial <= backoff_max:
            raise ValueError("backoff_initial must be positive and at most backoff_max")
        self.not_before = not_before
        self.not_after = not_after
        self.at = at
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        offset = (self._rng.random() * 2.0 - 1.0) * jitter
        self.target = not_before + self.lifetime * (at + offset)
        """The wall time of the first attempt."""
        self._next = self.target
        self._hinted = False
        self.failures = 0
        """Consecutive failed attempts since the last success (or hint)."""

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def age(self, wall: float) -> float:
        """Seconds since notBefore (negative if it is in the future)."""
        return wall - self.not_before

    def due(self, wall: float) -> bool:
        """Whether an attempt should start now."""
        return self._hinted or wall >= self._next

    def next_attempt_wall(self) -> float:
        """The wall time of the next attempt (``not_before``, i.e. already past, after a
        hint). ``seconds_until`` converts it for a monotonic sleep."""
        return self.not_before if self._hinted else self._next

    def seconds_until(self, wall: float) -> float:
        """Seconds from ``wall`` to the next attempt; 0 when due."""
        return 0.0 if self.due(wall) else self._next - wall

    def defer_until(self, wall: float) -> None:
        """No attempt before ``wall`` unless hinted: a certificate that is already due when
        it arrives (a gateway that backdates a lot) must not be renewed in a loop."""
        self._next = max(self._next, wall)

    def hint(self) -> None:
        """The gateway (or an operator) asked for a renewal: due at once."""
        self._hinted = True

    def failed(self, wall: float) -> float:
        """An attempt that started at about ``wall`` failed: back off. Returns the delay.

        The delay doubles per consecutive failure from ``backoff_initial`` up to
        ``backoff_max``, drawn in [delay/2, delay], and never exceeds a quarter of the
        time left before notAfter (but at least one second).
        """
        self._hinted = False
        self.failures += 1
        delay = min(self._backoff_max, self._backoff_initial * 2.0 ** min(self.failures - 1, 60))
        delay *= 0.5 + self._rng.random() / 2.0
        left = self.not_after - wall
        if left > 0:
            delay = min(delay, max(BACKOFF_FLOOR, left / 4.0))
        self._next = wall + delay
        return delay
