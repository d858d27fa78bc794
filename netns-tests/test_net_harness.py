"""The harness itself: namespaces, veths, background processes, snapshots, cleanup proof."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nslib import PREFIX, HarnessError, NetnsFactory, list_namespaces, veth

pytestmark = pytest.mark.netns


def test_veth_between_namespaces_carries_pings(netns_factory: NetnsFactory) -> None:
    a, b = netns_factory(), netns_factory()
    assert a.name.startswith(PREFIX) and a.name != b.name
    na, nb = veth(a, b, "172.31.0.1/24", "172.31.0.2/24")
    assert na in a.run(["ip", "-o", "link"]).stdout
    assert nb in b.run(["ip", "-o", "link"]).stdout
    res = a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "172.31.0.2"])
    assert "3 packets transmitted, 3 received" in res.stdout
    # Nothing reaches outside our namespaces: there is no route anywhere else.
    assert a.run(["ping", "-c", "1", "-W", "1", "192.0.2.1"], check=False).returncode != 0


def test_snapshot_sees_changes_and_ignores_lifetimes(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    before = ns.snapshot()
    assert before == ns.snapshot()
    assert "addr: lo inet 127.0.0.1/8" in before
    ns.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"])
    ns.run(["ip", "addr", "add", "10.8.9.1/24", "dev", "d0"])
    ns.run(["ip", "link", "set", "d0", "up"])
    after = ns.snapshot()
    assert "10.8.9.1/24" in after and "route4: 10.8.9.0/24 dev d0" in after
    ns.run(["ip", "link", "del", "d0"])
    assert ns.snapshot() == before


def test_failed_command_is_a_clear_error(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    with pytest.raises(HarnessError, match=r"exit \d+: ip netns exec vpnt-.* ip route add"):
        ns.run(["ip", "route", "add", "10.1.0.0/16", "dev", "nosuchdev"])
    with pytest.raises(HarnessError, match=r"timed out after 0\.3s"):
        ns.run(["sleep", "5"], timeout=0.3)


def test_cleanup_stops_processes_and_deletes_namespaces(tmp_path: Path) -> None:
    factory = NetnsFactory()
    try:
        ns = factory()
        polite = ns.popen(["sleep", "300"], tmp_path / "sleep.log")
        # Ignores SIGTERM, so teardown has to escalate to SIGKILL.
        stubborn = ns.popen(
            ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
            tmp_path / "stubborn.log",
        )
        for _ in range(100):
            if "ready" in (tmp_path / "stubborn.log").read_text():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        # A stray started behind the harness's back, inside our namespace.
        stray = subprocess.Popen([*ns.exec_prefix(), "sleep", "300"], start_new_session=True)
        assert len(ns.pids()) >= 3
        assert ns.name in list_namespaces()
    finally:
        problems = factory.cleanup()
    assert problems == []
    assert polite.returncode is not None and stubborn.returncode is not None
    assert stray.wait(timeout=5) is not None
    assert ns.name not in list_namespaces()
    factory.assert_clean()
    factory.cleanup()  # idempotent


def test_assert_clean_notices_a_survivor() -> None:
    factory = NetnsFactory()
    ns = factory()
    try:
        with pytest.raises(AssertionError, match=ns.name):
            factory.assert_clean()
    finally:
        factory.cleanup()
    factory.assert_clean()
