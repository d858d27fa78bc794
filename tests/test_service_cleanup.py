"""``vpnd cleanup`` and the start-up undo over the fake netlink: only a dead vpnd's
marked links go, a live one's and a foreign one's stay, and a running instance is never
touched."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from vpnd.net.errors import NetError
from vpnd.net.fakes import FakeNetConfigurator
from vpnd.net.ownership import format_alias
from vpnd.service.cleanup import (
    _cleanup,
    _tuns_recorded,
    nft_table_exists,
    safe_undo,
    undo_leftovers,
)
from vpnd.service.runstate import InstanceLock, InstanceState, SysctlLedger, netns_id


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _record(runtime: Path, tun: str, links: list[str], pid: int) -> InstanceLock:
    lock = InstanceLock(runtime, tun, netns=netns_id())
    lock.acquire()
    InstanceState(pid=pid, tun=tun, links=links, nft_tables=["vpnd_not_this_tun"]).save(
        lock.state_path
    )
    return lock


def _net_with(**aliases: str | None) -> FakeNetConfigurator:
    net = FakeNetConfigurator()
    for name, alias in aliases.items():
        net.create_link(name).alias = alias
    return net


async def test_a_dead_vpnds_marked_link_goes_and_nothing_else(tmp_path: Path) -> None:
    dead = _dead_pid()
    net = _net_with(vpn0=format_alias(dead), eth9=None, vpn1=format_alias(os.getpid()))
    lock = _record(tmp_path, "vpn0", ["vpn0", "eth9", "vpn1", "gone0"], dead)
    try:
        done = await undo_leftovers(lock, net, SysctlLedger(tmp_path, netns=netns_id()))
    finally:
        lock.release()
    assert done == [f"removed link vpn0 (marked vpnd:{dead}, that process is gone)"]
    # Foreign (no marker), live (our own pid) and absent links are left as they are, and
    # an nft table not named for this TUN is never touched.
    assert sorted(net.links) == ["eth9", "vpn1"]
    assert not lock.state_path.exists()


async def test_kernel_failures_become_one_line_errors(tmp_path: Path) -> None:
    class Failing(FakeNetConfigurator):
        async def delete_link(self, ifname: str) -> None:
            raise PermissionError(1, "Operation not permitted")

    net = Failing()
    dead = _dead_pid()
    net.create_link("vpn0").alias = format_alias(dead)
    lock = _record(tmp_path, "vpn0", ["vpn0"], dead)
    try:
        with pytest.raises(NetError, match=r"^cleanup: Operation not permitted$"):
            await safe_undo(lock, net, SysctlLedger(tmp_path, netns=netns_id()))
    finally:
        lock.release()


def test_recorded_tuns_are_those_of_this_namespace(tmp_path: Path) -> None:
    for name in ["7.vpn0.lock", "7.vpn1.json", "7.sysctl.json", "7.sysctl.lock", "8.vpn9.lock"]:
        (tmp_path / name).write_text("")
    (tmp_path / "junk").write_text("")
    assert _tuns_recorded(tmp_path, "7") == ["vpn0", "vpn1"]
    assert _tuns_recorded(tmp_path / "missing", "7") == []


async def test_cleanup_undoes_a_crash_and_an_unrecorded_stale_link(tmp_path: Path) -> None:
    dead = _dead_pid()
    net = _net_with(vpn0=format_alias(dead), vpn2=format_alias(dead))
    # What a SIGKILL leaves: the state file, and a lock file nobody holds any more.
    crashed = InstanceLock(tmp_path, "vpn0", netns=netns_id())
    InstanceState(pid=dead, tun="vpn0", links=["vpn0"]).save(crashed.state_path)
    out = io.StringIO()
    assert await _cleanup(["vpn0", "vpn2"], tmp_path, out, net) == 0
    assert out.getvalue().splitlines() == [
        f"vpnd cleanup: removed link vpn0 (marked vpnd:{dead}, that process is gone)",
        f"vpnd cleanup: removed link vpn2 (marked vpnd:{dead}, gone)",
    ]
    assert net.links == {}


async def test_cleanup_never_touches_a_running_instance(tmp_path: Path) -> None:
    net = _net_with(vpn0=format_alias(os.getpid()))
    running = _record(tmp_path, "vpn0", ["vpn0"], os.getpid())
    out = io.StringIO()
    try:
        assert await _cleanup(None, tmp_path, out, net) == 1
    finally:
        running.release()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("vpnd cleanup: nothing undone for vpn0: ")
    assert "vpn0" in net.links


async def test_cleanup_with_nothing_recorded_says_so(tmp_path: Path) -> None:
    out = io.StringIO()
    assert await _cleanup(None, tmp_path, out, FakeNetConfigurator()) == 0
    assert out.getvalue() == "vpnd cleanup: nothing to undo\n"


async def test_whether_vpnds_nft_table_exists_is_nfts_exit_code() -> None:
    # `nft list table inet T` exits 0 only if the table exists; no nft means no table.
    assert await nft_table_exists("vpnd_vpn0", nft="true")
    assert not await nft_table_exists("vpnd_vpn0", nft="false")
    assert not await nft_table_exists("vpnd_vpn0", nft="/nonexistent/nft")
