"""The inventory's SQL schema, and the migration from every older version.

Version 1: certificates, leases, meta (CRL counter and validity).
Version 2 adds, for issue 13 (renewal, supersede, enrollment):

* on ``certificates``: ``generation`` (1 for a first issue, +1 per renewal),
  ``superseded_at`` / ``superseded_by`` (a renewed certificate's predecessor), and
  ``issuer_fp`` (SHA-256 of the signing CA's certificate; empty for the root in v1);
* ``identities``: one row per name, the terms the next certificate of that name gets
  (groups, addresses, routes), its current serial and generation; ``pending`` until an
  invite is redeemed;
* ``invites``: one-time enrollment invitations (the secret only as a hash);
* ``meta.issuer_crl_number``: the CRLNumber counter of the issuing CA's CRL (the root's
  stays ``meta.crl_number``);
* ``meta.change_stamp``: bumped by triggers on every write to those three tables, so a
  gateway polling the file sees "something changed" with one cheap read.

A migration runs inside one ``BEGIN IMMEDIATE`` transaction: either the file is fully
version 2 afterwards, or it is untouched.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2

_CERTIFICATES = """
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

# Version 1 -> 2, also the tail of a fresh version 2 schema.
_V2_ADDITIONS = """
ALTER TABLE certificates ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;
ALTER TABLE certificates ADD COLUMN superseded_at INTEGER;
ALTER TABLE certificates ADD COLUMN superseded_by TEXT;
ALTER TABLE certificates ADD COLUMN issuer_fp TEXT NOT NULL DEFAULT '';
CREATE TABLE identities (
    name           TEXT PRIMARY KEY,
    role           TEXT NOT NULL CHECK (role IN ('peer', 'gateway')),
    addresses      TEXT NOT NULL,
    groups         TEXT NOT NULL,
    routes         TEXT NOT NULL,
    dns_names      TEXT NOT NULL,
    generation     INTEGER NOT NULL CHECK (generation >= 1),
    current_serial TEXT,
    state          TEXT NOT NULL CHECK (state IN ('active', 'pending')),
    updated_at     INTEGER NOT NULL
);
CREATE TABLE invites (
    invite_id   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    server      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_serial TEXT
);
CREATE INDEX invites_by_name ON invites (name);
INSERT INTO meta (key, value) VALUES ('change_stamp', '0');
INSERT INTO meta (key, value) VALUES ('issuer_crl_number', '0');
"""

_STAMPED_TABLES = ("certificates", "identities", "invites")

# Every identity a version 1 file implies: per name, its newest unrevoked certificate
# (expired or not) becomes the current one, generation 1. Names with only revoked
# certificates get none: they cannot renew, only be issued again.
_BACKFILL_IDENTITIES = """
INSERT INTO identities (name, role, addresses, groups, routes, dns_names, generation,
                        current_serial, state, updated_at)
SELECT c.name, c.role, c.addresses, c.groups, c.routes, c.dns_names, 1, c.serial,
       'active', c.issued_at
FROM certificates c
WHERE c.revoked_at IS NULL AND NOT EXISTS (
    SELECT 1 FROM certificates d
    WHERE d.name = c.name AND d.revoked_at IS NULL
      AND (d.issued_at > c.issued_at OR (d.issued_at = c.issued_at AND d.rowid > c.rowid))
)
"""


def _triggers() -> list[str]:
    bump = (
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
        " WHERE key = 'change_stamp';"
    )
    out = []
    for table in _STAMPED_TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            out.append(
                f"CREATE TRIGGER stamp_{table}_{event.lower()} AFTER {event} ON {table}"
                f" BEGIN {bump} END"
            )
    return out


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def create_schema(conn: sqlite3.Connection, *, crl_days: int) -> None:
    """A fresh, current schema; the caller holds the transaction."""
    for statement in _statements(_CERTIFICATES):
        conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('crl_number', '0')")
    conn.execute("INSERT INTO meta (key, value) VALUES ('crl_days', ?)", (str(crl_days),))
    _add_v2(conn)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _add_v2(conn: sqlite3.Connection) -> None:
    for statement in _statements(_V2_ADDITIONS):
        conn.execute(statement)
    for trigger in _triggers():
        conn.execute(trigger)


def migrate_v1(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2; the caller holds the transaction and checked the version."""
    _add_v2(conn)
    conn.execute(_BACKFILL_IDENTITIES)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
