"""One certificate on two hosts: bounded takeovers, then the newcomer is held down."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from pathlib import Path

import pytest
from inprocess_fixtures import World, issue_leaf
from test_config import SOURCE, gateway, parse, parse_error, pki_dir, with_value  # noqa: F401

from vpnd.config import GatewayConfig
from vpnd.policy.takeover import CLONE_REASON, TakeoverGuard, Verdict
from vpnd.telemetry.metrics import MetricsSnapshot, SnapshotCollector

A, B = "cert-a", "cert-b"
ALLOW, START, HELD = Verdict.ALLOW, Verdict.HOLD_START, Verdict.HELD

# (takeovers, window, hold), [(now, key, expected verdict)]: a stepped monotonic clock.
TABLE: list[tuple[tuple[int, float, float], list[tuple[float, str, Verdict]]]] = [
    # three takeovers in the window are fine; the fourth starts the hold-down
    ((3, 60, 600), [(0, A, ALLOW), (5, A, ALLOW), (10, A, ALLOW), (15, A, START)]),
    # while held, every attempt is refused and extends the hold
    ((3, 60, 100), [(0, A, ALLOW), (1, A, ALLOW), (2, A, ALLOW), (3, A, START), (90, A, HELD),
                    (189, A, HELD), (290, A, ALLOW)]),
    # takeovers spread wider than the window never trigger (a roaming laptop)
    ((3, 60, 600), [(0, A, ALLOW), (30, A, ALLOW), (61, A, ALLOW), (91, A, ALLOW),
                    (122, A, ALLOW), (152, A, ALLOW)]),
    # the window boundary: a takeover exactly `window` old no longer counts
    ((2, 60, 600), [(0, A, ALLOW), (1, A, ALLOW), (60, A, ALLOW), (61, A, ALLOW), (62, A, START)]),
    # certificates are counted apart
    ((2, 60, 600), [(0, A, ALLOW), (1, A, ALLOW), (2, B, ALLOW), (3, B, ALLOW), (4, A, START),
                    (5, B, START)]),
    # takeovers: 0 disables the hold-down
    ((0, 60, 600), [(t, A, ALLOW) for t in range(20)]),
]  # fmt: skip


@pytest.mark.parametrize(("limits", "steps"), TABLE)
def test_takeover_guard_table(
    limits: tuple[int, float, float], steps: list[tuple[float, str, Verdict]]
) -> None:
    guard = TakeoverGuard(*limits)
    got = [(now, key, guard.takeover(key, now)) for now, key, _ in steps]
    assert got == steps


def test_guard_memory_is_bounded() -> None:
    guard = TakeoverGuard(2, 60, 600)
    for i in range(TakeoverGuard.MAX_KEYS * 2):
        guard.takeover(i, float(i))
    assert len(guard._state) <= TakeoverGuard.MAX_KEYS


def test_config_defaults_and_values(pki_dir: Path) -> None:  # noqa: F811
    cfg = parse(gateway(), pki_dir)
    assert isinstance(cfg, GatewayConfig)
    d = cfg.duplicate_holddown
    assert (d.takeovers, d.window, d.hold) == (5, 60.0, 600.0)
    cfg = parse(
        with_value(gateway(), "duplicate_holddown", {"takeovers": 2, "window": 30, "hold": 5}),
        pki_dir,
    )
    assert isinstance(cfg, GatewayConfig)
    assert cfg.duplicate_holddown.takeovers == 2 and cfg.duplicate_holddown.hold == 5.0


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("duplicate_holddown.takeovers", -1, "duplicate_holddown.takeovers"),
        ("duplicate_holddown.takeovers", True, "duplicate_holddown.takeovers"),
        ("duplicate_holddown.window", 0, "duplicate_holddown.window"),
        ("duplicate_holddown.hold", "long", "duplicate_holddown.hold"),
        ("duplicate_holddown.holdoff", 3, "duplicate_holddown.holdoff"),
        ("duplicate_holddown", 5, "duplicate_holddown"),
    ],
)
def test_config_errors_name_the_yaml_path(
    pki_dir: Path,  # noqa: F811
    key: str,
    value: object,
    path: str,
) -> None:
    err = parse_error(with_value(gateway(), key, value), pki_dir)
    assert str(err).startswith(f"{SOURCE}: {path}"), str(err)


def test_metric_is_exported() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: MetricsSnapshot(clone_holddowns=3)))
    assert b"vpnd_clone_holddowns_total 3.0" in generate_latest(registry)


@pytest.mark.looptime
async def test_two_hosts_sharing_a_certificate_stop_flapping(tmp_path: Path) -> None:
    audit_lines = io.StringIO()
    handler = logging.StreamHandler(audit_lines)
    logging.getLogger("vpnd.audit").addHandler(handler)

    try:
        w = World(tmp_path)
        await w.start_gateway()
        assert w.gateway is not None
        gw = w.gateway
        # as a reload would: the gateway picks the new limits up at the next takeover
        gw.settings = dataclasses.replace(
            gw.settings, holddown_takeovers=2, holddown_window=3600, holddown_hold=3600
        )
        try:
            leaf = issue_leaf(w, "alice", "10.8.0.2")
            first = w.start_client("alice", leaf=leaf, label="alice1")
            await asyncio.wait_for(first.client.connected.wait(), 5)
            second = w.start_client("alice", leaf=leaf, label="alice2")

            def holder() -> int:
                return next(iter(gw.table.owners())).key if gw.table.owners() else 0

            # the two clients evict each other twice, then the newcomer is held down
            await w.until(
                lambda: gw.handshakes["refused_clone_holddown"] >= 1, "hold-down", timeout=60
            )
            held_by = holder()
            assert held_by != 0
            assert gw.totals["clone_holddowns"] == 1

            def told() -> bool:
                return any(
                    n.client.last_outcome is not None
                    and CLONE_REASON in n.client.last_outcome.message
                    for n in (first, second)
                )

            await w.until(told, "the held-down client is told why")
            # more attempts keep being refused and never evict the session that stays
            await w.until(
                lambda: gw.handshakes["refused_clone_holddown"] >= 2, "second refusal", timeout=60
            )
            assert holder() == held_by
            assert gw.handshakes["accepted"] == 3  # first, one takeover each way... then none
            assert gw.totals["clone_holddowns"] == 1
        finally:
            await w.close()
    finally:
        logging.getLogger("vpnd.audit").removeHandler(handler)
    assert "holding down alice" in audit_lines.getvalue()
    assert CLONE_REASON in audit_lines.getvalue()
