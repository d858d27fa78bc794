"""The gateway's lifecycle service: the per-name renewal budget, the inventory view it
reads from a real inventory file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from vpnd.gateway.lifecycle import RENEWAL_REFILL_S, GatewayLifecycle, read_view
from vpnd.pki.inventory import Inventory


def lifecycle(tmp_path: Path) -> GatewayLifecycle:
    return GatewayLifecycle(
        issuer=None,
        inventory=tmp_path / "inventory.sqlite",
        issuer_crl=None,
        lifetime=7 * 86400.0,
        poll=1.0,
        apply_view=lambda view: None,
    )


def test_a_name_renewing_in_a_loop_is_slowed_down(tmp_path: Path) -> None:
    life = lifecycle(tmp_path)
    try:
        assert all(life._allow_renewal("alice", 100.0) == 0 for _ in range(30))
        wait = life._allow_renewal("alice", 100.0)
        assert 0 < wait <= RENEWAL_REFILL_S
        assert life._allow_renewal("bob", 100.0) == 0  # others are not affected
        assert life._allow_renewal("alice", 100.0 + RENEWAL_REFILL_S) == 0
        assert life._allow_renewal("alice", 100.0 + RENEWAL_REFILL_S) > 0
        assert not life.renewal  # no issuer: renewals are refused as not enabled
    finally:
        life._pool.shutdown()


def test_read_view_of_an_empty_inventory(tmp_path: Path) -> None:
    Inventory.create(tmp_path / "inventory.sqlite").close()
    view = read_view(tmp_path / "inventory.sqlite", dt.datetime.now(dt.UTC), "CN=issuer")
    assert view.names == {} and view.superseded == frozenset()
    assert view.online_issuer == "CN=issuer" and view.stamp >= 0


def test_the_root_crl_lists_root_signed_certificates_a_renewal_superseded(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    from vpnd.pki.crl import load_crls
    from vpnd.pki.pkidir import PkiDir

    pki = PkiDir(tmp_path / "pki")
    pki.init_ca(name="corp", networks=[ipaddress.ip_network("10.8.0.0/24")])
    out = tmp_path / "out"
    out.mkdir()
    old = pki.issue("alice", out_dir=out)
    new = pki.issue("alice", out_dir=out)  # a re-issue stands in for the renewal
    with Inventory.open(pki.inventory_path) as inv, inv.transaction():
        inv.mark_superseded(old.record.serial, new.record.serial, pki.now())
    pki.refresh_crl()
    crl = load_crls(pki.crl_path)[0]
    entry = crl.get_revoked_certificate_by_serial_number(old.record.serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(new.record.serial) is None
