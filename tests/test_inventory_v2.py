"""Inventory schema 2: identities, invites, supersede, change stamp, migration from 1."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import shutil
import sqlite3
from pathlib import Path

import pytest

from vpnd.pki.identity import PkiError, Role
from vpnd.pki.inventory import (
    SCHEMA_VERSION,
    STATUS_EXPIRED,
    STATUS_REVOKED,
    STATUS_SUPERSEDED,
    STATUS_VALID,
    CertRecord,
    IdentityRecord,
    Inventory,
    InviteRecord,
)

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
V1_DIR = Path(__file__).parent / "data" / "inventory-v1"


def rec(serial: int, name: str = "alice", addr: str = "10.8.0.2", **kw: object) -> CertRecord:
    return CertRecord(
        serial=serial,
        name=name,
        role=Role.PEER,
        addresses=(ipaddress.ip_address(addr),),
        groups=("dev",),
        routes=(),
        dns_names=(),
        not_before=T0,
        not_after=T0 + 10 * DAY,
        fingerprint=f"{serial:064x}",
        issued_at=T0,
        **kw,  # type: ignore[arg-type]
    )


def ident(name: str = "alice", **kw: object) -> IdentityRecord:
    base = IdentityRecord(
        name=name,
        role=Role.PEER,
        addresses=(ipaddress.ip_address("10.8.0.2"),),
        groups=("dev", "ops"),
        routes=(ipaddress.ip_network("192.168.7.0/24"),),
        dns_names=(),
        generation=1,
        current_serial=0x10,
        state="active",
        updated_at=T0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def invite(invite_id: str = "inv1", **kw: object) -> InviteRecord:
    base = InviteRecord(
        invite_id=invite_id,
        name="laptop-7",
        secret_hash="ab" * 32,
        server="gw.example.test:8443",
        created_at=T0,
        expires_at=T0 + DAY,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    return Inventory.create(tmp_path / "inventory.sqlite")


def test_new_file_is_schema_2(inv: Inventory) -> None:
    assert SCHEMA_VERSION == 2
    assert inv.identities() == []
    assert inv.invites() == []
    assert inv.superseded() == []


def test_certificate_round_trip_keeps_generation_and_issuer(inv: Inventory) -> None:
    original = rec(0x10, generation=4, issuer_fp="cd" * 32)
    with inv.transaction():
        inv.add(original)
    assert inv.get(0x10) == original


def test_status_order(inv: Inventory) -> None:
    base = rec(1)
    sup = dataclasses.replace(base, superseded_at=T0, superseded_by=2)
    assert sup.status(T0) == STATUS_SUPERSEDED
    assert sup.status(T0 + 20 * DAY) == STATUS_SUPERSEDED  # superseded > expired
    both = dataclasses.replace(sup, revoked_at=T0)
    assert both.status(T0) == STATUS_REVOKED  # revoked > superseded
    assert base.status(T0 + 20 * DAY) == STATUS_EXPIRED
    assert base.status(T0) == STATUS_VALID
    assert not sup.is_valid(T0)


def test_mark_superseded(inv: Inventory) -> None:
    with inv.transaction():
        inv.add(rec(1))
        inv.add(rec(2, addr="10.8.0.2"))
        inv.add(rec(3, name="bob", addr="10.8.0.3"))
        inv.mark_superseded(1, 2, T0 + DAY)
    got = inv.get(1)
    assert got is not None
    assert got.superseded_at == T0 + DAY
    assert got.superseded_by == 2
    assert got.status(T0 + DAY) == STATUS_SUPERSEDED
    assert [r.serial for r in inv.superseded()] == [1]
    # A superseded certificate no longer holds its address.
    assert [r.serial for r in inv.holders(ipaddress.ip_address("10.8.0.2"), T0)] == [2]
    assert 1 not in {r.serial for rs in inv.leased_addresses(T0).values() for r in rs}
    with inv.transaction():
        with pytest.raises(PkiError, match="already superseded"):
            inv.mark_superseded(1, 2, T0 + DAY)
        with pytest.raises(PkiError, match="names differ"):
            inv.mark_superseded(2, 3, T0)
        with pytest.raises(PkiError, match="not in the inventory"):
            inv.mark_superseded(2, 99, T0)
        with pytest.raises(PkiError, match="itself"):
            inv.mark_superseded(2, 2, T0)
    with pytest.raises(RuntimeError):
        inv.mark_superseded(2, 1, T0)


def test_add_refuses_a_superseded_record(inv: Inventory) -> None:
    with inv.transaction(), pytest.raises(ValueError):
        inv.add(rec(1, superseded_at=T0, superseded_by=2))


def test_identity_upsert(inv: Inventory) -> None:
    assert inv.identity("alice") is None
    with inv.transaction():
        inv.put_identity(ident())
    assert inv.identity("alice") == ident()
    changed = ident(groups=("ops",), generation=2, current_serial=0x11, updated_at=T0 + DAY)
    with inv.transaction():
        inv.put_identity(changed)
        inv.put_identity(ident("bob", state="pending", current_serial=None))
    assert inv.identity("alice") == changed
    assert [i.name for i in inv.identities()] == ["alice", "bob"]
    bob = inv.identity("bob")
    assert bob is not None
    assert bob.state == "pending"
    assert bob.current_serial is None
    with pytest.raises(RuntimeError):
        inv.put_identity(ident())
    with inv.transaction(), pytest.raises(ValueError):
        inv.put_identity(ident(generation=0))


def test_invites(inv: Inventory) -> None:
    with inv.transaction():
        inv.add_invite(invite())
        inv.add_invite(invite("inv2", created_at=T0 + DAY, expires_at=T0 + 2 * DAY))
    assert inv.invite("inv1") == invite()
    assert inv.invite("nope") is None
    assert [i.invite_id for i in inv.invites()] == ["inv1", "inv2"]
    with inv.transaction():
        inv.mark_invite_used("inv1", T0 + dt.timedelta(hours=1), 0x42)
    used = inv.invite("inv1")
    assert used is not None
    assert used.used_at == T0 + dt.timedelta(hours=1)
    assert used.used_serial == 0x42
    with inv.transaction():
        with pytest.raises(PkiError, match="already used"):
            inv.mark_invite_used("inv1", T0 + dt.timedelta(hours=2), 0x43)
        with pytest.raises(PkiError, match="expired"):
            inv.mark_invite_used("inv2", T0 + 2 * DAY, 0x43)
        with pytest.raises(PkiError, match="unknown"):
            inv.mark_invite_used("nope", T0, 0x43)
        with pytest.raises(PkiError, match="already recorded"):
            inv.add_invite(invite())
        with pytest.raises(PkiError, match="expire after"):
            inv.add_invite(invite("inv3", expires_at=T0))
    still = inv.invite("inv1")
    assert still is not None
    assert still.used_serial == 0x42


def test_change_stamp_moves_on_every_write(tmp_path: Path) -> None:
    path = tmp_path / "inventory.sqlite"
    inv = Inventory.create(path)
    watcher = Inventory.open(path)  # another connection, like the gateway's poller
    seen = [watcher.change_stamp()]

    def step() -> None:
        stamp = watcher.change_stamp()
        assert stamp > seen[-1]
        seen.append(stamp)

    with inv.transaction():
        inv.add(rec(1))
    step()
    with inv.transaction():
        inv.put_identity(ident())
    step()
    with inv.transaction():
        inv.add_invite(invite())
    step()
    with inv.transaction():
        inv.mark_invite_used("inv1", T0, 1)
    step()
    with inv.transaction():
        inv.mark_revoked(1, T0, None)
    step()
    with inv.transaction():
        inv.next_crl_number()  # not a change of who may connect
    assert watcher.change_stamp() == seen[-1]
    with pytest.raises(RuntimeError), inv.transaction():
        inv.add(rec(2, addr="10.8.0.9"))
        raise RuntimeError("rolled back")
    assert watcher.change_stamp() == seen[-1]


# --- migration from schema 1 -------------------------------------------------------------


@pytest.fixture
def v1_file(tmp_path: Path) -> Path:
    """A copy of a real schema 1 inventory, written by vpnctl before schema 2 existed."""
    dest = tmp_path / "inventory.sqlite"
    shutil.copy(V1_DIR / "inventory.sqlite", dest)
    return dest


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_fixture_is_schema_1(v1_file: Path) -> None:
    assert _version(v1_file) == 1


def test_migrates_a_real_v1_file(v1_file: Path) -> None:
    raw = sqlite3.connect(v1_file)
    before = raw.execute("SELECT * FROM certificates ORDER BY serial").fetchall()
    raw.close()
    with Inventory.open(v1_file) as inv:
        records = inv.all_certificates()
        identities = {i.name: i for i in inv.identities()}
        assert inv.crl_number() >= 1
        assert inv.invites() == []
        assert inv.superseded() == []
    assert _version(v1_file) == SCHEMA_VERSION
    assert len(records) == len(before) == 5
    assert all(r.generation == 1 and r.issuer_fp == "" for r in records)
    assert all(r.superseded_at is None for r in records)
    # bob has only a revoked certificate: no identity; the others' newest unrevoked one.
    assert sorted(identities) == ["alice", "carol", "gw1"]
    alice = [r for r in records if r.name == "alice"]
    newest = max(alice, key=lambda r: r.issued_at)
    assert identities["alice"].current_serial == newest.serial
    assert identities["alice"].groups == newest.groups == ("admins",)
    assert identities["alice"].addresses == newest.addresses
    assert identities["alice"].generation == 1
    assert identities["alice"].state == "active"
    assert identities["gw1"].role is Role.GATEWAY
    assert identities["gw1"].dns_names == ("gw.example.test",)
    # Re-opening is a no-op.
    with Inventory.open(v1_file) as inv:
        assert {i.name for i in inv.identities()} == set(identities)


def test_failed_migration_leaves_the_v1_file_untouched(v1_file: Path) -> None:
    raw = sqlite3.connect(v1_file)
    raw.execute("CREATE TABLE identities (name TEXT)")  # makes the migration fail midway
    raw.commit()
    raw.close()
    with pytest.raises(PkiError, match=r"cannot upgrade inventory .* to schema 2"):
        Inventory.open(v1_file)
    assert _version(v1_file) == 1
    raw = sqlite3.connect(v1_file)
    columns = {row[1] for row in raw.execute("PRAGMA table_info(certificates)")}
    raw.close()
    assert "generation" not in columns


def test_migration_waits_for_a_busy_file_then_refuses(
    v1_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vpnd.pki.inventory.LOCK_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(v1_file, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(PkiError, match="busy or unwritable, cannot upgrade"):
            Inventory.open(v1_file)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _version(v1_file) == 1


def test_unknown_version_is_one_clear_line(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version=3")
    conn.close()
    with pytest.raises(PkiError) as err:
        Inventory.open(newer)
    assert "schema version 3" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_migration_that_lost_the_race_is_a_no_op(v1_file: Path) -> None:
    # Two processes open the same v1 file: the second one gets the lock after the first
    # committed, re-reads the version and must not migrate (or backfill) again.
    from vpnd.pki import inventory as inventory_module

    Inventory.open(v1_file).close()
    conn = sqlite3.connect(v1_file, isolation_level=None)
    try:
        inventory_module._migrate(conn, v1_file)
    finally:
        conn.close()
    with Inventory.open(v1_file) as inv:
        assert sorted(i.name for i in inv.identities()) == ["alice", "carol", "gw1"]
