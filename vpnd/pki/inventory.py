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
from typing import Final, Literal

from vpnd.pki import inventory_schema
from vpnd.pki.identity import IPAddress, IPNetwork, PkiError, Role
from vpnd.pki.inventory_schema import create_schema, migrate_v1

SCHEMA_VERSION: Final = inventory_schema.SCHEMA_VERSION

# How long a writer waits for another vpnctl holding the lock; bounded on purpose.
LOCK_TIMEOUT_S = 30.0

STATUS_VALID = "valid"
STATUS_EXPIRED = "expired"
STATUS_REVOKED = "revoked"
STATUS_SUPERSEDED = "superseded"

STATE_ACTIVE: Final = "active"
STATE_PENDING: Final = "pending"
IdentityState = Literal["active", "pending"]


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
    generation: int = 1
    """The certificate's generation extension: 1 for a first issue, +1 per renewal."""
    superseded_at: dt.datetime | None = None
    """When a renewed certificate of the same name was first used (then refused everywhere)."""
    superseded_by: int | None = None
    """Serial of the certificate that superseded this one."""
    issuer_fp: str = ""
    """SHA-256 (hex) of the signing CA's certificate; empty for records from schema 1."""

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)

    def status(self, now: dt.datetime) -> str:
        """``revoked`` > ``superseded`` > ``expired`` > ``valid``."""
        if self.revoked_at is not None:
            return STATUS_REVOKED
        if self.superseded_at is not None:
            return STATUS_SUPERSEDED
        if now >= self.not_after:
            return STATUS_EXPIRED
        return STATUS_VALID

    def is_valid(self, now: dt.datetime) -> bool:
        return self.status(now) == STATUS_VALID


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """A name's standing terms: what its next certificate (issue or renewal) carries.

    ``pending`` is an invited name without a certificate yet; ``active`` has one
    (``current_serial``), whose generation is ``generation``.
    """

    name: str
    role: Role
    addresses: tuple[IPAddress, ...]
    groups: tuple[str, ...]
    routes: tuple[IPNetwork, ...]
    dns_names: tuple[str, ...]
    generation: int
    current_serial: int | None
    state: IdentityState
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class InviteRecord:
    """A one-time enrollment invitation; ``secret_hash`` only, never the secret."""

    invite_id: str
    name: str
    secret_hash: str
    server: str
    """The gateway address the token points at (host:port)."""
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None = None
    used_serial: int | None = None


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
            create_schema(conn, crl_days=crl_days)
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
        """Open an existing inventory, migrating an older schema in one transaction;
        PkiError when missing, garbled, foreign or newer than this code."""
        p = Path(path)
        if not p.is_file():
            raise PkiError(f"no inventory at {p}; run 'vpnctl ca init' first")
        try:
            conn = sqlite3.connect(_uri(p, "rw"), uri=True, timeout=LOCK_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise PkiError(f"cannot open inventory {p}: {exc}") from None
        conn.isolation_level = None
        try:
            version = _user_version(conn)
            if version == 1:
                _migrate(conn, p)
                version = _user_version(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise PkiError(f"cannot read inventory {p}: {exc}") from None
        except PkiError:
            conn.close()
            raise
        if version != SCHEMA_VERSION:
            conn.close()
            if version == 0:
                raise PkiError(f"{p} is not a vpnd inventory (no schema version)")
            raise PkiError(
                f"{p} has schema version {version}; this vpnctl understands {SCHEMA_VERSION}"
                " (upgrade vpnd/vpnctl on this host)"
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
        """Valid (unexpired, unrevoked, not superseded) certificates carrying ``address``."""
        rows = self._query(
            "SELECT c.* FROM leases l JOIN certificates c ON c.serial = l.serial"
            " WHERE l.address = ? AND c.revoked_at IS NULL AND c.superseded_at IS NULL"
            " AND c.not_after > ?"
            " ORDER BY c.not_after DESC",
            (str(address), _ts(now)),
        )
        return [_record(r) for r in rows]

    def leased_addresses(self, now: dt.datetime) -> dict[IPAddress, list[CertRecord]]:
        """Every address held by a valid certificate, with its holders."""
        rows = self._query(
            "SELECT l.address AS leased, c.* FROM leases l"
            " JOIN certificates c ON c.serial = l.serial"
            " WHERE c.revoked_at IS NULL AND c.superseded_at IS NULL AND c.not_after > ?",
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

    def superseded(self) -> list[CertRecord]:
        """Every superseded certificate, in the order they were superseded."""
        rows = self._query(
            "SELECT * FROM certificates WHERE superseded_at IS NOT NULL"
            " ORDER BY superseded_at, serial"
        )
        return [_record(r) for r in rows]

    def identity(self, name: str) -> IdentityRecord | None:
        rows = self._query("SELECT * FROM identities WHERE name = ?", (name,))
        return _identity(rows[0]) if rows else None

    def identities(self) -> list[IdentityRecord]:
        """Every identity, by name."""
        return [_identity(r) for r in self._query("SELECT * FROM identities ORDER BY name")]

    def invite(self, invite_id: str) -> InviteRecord | None:
        rows = self._query("SELECT * FROM invites WHERE invite_id = ?", (invite_id,))
        return _invite(rows[0]) if rows else None

    def invites(self) -> list[InviteRecord]:
        """Every invite, oldest first."""
        rows = self._query("SELECT * FROM invites ORDER BY created_at, invite_id")
        return [_invite(r) for r in rows]

    def change_stamp(self) -> int:
        """A counter every write to certificates, identities or invites increments
        (by triggers, whoever writes): poll it to learn whether to re-read."""
        return int(self._meta("change_stamp"))

    def crl_number(self) -> int:
        return int(self._meta("crl_number"))

    def crl_days(self) -> int:
        return int(self._meta("crl_days"))

    # --- writes (inside transaction()) -----------------------------------------------

    def add(self, record: CertRecord) -> None:
        self._require_tx()
        if record.revoked_at is not None or record.superseded_at is not None:
            raise ValueError("a new record cannot already be revoked or superseded")
        key = record.serial_hex
        try:
            self._conn.execute(
                "INSERT INTO certificates (serial, name, role, addresses, groups, routes,"
                " dns_names, not_before, not_after, fingerprint, issued_at, delivered,"
                " generation, issuer_fp)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    record.generation,
                    record.issuer_fp,
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

    def mark_superseded(self, serial: int, by_serial: int, when: dt.datetime) -> None:
        """Record that ``by_serial`` (a renewal of the same name) replaced ``serial``;
        PkiError when either is unknown, they differ in name, or it already happened."""
        self._require_tx()
        if serial == by_serial:
            raise PkiError(f"serial {serial_hex(serial)} cannot supersede itself")
        old, new = self.get(serial), self.get(by_serial)
        if old is None or new is None:
            missing = serial if old is None else by_serial
            raise PkiError(f"serial {serial_hex(missing)} is not in the inventory")
        if old.name != new.name:
            raise PkiError(
                f"serial {new.serial_hex} ({new.name}) cannot supersede "
                f"serial {old.serial_hex} ({old.name}): names differ"
            )
        cur = self._conn.execute(
            "UPDATE certificates SET superseded_at = ?, superseded_by = ?"
            " WHERE serial = ? AND superseded_at IS NULL",
            (_ts(when), serial_hex(by_serial), serial_hex(serial)),
        )
        if cur.rowcount != 1:
            raise PkiError(f"serial {serial_hex(serial)} is already superseded")

    def put_identity(self, record: IdentityRecord) -> None:
        """Insert or replace the identity of ``record.name``."""
        self._require_tx()
        if record.state not in (STATE_ACTIVE, STATE_PENDING):
            raise ValueError(f"identity state {record.state!r}")
        if record.generation < 1:
            raise ValueError("identity generation must be at least 1")
        current = None if record.current_serial is None else serial_hex(record.current_serial)
        self._write(
            "INSERT INTO identities (name, role, addresses, groups, routes, dns_names,"
            " generation, current_serial, state, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET role = excluded.role,"
            " addresses = excluded.addresses, groups = excluded.groups,"
            " routes = excluded.routes, dns_names = excluded.dns_names,"
            " generation = excluded.generation, current_serial = excluded.current_serial,"
            " state = excluded.state, updated_at = excluded.updated_at",
            (
                record.name,
                Role(record.role).value,
                _json(str(a) for a in record.addresses),
                _json(record.groups),
                _json(str(n) for n in record.routes),
                _json(record.dns_names),
                record.generation,
                current,
                record.state,
                _ts(record.updated_at),
            ),
        )

    def add_invite(self, record: InviteRecord) -> None:
        self._require_tx()
        if record.used_at is not None or record.used_serial is not None:
            raise ValueError("a new invite cannot already be used")
        if record.expires_at <= record.created_at:
            raise PkiError("an invite must expire after it is created")
        try:
            self._conn.execute(
                "INSERT INTO invites (invite_id, name, secret_hash, server, created_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.invite_id,
                    record.name,
                    record.secret_hash,
                    record.server,
                    _ts(record.created_at),
                    _ts(record.expires_at),
                ),
            )
        except sqlite3.IntegrityError:
            raise PkiError(f"invite {record.invite_id} is already recorded") from None

    def mark_invite_used(self, invite_id: str, when: dt.datetime, serial: int) -> None:
        """Spend an invite (once): PkiError when unknown, already used or expired."""
        self._require_tx()
        found = self.invite(invite_id)
        if found is None:
            raise PkiError(f"invite {invite_id} is unknown")
        if found.used_at is not None:
            raise PkiError(
                f"invite {invite_id} was already used at {found.used_at:%Y-%m-%d %H:%M}Z"
            )
        if when >= found.expires_at:
            raise PkiError(f"invite {invite_id} expired at {found.expires_at:%Y-%m-%d %H:%M}Z")
        self._write(
            "UPDATE invites SET used_at = ?, used_serial = ?"
            " WHERE invite_id = ? AND used_at IS NULL",
            (_ts(when), serial_hex(serial), invite_id),
        )

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
        return self._next_counter("crl_number")

    def issuer_crl_number(self) -> int:
        """The last CRLNumber of the issuing CA's CRL (0: none signed yet)."""
        return int(self._meta("issuer_crl_number"))

    def next_issuer_crl_number(self) -> int:
        """Increment and return the issuing CA's CRL counter (its own, apart from the root's)."""
        return self._next_counter("issuer_crl_number")

    def _next_counter(self, key: str) -> int:
        self._require_tx()
        number = int(self._meta(key)) + 1
        self._write("UPDATE meta SET value = ? WHERE key = ?", (str(number), key))
        return number

    def set_crl_days(self, days: int) -> None:
        self._require_tx()
        if days <= 0:
            raise PkiError("CRL validity must be at least one day")
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'crl_days'", (str(days),))

    # --- helpers ---------------------------------------------------------------------

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise PkiError(f"cannot write inventory {self._path}: {exc}") from None

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


def _user_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a version 1 file to the current schema, all or nothing."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise PkiError(
            f"inventory {path} is busy or unwritable, cannot upgrade it: {exc}"
        ) from None
    try:
        # Another process may have upgraded it while this one waited for the lock.
        if _user_version(conn) == 1:
            migrate_v1(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.execute("ROLLBACK")
        raise PkiError(
            f"cannot upgrade inventory {path} to schema {SCHEMA_VERSION}: {exc}"
        ) from None


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
            generation=int(row["generation"]),
            superseded_at=_opt_dt(row["superseded_at"]),
            superseded_by=_opt_serial(row["superseded_by"]),
            issuer_fp=str(row["issuer_fp"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise PkiError(f"inventory row for serial {row['serial']!r} is damaged: {exc}") from None


def _opt_dt(ts: int | None) -> dt.datetime | None:
    return None if ts is None else _dt(ts)


def _opt_serial(text: str | None) -> int | None:
    return None if text is None else int(text, 16)


def _identity(row: sqlite3.Row) -> IdentityRecord:
    try:
        state = row["state"]
        if state not in (STATE_ACTIVE, STATE_PENDING):
            raise ValueError(f"state {state!r}")
        return IdentityRecord(
            name=row["name"],
            role=Role(row["role"]),
            addresses=tuple(ipaddress.ip_address(a) for a in json.loads(row["addresses"])),
            groups=tuple(json.loads(row["groups"])),
            routes=tuple(ipaddress.ip_network(n) for n in json.loads(row["routes"])),
            dns_names=tuple(json.loads(row["dns_names"])),
            generation=int(row["generation"]),
            current_serial=_opt_serial(row["current_serial"]),
            state=STATE_ACTIVE if state == STATE_ACTIVE else STATE_PENDING,
            updated_at=_dt(row["updated_at"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise PkiError(f"inventory identity {row['name']!r} is damaged: {exc}") from None


def _invite(row: sqlite3.Row) -> InviteRecord:
    try:
        return InviteRecord(
            invite_id=row["invite_id"],
            name=row["name"],
            secret_hash=row["secret_hash"],
            server=row["server"],
            created_at=_dt(row["created_at"]),
            expires_at=_dt(row["expires_at"]),
            used_at=_opt_dt(row["used_at"]),
            used_serial=_opt_serial(row["used_serial"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise PkiError(f"inventory invite {row['invite_id']!r} is damaged: {exc}") from None
