"""Two clocks: sessions run on monotonic time; wall time only moves certificate expiry.

Both ends of a back-to-back pair get their own wall clock, stepped independently of
the shared monotonic ``now`` (stepped, never slept), forwards and backwards.
"""

from __future__ import annotations

import pytest
from proto_fixtures import TICK, Pair, tunnel_config

from vpnd.proto import CloseCode, SessionClosed, SessionState

WALL0 = 1_800_000_000.0  # wall clock at monotonic 0 (an arbitrary Unix time)
INTERVAL = 2.0
TIMEOUT = 6.0


class ClockPair(Pair):
    """A ``Pair`` whose two ends each have a wall clock: ``WALL0 + now + offset``."""

    def __init__(self) -> None:
        super().__init__()
        self.gw_step = 0.0
        self.cl_step = 0.0
        self.handshake(tunnel_config(interval=INTERVAL, timeout=TIMEOUT))

    def gw_wall(self) -> float:
        return WALL0 + self.now + self.gw_step

    def cl_wall(self) -> float:
        return WALL0 + self.now + self.cl_step

    def step(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.now += TICK
            for session, wall in ((self.gw, self.gw_wall), (self.cl, self.cl_wall)):
                timer = session.get_timer()
                if timer is not None and timer <= self.now:
                    session.handle_timer(self.now, wall())
            self.pump()

    def run_until_closed(self, limit: float) -> float:
        """Step until the gateway session closes; the monotonic time it closed at."""
        while self.gw.state is not SessionState.CLOSED:
            assert self.now < limit, "never closed"
            self.step()
        return self.now

    def frames_in(self) -> tuple[int, int]:
        return self.gw.counters.frames_in, self.cl.counters.frames_in


@pytest.mark.parametrize(("gw_step", "cl_step"), [(120.0, -120.0), (-120.0, 120.0)])
def test_idle_tunnel_survives_wall_steps_on_both_sides(gw_step: float, cl_step: float) -> None:
    pair = ClockPair()
    pair.gw.set_expiry(pair.gw_wall() + 86400, CloseCode.CERT_EXPIRED, "x",
                       now=pair.now, wall=pair.gw_wall())  # fmt: skip
    pair.step(int(3 / TICK))
    pair.gw_step, pair.cl_step = gw_step, cl_step  # both clocks step at once
    before = pair.frames_in()
    pair.step(int(10 * TIMEOUT / TICK))
    pair.gw_step, pair.cl_step = -gw_step, -cl_step  # and step back past the start
    pair.step(int(10 * TIMEOUT / TICK))
    assert pair.gw.state is SessionState.ESTABLISHED
    assert pair.cl.state is SessionState.ESTABLISHED
    assert pair.closed(pair.gw_events) == pair.closed(pair.cl_events) == []
    # Keepalives kept flowing both ways the whole time (idle: nothing else is sent).
    after = pair.frames_in()
    assert after[0] - before[0] >= 20 * TIMEOUT / INTERVAL  # one frame per interval
    assert after[1] - before[1] >= 20 * TIMEOUT / INTERVAL
    assert pair.cl.rtt is not None


@pytest.mark.parametrize("wall_step", [120.0, -120.0])
def test_dead_peer_is_detected_on_monotonic_time_while_the_wall_steps(wall_step: float) -> None:
    pair = ClockPair()
    pair.step(int(1 / TICK))
    pair.c2g = False  # the client goes silent
    silent_since = pair.gw_last_rx
    pair.step()
    pair.gw_step = pair.cl_step = wall_step
    closed_at = pair.run_until_closed(limit=silent_since + 10 * TIMEOUT)
    assert closed_at == silent_since + TIMEOUT  # not earlier (+120 s), not later (-120 s)
    [closed] = pair.closed(pair.gw_events)
    assert closed.code == CloseCode.KEEPALIVE_TIMEOUT


def test_keepalive_pings_on_monotonic_time_when_the_wall_steps_back() -> None:
    pair = ClockPair()
    pair.step(int(1 / TICK))
    pair.gw_step = pair.cl_step = -120.0
    sent = pair.gw.counters.frames_out
    pair.step(int(INTERVAL / TICK) + 1)  # one interval later, not 120 s later
    assert pair.gw.counters.frames_out > sent


def test_expiry_cuts_exactly_at_not_after_when_the_wall_steps_back() -> None:
    pair = ClockPair()
    not_after = pair.gw_wall() + 10.0  # due at monotonic 10 by the original wall
    pair.gw.set_expiry(not_after, CloseCode.CERT_EXPIRED, "2027-01-15T08:00:00+00:00",
                       now=pair.now, wall=pair.gw_wall())  # fmt: skip
    pair.step(int(2 / TICK))
    pair.gw_step = -120.0  # the wall clock was 120 s fast; now it is right
    expected = pair.now + (not_after - pair.gw_wall())
    closed_at = pair.run_until_closed(limit=200.0)
    # Not at the stale monotonic deadline, but when the wall clock reaches notAfter.
    assert closed_at == expected
    assert pair.gw_wall() == not_after
    assert pair.closed(pair.gw_events) == [
        SessionClosed(CloseCode.CERT_EXPIRED, "2027-01-15T08:00:00+00:00", by_peer=False)
    ]
    assert pair.closed(pair.cl_events)[0].code == CloseCode.CERT_EXPIRED


def test_expiry_cuts_exactly_at_not_after_when_the_wall_steps_forward() -> None:
    pair = ClockPair()
    not_after = pair.gw_wall() + 1000.0
    pair.gw.set_expiry(not_after, CloseCode.CERT_EXPIRED, "t", now=pair.now, wall=pair.gw_wall())
    pair.step(int(2 / TICK))
    pair.gw_step = 120.0  # the wall clock was 120 s slow
    closed_at = pair.run_until_closed(limit=2000.0)
    assert pair.gw_wall() == not_after  # 120 s earlier on the monotonic clock
    assert closed_at == 1000.0 - 120.0
    assert pair.closed(pair.gw_events)[0].code == CloseCode.CERT_EXPIRED


def test_a_forward_step_past_not_after_cuts_within_one_tick() -> None:
    pair = ClockPair()
    not_after = pair.gw_wall() + 60.0
    pair.gw.set_expiry(not_after, CloseCode.CERT_EXPIRED, "t", now=pair.now, wall=pair.gw_wall())
    pair.step(int(2 / TICK))
    stepped_at = pair.now
    pair.gw_step = 120.0  # notAfter is now in the past
    closed_at = pair.run_until_closed(limit=60.0)
    assert closed_at <= stepped_at + INTERVAL + TICK  # the next keepalive tick
    assert pair.closed(pair.gw_events)[0].code == CloseCode.CERT_EXPIRED


def test_expiry_already_past_closes_at_the_next_timer() -> None:
    pair = ClockPair()
    pair.gw.set_expiry(pair.gw_wall() - 1, CloseCode.CERT_EXPIRED, "t",
                       now=pair.now, wall=pair.gw_wall())  # fmt: skip
    assert pair.gw.get_timer() == pair.now
    pair.step()
    assert pair.closed(pair.gw_events)[0].code == CloseCode.CERT_EXPIRED


def test_a_monotonic_deadline_replaces_an_expiry_and_clear_forgets_both() -> None:
    pair = ClockPair()
    pair.gw.set_expiry(pair.gw_wall() + 1, CloseCode.CERT_EXPIRED, "t",
                       now=pair.now, wall=pair.gw_wall())  # fmt: skip
    pair.gw.clear_deadline()
    pair.gw_step = 3600.0
    pair.step(int(3 * INTERVAL / TICK))
    assert pair.gw.state is SessionState.ESTABLISHED
    pair.gw.set_expiry(pair.gw_wall() + 1, CloseCode.CERT_EXPIRED, "t",
                       now=pair.now, wall=pair.gw_wall())  # fmt: skip
    pair.gw.set_deadline(pair.now + 100, CloseCode.KICKED, "later")  # replaces the expiry
    pair.step(int(3 * INTERVAL / TICK))  # the wall passed notAfter: ignored now
    assert pair.gw.state is SessionState.ESTABLISHED
