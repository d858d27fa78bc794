"""RenewalSchedule: pure wall-time arithmetic, stepped by hand."""

from __future__ import annotations

import random
from typing import Any

import pytest

from vpnd.proto.renewal import RenewalSchedule

DAY = 86400.0
WEEK = 7 * DAY
T0 = 1_800_000_000.0


class FixedRng(random.Random):
    """random() returns the given values in turn (the last one repeats)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def test_due_at_two_thirds_without_jitter() -> None:
    s = RenewalSchedule(T0, T0 + WEEK, at=0.67, jitter=0.0)
    target = T0 + 0.67 * WEEK
    assert s.next_attempt_wall() == pytest.approx(target)
    assert not s.due(target - 1)
    assert s.due(target)
    assert s.seconds_until(target - 10) == pytest.approx(10)
    assert s.seconds_until(target + 10) == 0.0
    assert s.age(T0 + DAY) == DAY


@pytest.mark.parametrize(("draw", "fraction"), [(0.0, 0.62), (0.5, 0.67), (1.0, 0.72)])
def test_jitter_spreads_the_target_by_a_fraction_of_the_lifetime(
    draw: float, fraction: float
) -> None:
    s = RenewalSchedule(T0, T0 + WEEK, at=0.67, jitter=0.05, rng=FixedRng(draw))
    assert s.target == pytest.approx(T0 + fraction * WEEK)


def test_a_fleet_spreads_out() -> None:
    rng = random.Random(1)
    targets = {round(RenewalSchedule(T0, T0 + WEEK, rng=rng).target) for _ in range(50)}
    assert len(targets) == 50
    assert all(T0 + 0.62 * WEEK <= t <= T0 + 0.72 * WEEK for t in targets)


def test_hint_makes_it_due_at_once_and_a_failure_clears_it() -> None:
    s = RenewalSchedule(T0, T0 + WEEK, jitter=0.0, rng=FixedRng(1.0))
    now = T0 + DAY
    assert not s.due(now)
    s.hint()
    assert s.due(now) and s.seconds_until(now) == 0.0
    assert s.next_attempt_wall() <= now
    delay = s.failed(now)
    assert delay == 10.0
    assert not s.due(now + 9.9) and s.due(now + 10.0)


def test_backoff_doubles_with_jitter_and_is_bounded() -> None:
    s = RenewalSchedule(T0, T0 + 365 * DAY, rng=FixedRng(1.0))  # no jitter reduction
    wall = s.target
    delays = []
    for _ in range(10):
        delays.append(s.failed(wall))
        wall += delays[-1]
        assert s.due(wall) and not s.due(wall - 0.5)
    assert delays == [10, 20, 40, 80, 160, 320, 640, 900, 900, 900]
    assert s.failures == 10
    low = RenewalSchedule(T0, T0 + 365 * DAY, rng=FixedRng(0.0))
    assert low.failed(T0) == 5.0  # drawn in [delay/2, delay]


def test_backoff_keeps_tries_in_hand_before_expiry() -> None:
    s = RenewalSchedule(T0, T0 + WEEK, rng=FixedRng(1.0))
    for _ in range(9):
        s.failed(T0)
    # 40 s before notAfter: at most a quarter of what is left.
    assert s.failed(T0 + WEEK - 40) == 10.0
    assert s.failed(T0 + WEEK - 2) == 1.0  # floor
    # Already expired (quarantine): the plain bounded backoff.
    assert s.failed(T0 + WEEK + 5) == 900.0


def test_short_lifetimes_work_to_the_second() -> None:
    s = RenewalSchedule(T0, T0 + 30, at=0.5, jitter=0.0)
    assert s.target == T0 + 15
    assert s.failed(T0 + 15) <= 30 / 4


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"not_after": T0}, "not after"),
        ({"not_after": float("inf")}, "finite"),
        ({"at": 1.0}, "between 0 and 1"),
        ({"at": 0.0}, "between 0 and 1"),
        ({"jitter": 0.4, "at": 0.67}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"backoff_initial": 0.0}, "backoff"),
    ],
)
def test_unusable_parameters_are_one_clear_error(kwargs: dict[str, Any], words: str) -> None:
    args: dict[str, Any] = {"not_after": T0 + WEEK, **kwargs}
    not_after = args.pop("not_after")
    with pytest.raises(ValueError, match=words):
        RenewalSchedule(T0, not_after, **args)


def test_defer_until_holds_back_a_schedule_that_is_due_on_arrival() -> None:
    from vpnd.proto.renewal import RenewalSchedule

    # A certificate backdated by most of its lifetime: due the moment it arrives.
    sched = RenewalSchedule(1000.0, 1100.0, at=0.5, jitter=0.0)
    assert sched.due(1090.0)
    sched.defer_until(1095.0)
    assert not sched.due(1090.0) and sched.seconds_until(1090.0) == 5.0
    assert sched.due(1095.0)
    sched.defer_until(1000.0)  # never earlier than already planned
    assert sched.next_attempt_wall() == 1095.0
    sched.hint()  # a hint still renews at once
    assert sched.due(1090.0)
