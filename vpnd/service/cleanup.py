"""Undo what a dead vpnd left in the kernel: used at start-up and by ``vpnd cleanup``.

Only what the runtime state records, and only what is provably vpnd's: a recorded link
is deleted only while it carries the ``vpnd:<pid>`` marker of a process that is gone;
the nftables table is vpnd's own (``inet vpnd_<tun>``); a sysctl goes back to the
value recorded before vpnd first changed it, once no live vpnd needs it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TextIO

from vpnd.net.errors import NetError
from vpnd.net.netlink import NetConfigurator
from vpnd.net.nftables import NftablesRuleset, table_name
from vpnd.net.ownership import LinkOwner, classify_link
from vpnd.service.runstate import (
    AlreadyRunning,
    InstanceLock,
    InstanceState,
    RuntimeDirError,
    SysctlLedger,
    netns_id,
    resolve_runtime_dir,
)

log = logging.getLogger("vpnd")

__all__ = ["nft_table_exists", "run_cleanup", "safe_undo", "undo_leftovers"]


async def nft_table_exists(table: str, *, nft: str = "nft") -> bool:
    """Does ``inet <table>`` exist? (False if nft is missing: then nothing can exist.)"""
    try:
        proc = await asyncio.create_subprocess_exec(
            nft, "list", "table", "inet", table,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    except OSError:
        return False
    try:
        return await asyncio.wait_for(proc.wait(), 10) == 0
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False


async def undo_leftovers(
    lock: InstanceLock, net: NetConfigurator, ledger: SysctlLedger
) -> list[str]:
    """With ``lock`` held: undo a dead instance's recorded changes; one line per change."""
    assert lock.held
    done: list[str] = []
    state = InstanceState.load(lock.state_path)
    if state is not None:
        for table in state.nft_tables:
            if table == table_name(state.tun) and await nft_table_exists(table):
                await NftablesRuleset(state.tun).remove()
                done.append(f"removed nftables table inet {table} (left by pid {state.pid})")
        for link in state.links:
            exists, alias = await net.link_alias(link)
            owner = classify_link(exists, alias)
            if owner == LinkOwner.OURS_STALE:
                await net.delete_link(link)
                done.append(f"removed link {link} (marked {alias}, that process is gone)")
            elif owner == LinkOwner.FOREIGN:
                log.warning("link %s is not vpnd's (ifalias %r): left alone", link, alias)
    done.extend(ledger.release_dead(net))
    Path(lock.state_path).unlink(missing_ok=True)
    return done


async def safe_undo(lock: InstanceLock, net: NetConfigurator, ledger: SysctlLedger) -> list[str]:
    """undo_leftovers, with kernel failures as NetError (for one-line reporting)."""
    try:
        return await undo_leftovers(lock, net, ledger)
    except OSError as err:
        raise NetError(f"cleanup: {err.strerror or err}") from None


def _tuns_recorded(runtime_dir: Path, netns: str) -> list[str]:
    """TUN names with a lock or state file for this namespace under ``runtime_dir``."""
    names: set[str] = set()
    if not runtime_dir.is_dir():
        return []
    for path in runtime_dir.iterdir():
        parts = path.name.split(".", 1)
        if len(parts) != 2 or parts[0] != netns:
            continue
        rest = parts[1]
        for suffix in (".lock", ".json"):
            if rest.endswith(suffix) and rest != f"sysctl{suffix}":
                names.add(rest[: -len(suffix)])
    return sorted(names)


async def _cleanup(
    tuns: list[str] | None, runtime_dir: Path, out: TextIO, net: NetConfigurator | None = None
) -> int:
    """``net``: the netlink edge (the real one by default; a fake in unit tests)."""
    from vpnd.net.netlink import PyRoute2Configurator  # noqa: PLC0415

    ns = netns_id()
    names = tuns if tuns is not None else _tuns_recorded(runtime_dir, ns)
    ledger = SysctlLedger(runtime_dir, netns=ns)
    net = net or PyRoute2Configurator()
    code = 0
    undone = 0
    try:
        for tun in names:
            lock = InstanceLock(runtime_dir, tun, netns=ns)
            try:
                lock.acquire()
            except AlreadyRunning as err:
                out.write(f"vpnd cleanup: nothing undone for {tun}: {err}\n")
                code = 1
                continue
            try:
                for line in await safe_undo(lock, net, ledger):
                    out.write(f"vpnd cleanup: {line}\n")
                    undone += 1
                # A link still named like the TUN, marked by a dead vpnd, unrecorded.
                exists, alias = await net.link_alias(tun)
                if classify_link(exists, alias) == LinkOwner.OURS_STALE:
                    await net.delete_link(tun)
                    out.write(f"vpnd cleanup: removed link {tun} (marked {alias}, gone)\n")
                    undone += 1
            finally:
                lock.release()
        if runtime_dir.is_dir():
            for line in ledger.release_dead(net):
                out.write(f"vpnd cleanup: {line}\n")
                undone += 1
    finally:
        await net.close()
    if undone == 0 and code == 0:
        out.write("vpnd cleanup: nothing to undo\n")
    return code


def run_cleanup(config: str | None, out: TextIO, err: TextIO | None = None) -> int:
    """``vpnd cleanup [--config FILE]``: 0 when done or nothing to do, 1 if refused."""
    from vpnd.config import ConfigError, load_config  # noqa: PLC0415

    err = err or out

    tuns: list[str] | None = None
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            err.write(f"vpnd: error: {exc}\n")
            return 1
        tuns = [cfg.tun.name]
    try:
        return asyncio.run(_cleanup(tuns, resolve_runtime_dir(), out))
    except (NetError, RuntimeDirError) as exc:
        err.write(f"vpnd: error: cleanup: {exc}\n")
        return 1
