"""vpnctl issue records the name's identity (schema 2): terms, current serial, generation."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cli_helpers import run_vpnctl

from vpnd.pki.identity import Role
from vpnd.pki.inventory import IdentityRecord, Inventory
from vpnd.pki.keys import fingerprint, load_certificate
from vpnd.pki.profile import generation_of

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def issue(out: Path, name: str, *extra: str) -> int:
    code, _, err = run_vpnctl("issue", name, "--out", str(out), *extra)
    assert code == 0, err
    return load_certificate(out / f"{name}.pem").serial_number


def test_issue_upserts_the_identity(pki: Path, out: Path) -> None:
    serial = issue(out, "alice", "--groups", "dev,ops", "--routes", "192.168.7.0/24")
    with Inventory.open(pki / "inventory.sqlite") as inv:
        ident = inv.identity("alice")
        record = inv.get(serial)
    assert ident is not None
    assert record is not None
    assert ident.state == "active"
    assert ident.current_serial == serial
    assert ident.generation == 1 == record.generation
    assert ident.groups == ("dev", "ops")
    assert ident.routes == (ipaddress.ip_network("192.168.7.0/24"),)
    assert ident.addresses == record.addresses
    assert ident.role is Role.PEER
    # The record names its signer: the root CA, by fingerprint.
    assert record.issuer_fp == fingerprint(load_certificate(pki / "ca.pem"))
    assert generation_of(load_certificate(out / "alice.pem")) == 1


def test_reissue_moves_the_identity_on(pki: Path, out: Path) -> None:
    first = issue(out, "alice", "--groups", "dev")
    second = issue(out, "alice", "--groups", "ops")
    with Inventory.open(pki / "inventory.sqlite") as inv:
        ident = inv.identity("alice")
    assert ident is not None
    assert ident.current_serial == second != first
    assert ident.groups == ("ops",)
    # A re-issue never looks older than what it replaces (the clone check compares).
    assert ident.generation == 2
    assert generation_of(load_certificate(out / "alice.pem")) == 2


def test_pending_identity_gets_its_generation_on_first_issue(pki: Path, out: Path) -> None:
    with Inventory.open(pki / "inventory.sqlite") as inv, inv.transaction():
        inv.put_identity(
            dataclasses.replace(_pending("bob"), generation=1, updated_at=dt.datetime.now(dt.UTC))
        )
    serial = issue(out, "bob")
    with Inventory.open(pki / "inventory.sqlite") as inv:
        ident = inv.identity("bob")
    assert ident is not None
    assert (ident.state, ident.generation, ident.current_serial) == ("active", 1, serial)


def _pending(name: str) -> IdentityRecord:
    return IdentityRecord(
        name=name,
        role=Role.PEER,
        addresses=(),
        groups=("dev",),
        routes=(),
        dns_names=(),
        generation=1,
        current_serial=None,
        state="pending",
        updated_at=dt.datetime.now(dt.UTC),
    )
