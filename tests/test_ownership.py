"""The ``vpnd:<pid>`` link marker, the ownership decision, the per-(netns, TUN) lock and
the sysctl ledger that keeps the value forwarding had before vpnd first changed it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vpnd.net.fakes import FakeNetConfigurator
from vpnd.net.ownership import LinkOwner, alias_owner, classify_link, format_alias, pid_alive
from vpnd.service.runstate import AlreadyRunning, InstanceLock, InstanceState, SysctlLedger

IP4 = "net/ipv4/ip_forward"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_format_and_parse_the_marker() -> None:
    assert format_alias(1234) == "vpnd:1234"
    assert alias_owner("vpnd:1234") == 1234
    with pytest.raises(ValueError):
        format_alias(0)


@pytest.mark.parametrize(
    "alias", [None, "", "vpnd", "vpnd:", "vpnd:0", "vpnd:-1", "vpnd:12x", "uplink", "xvpnd:12"]
)
def test_anything_else_is_not_the_marker(alias: str | None) -> None:
    assert alias_owner(alias) is None


MATRIX = [
    # exists, alias, owner alive, decision
    (False, None, False, LinkOwner.FREE),
    (True, None, False, LinkOwner.FOREIGN),
    (True, "uplink to isp", True, LinkOwner.FOREIGN),
    (True, "vpnd:42", True, LinkOwner.OURS_LIVE),
    (True, "vpnd:42", False, LinkOwner.OURS_STALE),
]


@pytest.mark.parametrize(("exists", "alias", "alive", "want"), MATRIX)
def test_classify(exists: bool, alias: str | None, alive: bool, want: LinkOwner) -> None:
    assert classify_link(exists, alias, alive=lambda _pid: alive) is want


def test_pid_alive_sees_us_and_not_a_reaped_child() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())


def test_second_lock_on_the_same_tun_and_netns_is_refused(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path, "vpn0", netns="111")
    first.acquire()
    with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
        InstanceLock(tmp_path, "vpn0", netns="111").acquire()
    # Another namespace, or another TUN name, is another instance.
    other_ns, other_tun = (
        InstanceLock(tmp_path, "vpn0", netns="222"),
        InstanceLock(tmp_path, "vpn1", netns="111"),
    )
    other_ns.acquire()
    other_tun.acquire()
    for lock in (first, other_ns, other_tun):
        lock.release()
    assert not list(tmp_path.iterdir())


def test_state_round_trips(tmp_path: Path) -> None:
    st = InstanceState(pid=7, tun="vpn0", links=["vpn0"], nft_tables=["vpnd_vpn0"])
    st.save(tmp_path / "s.json")
    assert InstanceState.load(tmp_path / "s.json") == st
    (tmp_path / "bad.json").write_text("{torn")
    assert InstanceState.load(tmp_path / "bad.json") is None


def test_the_last_holder_restores_the_original(tmp_path: Path) -> None:
    net = FakeNetConfigurator()
    ledger = SysctlLedger(tmp_path, netns="1")
    assert ledger.hold(net, IP4, "1", os.getpid()) == "0"
    assert net.forwarding["ipv4"]
    assert ledger.release(net, IP4, os.getpid()) == "sysctl net.ipv4.ip_forward restored to 0"
    assert not net.forwarding["ipv4"]
    assert not list(tmp_path.iterdir()), "the ledger leaves no file once nothing is held"


def test_a_crash_does_not_record_vpnds_own_1_as_the_original(tmp_path: Path) -> None:
    net = FakeNetConfigurator()
    ledger = SysctlLedger(tmp_path, netns="1")
    crashed = _dead_pid()
    ledger.hold(net, IP4, "1", crashed)  # then SIGKILL: nothing released
    assert net.forwarding["ipv4"]
    # The restart: "1" is what the crash left, the original stays "0".
    assert ledger.hold(net, IP4, "1", os.getpid()) == "0"
    ledger.release(net, IP4, os.getpid())
    assert not net.forwarding["ipv4"]


def test_cleanup_restores_only_what_no_live_vpnd_holds(tmp_path: Path) -> None:
    net = FakeNetConfigurator()
    ledger = SysctlLedger(tmp_path, netns="1")
    ledger.hold(net, IP4, "1", os.getpid())  # a live instance
    ledger.hold(net, "net/ipv6/conf/all/forwarding", "1", _dead_pid())  # a dead one
    assert ledger.release_dead(net) == ["sysctl net.ipv6.conf.all.forwarding restored to 0"]
    assert net.forwarding == {"ipv4": True, "ipv6": False}
    # A second live holder leaving does not pull forwarding from under the first.
    ledger.hold(net, IP4, "1", 1)  # pid 1 (init) is alive
    assert ledger.release(net, IP4, os.getpid()) is None
    assert net.forwarding["ipv4"]


def test_vpnd_cleanup_with_nothing_recorded_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from vpnd.cli import main

    monkeypatch.setenv("VPND_RUNTIME_DIR", str(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    assert main(["cleanup"], out, err) == 0
    assert out.getvalue() == "vpnd cleanup: nothing to undo\n" and not err.getvalue()


def test_vpnd_cleanup_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    import io

    from vpnd.cli import main

    bad = tmp_path / "x.yaml"
    bad.write_text("mode: gateway\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["cleanup", "--config", str(bad)], out, err) == 1
    assert err.getvalue().startswith("vpnd: error:") and err.getvalue().count("\n") == 1


def test_a_sysctl_changed_by_someone_else_is_left_alone(tmp_path: Path) -> None:
    net = FakeNetConfigurator()
    ledger = SysctlLedger(tmp_path, netns="1")
    ledger.hold(net, IP4, "1", os.getpid())
    net.forwarding["ipv4"] = False  # the admin turned it off meanwhile
    assert "left alone" in (ledger.release(net, IP4, os.getpid()) or "")
