"""The SQLite inventory: schema, transactions, leases, revocation, CRL counter."""

from __future__ import annotations

import datetime as dt
import ipaddress
import sqlite3
from pathlib import Path

import pytest

from vpnd.pki.identity import PkiError, Role
from vpnd.pki.inventory import (
    SCHEMA_VERSION,
    STATUS_EXPIRED,
    STATUS_REVOKED,
    STATUS_VALID,
    CertRecord,
    Inventory,
    parse_serial,
)

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def rec(serial: int, name: str, addr: str, *, days: int = 90, **kw: object) -> CertRecord:
    return CertRecord(
        serial=serial,
        name=name,
        role=Role.PEER,
        addresses=(ipaddress.ip_address(addr),),
        groups=("dev",),
        routes=(ipaddress.ip_network("192.168.5.0/24"),),
        dns_names=(),
        not_before=T0,
        not_after=T0 + days * DAY,
        fingerprint=f"{serial:064x}",
        issued_at=T0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    return Inventory.create(tmp_path / "inventory.sqlite")


def test_create_sets_schema_version_wal_and_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "inventory.sqlite"
    Inventory.create(path, crl_days=3).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert path.stat().st_mode & 0o777 == 0o600
    with Inventory.open(path) as again:
        assert again.crl_number() == 0
        assert again.crl_days() == 3


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "inventory.sqlite"
    path.write_bytes(b"precious")
    with pytest.raises(PkiError, match="already exists"):
        Inventory.create(path)
    assert path.read_bytes() == b"precious"


def test_open_missing_garbled_and_foreign(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="ca init"):
        Inventory.open(tmp_path / "nope.sqlite")
    garbled = tmp_path / "garbled.sqlite"
    garbled.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(PkiError, match="cannot read inventory"):
        Inventory.open(garbled)
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(PkiError, match="not a vpnd inventory"):
        Inventory.open(foreign)
    newer = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(PkiError, match="schema version 99"):
        Inventory.open(newer)


def test_round_trip_of_a_record(inv: Inventory) -> None:
    original = rec(0x3F2A, "alice", "10.8.0.2")
    with inv.transaction():
        inv.add(original)
    assert inv.get(0x3F2A) == original
    assert inv.by_name("alice") == [original]
    assert inv.all_certificates() == [original]
    assert inv.get(0x3F2B) is None


def test_writes_outside_a_transaction_are_refused(inv: Inventory) -> None:
    with pytest.raises(RuntimeError):
        inv.add(rec(1, "alice", "10.8.0.2"))
    with pytest.raises(RuntimeError):
        inv.next_crl_number()


def test_exception_rolls_the_transaction_back(inv: Inventory) -> None:
    with pytest.raises(OSError), inv.transaction():
        inv.add(rec(1, "alice", "10.8.0.2"))
        inv.next_crl_number()
        raise OSError("disk full while writing the certificate")
    assert inv.all_certificates() == []
    assert inv.crl_number() == 0
    assert inv.leased_addresses(T0) == {}


def test_duplicate_serial_is_a_pki_error(inv: Inventory) -> None:
    with inv.transaction():
        inv.add(rec(7, "alice", "10.8.0.2"))
    with pytest.raises(PkiError, match="already recorded"), inv.transaction():
        inv.add(rec(7, "bob", "10.8.0.3"))
    assert [r.name for r in inv.all_certificates()] == ["alice"]


def test_leases_only_count_valid_certificates(inv: Inventory) -> None:
    with inv.transaction():
        inv.add(rec(1, "alice", "10.8.0.2", days=10))
        inv.add(rec(2, "bob", "10.8.0.3", days=90))
        inv.add(rec(3, "carol", "10.8.0.4", days=90))
        inv.mark_revoked(3, T0 + DAY, "keyCompromise")
    a2, a3, a4 = (ipaddress.ip_address(f"10.8.0.{i}") for i in (2, 3, 4))
    assert set(inv.leased_addresses(T0 + DAY)) == {a2, a3}
    # Once alice's certificate has expired, her address is free again.
    assert set(inv.leased_addresses(T0 + 11 * DAY)) == {a3}
    assert [r.name for r in inv.holders(a3, T0)] == ["bob"]
    assert inv.holders(a4, T0) == []


def test_status_and_revocation(inv: Inventory) -> None:
    with inv.transaction():
        inv.add(rec(1, "alice", "10.8.0.2", days=10))
        inv.mark_revoked(1, T0 + DAY, "superseded")
    got = inv.get(1)
    assert got is not None
    assert got.revoked_at == T0 + DAY
    assert got.revoke_reason == "superseded"
    assert got.status(T0) == STATUS_REVOKED
    assert rec(2, "b", "10.8.0.3", days=10).status(T0 + 9 * DAY) == STATUS_VALID
    assert rec(2, "b", "10.8.0.3", days=10).status(T0 + 10 * DAY) == STATUS_EXPIRED
    with pytest.raises(PkiError, match="already revoked"), inv.transaction():
        inv.mark_revoked(1, T0 + 2 * DAY, None)
    assert [r.serial for r in inv.revoked()] == [1]


def test_crl_counter_increments_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "inventory.sqlite"
    with Inventory.create(path) as inv:
        with inv.transaction():
            assert inv.next_crl_number() == 1
        with inv.transaction():
            assert inv.next_crl_number() == 2
    with Inventory.open(path) as inv:
        assert inv.crl_number() == 2


def test_delivered_flag(inv: Inventory) -> None:
    with inv.transaction():
        inv.add(rec(5, "alice", "10.8.0.2"))
        inv.mark_delivered(5)
    got = inv.get(5)
    assert got is not None and got.delivered
    with pytest.raises(PkiError, match="not in the inventory"), inv.transaction():
        inv.mark_delivered(6)


@pytest.mark.parametrize(
    ("text", "value"), [("3f2a", 0x3F2A), ("0x3F2A", 0x3F2A), ("3f:2a", 0x3F2A), (" 01 ", 1)]
)
def test_parse_serial_accepts_common_spellings(text: str, value: int) -> None:
    assert parse_serial(text) == value


@pytest.mark.parametrize("text", ["", "xyz", "0", "-5", "3f2a\n99"])
def test_parse_serial_refuses_junk(text: str) -> None:
    with pytest.raises(PkiError):
        parse_serial(text)
