"""The CA's record of every certificate it issued: SQLite, one file next to ``ca.pem``.

It holds what the certificates cannot tell us by themselves: which overlay addresses
are leased, which serials are revoked (and why), the CRL counter, and whether a
certificate was delivered. Writers use :meth:`Inventory.transaction` (``BEGIN
IMMEDIATE``), so two concurrent ``vpnctl issue`` runs serialise on the database
lock and can never hand out the same address.

Certificate serials are stored as lowercase hex without leading zeros; times as
integer UNIX seconds (UTC), which is the precision of X.509 times anyway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role

SCHEMA_VERSION = 1
# How long a writer waits for another vpnctl holding the lock; bounded on purpose.
LOCK_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('peer', 'gateway')),
    addresses     TEXT NOT NULL,
    groups        TEXT NOT NULL,
    routes        TEXT NOT NULL,
    dns_names     TEXT NOT NULL,
    not_before    INTEGER NOT NULL,
    not_after     INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL UNIQUE,
    issued_at     INTEGER NOT NULL,
    revoked_at    INTEGER,
    revoke_reason TEXT,
    delivered     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX certificates_by_name ON certificates (name);
-- One row per (address, certificate): the lookup table for address allocation.
CREATE TABLE leases (
    address TEXT NOT NULL,
    serial  TEXT NOT NULL REFERENCES certificates (serial),
    PRIMARY KEY (address, serial)
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

STATUS_VALID = "valid"
STATUS_EXPIRED = "expired"
STATUS_REVOKED = "revoked"


def serial_hex(serial: int) -> str:
    """The inventory's (and vpnctl's) spelling of a serial: lowercase hex, no prefix."""
    return f"{serial:x}"


def parse_serial(text: str) -> int:
    """Accept ``3f2a``, ``0x3F2A`` or ``3f:2a`` (as openssl prints it); PkiError otherwise."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise PkiError(f"{text!r} is not a hexadecimal certificate serial") from None
    if value <= 0:
        raise PkiError(f"{text!r} is not a valid certificate serial (must be positive)")
    return value


def _ts(when: dt.datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("naive datetime given to the inventory")
    return int(when.timestamp())


def _dt(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One issued certificate as the inventory remembers it."""

    serial: int
    name: str
    role: Role
    addresses: tuple[IPAddress, ...]
    groups: tuple[str, ...]
    routes: tuple[IPNetwork, ...]
    dns_names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    issued_at: dt.datetime
    revoked_at: dt.datetime | None = None
    revoke_reason: str | None = None
    """A key of ``vpnd.pki.crl.REASONS`` or None (no reason code)."""
    delivered: bool = False
    """Set once provisioning has put the certificate on the peer."""

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)

    def status(self, now: dt.datetime) -> str:
        """``revoked`` wins over ``expired``; otherwise ``valid``."""
        if self.revoked_at is not None:
            return STATUS_REVOKED
        if now >= self.not_after:
            return STATUS_EXPIRED
        return STATUS_VALID

    def is_valid(self, now: dt.datetime) -> bool:
        return self.status(now) == STATUS_VALID


class Inventory:
    """A connection to ``inventory.sqlite``. Not thread-safe; open one per operation."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._in_tx = False

    # --- opening -------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, crl_days: int = 7) -> Inventory:
        """Create a fresh inventory; refuses when ``path`` exists."""
        p = Path(path)
        if p.exists():
            raise PkiError(f"{p} already exists; refusing to overwrite an inventory")
        try:
            conn = sqlite3.connect(_uri(p, "rwc"), uri=True, timeout=LOCK_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise PkiError(f"cannot create inventory {p}: {exc}") from None
        conn.isolation_level = None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('crl_number', '0')")
            conn.execute("INSERT INTO meta (key, value) VALUES ('crl_days', ?)", (str(crl_days),))
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            raise PkiError(f"cannot create inventory {p}: {exc}") from None
        p.chmod(0o600)
        return cls(conn, p)

    @classmethod
    def open(cls, path: str | Path) -> Inventory:
        """Open an existing inventory; PkiError when missing, garbled or too new."""
        p = Path(path)
        if not p.is_file():
            raise PkiError(f"no inventory at {p}; run 'vpnctl ca init' first")
        try:
            conn = sqlite3.connect(_uri(p, "rw"), uri=True, timeout=LOCK_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise PkiError(f"cannot open inventory {p}: {exc}") from None
        conn.isolation_level = None
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise PkiError(f"cannot read inventory {p}: {exc}") from None
        if version != SCHEMA_VERSION:
            conn.close()
            if version == 0:
                raise PkiError(f"{p} is not a vpnd inventory (no schema version)")
            raise PkiError(
                f"{p} has schema version {version}; this vpnctl understands {SCHEMA_VERSION}"
            )
        return cls(conn, p)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Inventory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Inventory]:
        """Hold the database write lock; commit on success, roll back on any exception.

        Everything done inside (reads included) sees one consistent state, and no
        other writer can interleave, which is what makes address allocation safe.
        """
        if self._in_tx:
            raise RuntimeError("nested inventory transaction")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise PkiError(f"inventory {self._path} is busy or unwritable: {exc}") from None
        self._in_tx = True
        try:
            yield self
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._conn.execute("ROLLBACK")
                raise PkiError(f"cannot commit to inventory {self._path}: {exc}") from None
        finally:
            self._in_tx = False

    def _require_tx(self) -> None:
        if not self._in_tx:
            raise RuntimeError("inventory writes need Inventory.transaction()")

    # --- reads -----------------------------------------------------------------------

    def all_certificates(self) -> list[CertRecord]:
        """Every record, oldest issue first."""
        rows = self._query("SELECT * FROM certificates ORDER BY issued_at, name, serial")
        return [_record(r) for r in rows]

    def get(self, serial: int) -> CertRecord | None:
        rows = self._query("SELECT * FROM certificates WHERE serial = ?", (serial_hex(serial),))
        return _record(rows[0]) if rows else None

    def by_name(self, name: str) -> list[CertRecord]:
        rows = self._query(
            "SELECT * FROM certificates WHERE name = ? ORDER BY issued_at, serial", (name,)
        )
        return [_record(r) for r in rows]

    def holders(self, address: IPAddress, now: dt.datetime) -> list[CertRecord]:
        """Valid (unexpired, unrevoked) certificates carrying ``address``."""
        rows = self._query(
            "SELECT c.* FROM leases l JOIN certificates c ON c.serial = l.serial"
            " WHERE l.address = ? AND c.revoked_at IS NULL AND c.not_after > ?"
            " ORDER BY c.not_after DESC",
            (str(address), _ts(now)),
        )
        return [_record(r) for r in rows]

    def leased_addresses(self, now: dt.datetime) -> dict[IPAddress, list[CertRecord]]:
        """Every address held by a valid certificate, with its holders."""
        rows = self._query(
            "SELECT l.address AS leased, c.* FROM leases l"
            " JOIN certificates c ON c.serial = l.serial"
            " WHERE c.revoked_at IS NULL AND c.not_after > ?",
            (_ts(now),),
        )
        held: dict[IPAddress, list[CertRecord]] = {}
        for row in rows:
            held.setdefault(ipaddress.ip_address(row["leased"]), []).append(_record(row))
        return held

    def revoked(self) -> list[CertRecord]:
        rows = self._query(
            "SELECT * FROM certificates WHERE revoked_at IS NOT NULL ORDER BY revoked_at, serial"
        )
        return [_record(r) for r in rows]

    def crl_number(self) -> int:
        return int(self._meta("crl_number"))

    def crl_days(self) -> int:
        return int(self._meta("crl_days"))

    # --- writes (inside transaction()) -----------------------------------------------

    def add(self, record: CertRecord) -> None:
        self._require_tx()
        if record.revoked_at is not None:
            raise ValueError("a new record cannot already be revoked")
        key = record.serial_hex
        try:
            self._conn.execute(
                "INSERT INTO certificates (serial, name, role, addresses, groups, routes,"
                " dns_names, not_before, not_after, fingerprint, issued_at, delivered)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    record.name,
                    record.role.value,
                    _json(str(a) for a in record.addresses),
                    _json(record.groups),
                    _json(str(n) for n in record.routes),
                    _json(record.dns_names),
                    _ts(record.not_before),
                    _ts(record.not_after),
                    record.fingerprint,
                    _ts(record.issued_at),
                    int(record.delivered),
                ),
            )
            self._conn.executemany(
                "INSERT OR IGNORE INTO leases (address, serial) VALUES (?, ?)",
                [(str(a), key) for a in record.addresses],
            )
        except sqlite3.IntegrityError as exc:
            raise PkiError(f"serial {key} or its fingerprint is already recorded: {exc}") from None

    def mark_revoked(self, serial: int, when: dt.datetime, reason: str | None) -> None:
        self._require_tx()
        cur = self._conn.execute(
            "UPDATE certificates SET revoked_at = ?, revoke_reason = ?"
            " WHERE serial = ? AND revoked_at IS NULL",
            (_ts(when), reason, serial_hex(serial)),
        )
        if cur.rowcount != 1:
            raise PkiError(f"serial {serial_hex(serial)} is unknown or already revoked")

    def mark_delivered(self, serial: int, delivered: bool = True) -> None:
        self._require_tx()
        cur = self._conn.execute(
            "UPDATE certificates SET delivered = ? WHERE serial = ?",
            (int(delivered), serial_hex(serial)),
        )
        if cur.rowcount != 1:
            raise PkiError(f"serial {serial_hex(serial)} is not in the inventory")

    def next_crl_number(self) -> int:
        """Increment and return the CRL counter (RFC 5280: monotonically increasing)."""
        self._require_tx()
        number = self.crl_number() + 1
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'crl_number'", (str(number),))
        return number

    def set_crl_days(self, days: int) -> None:
        self._require_tx()
        if days <= 0:
            raise PkiError("CRL validity must be at least one day")
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'crl_days'", (str(days),))

    # --- helpers ---------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        self._conn.row_factory = sqlite3.Row
        try:
            return list(self._conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise PkiError(f"cannot read inventory {self._path}: {exc}") from None

    def _meta(self, key: str) -> str:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        if not rows:
            raise PkiError(f"inventory {self._path} lacks its {key!r} entry; it is damaged")
        return str(rows[0]["value"])


def _uri(path: Path, mode: str) -> str:
    # as_uri() percent-encodes, so a '?' or '#' in a directory name stays a path.
    return f"{path.absolute().as_uri()}?mode={mode}"


def _json(values: Iterable[str]) -> str:
    return json.dumps(list(values))


def _record(row: sqlite3.Row) -> CertRecord:
    try:
        revoked_at = row["revoked_at"]
        return CertRecord(
            serial=int(row["serial"], 16),
            name=row["name"],
            role=Role(row["role"]),
            addresses=tuple(ipaddress.ip_address(a) for a in json.loads(row["addresses"])),
            groups=tuple(json.loads(row["groups"])),
            routes=tuple(ipaddress.ip_network(n) for n in json.loads(row["routes"])),
            dns_names=tuple(json.loads(row["dns_names"])),
            not_before=_dt(row["not_before"]),
            not_after=_dt(row["not_after"]),
            fingerprint=row["fingerprint"],
            issued_at=_dt(row["issued_at"]),
            revoked_at=None if revoked_at is None else _dt(revoked_at),
            revoke_reason=row["revoke_reason"],
            delivered=bool(row["delivered"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise PkiError(f"inventory row for serial {row['serial']!r} is damaged: {exc}") from None
