"""An older crl.pem put back is refused, live and across a restart (CRL numbers persist)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from pki_fixtures import TestCA, make_ca
from test_config import gateway, parse, parse_error, pki_dir, with_value  # noqa: F401
from test_trust_watch import DAY, REAL_NOW, Recorder, _write_crl, ca  # noqa: F401

from vpnd.config import CrlRollback, GatewayConfig
from vpnd.gateway.trust_watch import CRL_NUMBERS_FILE, TrustWatcher
from vpnd.pki.crl import ca_key
from vpnd.pki.identity import PkiError
from vpnd.pki.keys import certificate_pem

REVOKED = 42


def _watcher(
    tmp_path: Path, authority: TestCA, rec: Recorder, *, allow: bool = False, bundle: bytes = b""
) -> TrustWatcher:
    (tmp_path / "ca.pem").write_bytes(bundle or certificate_pem(authority.cert))
    return TrustWatcher(
        ca=tmp_path / "ca.pem",
        crl=tmp_path / "crl.pem",
        allow_stale=False,
        make_context=rec.make_context,
        on_trust=rec.on_trust,
        on_broken=rec.on_broken,
        state_dir=tmp_path / "state",
        allow_rollback=allow,
    )


def _revoked(w: TrustWatcher) -> set[int]:
    assert w.trust is not None
    return {e.serial_number for crl in w.trust.crls for e in crl}


def _old_and_new(ca: TestCA, tmp_path: Path) -> tuple[Path, Path]:  # noqa: F811
    """crl.pem number 1 (nothing revoked) saved aside, then number 2 revoking REVOKED."""
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    old = tmp_path / "crl-1.pem"
    shutil.copy(tmp_path / "crl.pem", old)
    _write_crl(
        ca, tmp_path / "crl.pem", number=2, next_update=REAL_NOW + 7 * DAY, revoked=(REVOKED,)
    )
    new = tmp_path / "crl-2.pem"
    shutil.copy(tmp_path / "crl.pem", new)
    return old, new


def _put_back(src: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "crl.pem.tmp"
    shutil.copy(src, tmp)
    tmp.replace(tmp_path / "crl.pem")


def test_putting_the_previous_crl_back_does_not_unrevoke(
    tmp_path: Path,
    ca: TestCA,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder()
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    old = tmp_path / "crl-1.pem"
    shutil.copy(tmp_path / "crl.pem", old)
    w = _watcher(tmp_path, ca, rec)
    w.load()
    _write_crl(
        ca, tmp_path / "crl.pem", number=2, next_update=REAL_NOW + 7 * DAY, revoked=(REVOKED,)
    )
    w.check()
    assert _revoked(w) == {REVOKED} and len(rec.trusts) == 1
    with caplog.at_level(logging.ERROR, logger="vpnd.trust"):
        _put_back(old, tmp_path)
        w.check()
    assert _revoked(w) == {REVOKED}, "the older CRL un-revoked a peer"
    assert len(rec.trusts) == 1  # the gateway was never handed the older CRL
    assert w.crl_state is not None and w.crl_state.number == 2
    assert w.broken is None  # the newer CRL is still good: no reason to fail closed
    assert any("number 1, lower than number 2" in r.getMessage() for r in caplog.records)
    assert w.rollback_refused is not None and "lower than number 2" in w.rollback_refused
    # a newer one still goes through
    _write_crl(
        ca, tmp_path / "crl.pem", number=3, next_update=REAL_NOW + 7 * DAY, revoked=(REVOKED, 7)
    )
    w.check()
    assert _revoked(w) == {REVOKED, 7} and w.crl_state.number == 3
    assert w.rollback_refused is None


def test_the_highest_number_survives_a_restart(tmp_path: Path, ca: TestCA) -> None:  # noqa: F811
    old, _new = _old_and_new(ca, tmp_path)
    first = _watcher(tmp_path, ca, Recorder())
    first.load()
    state = json.loads((tmp_path / "state" / CRL_NUMBERS_FILE).read_text())
    assert state == {"highest_crl_number": {ca_key(ca.cert): 2}}
    # restart with the older crl.pem on disk: refused with one line
    _put_back(old, tmp_path)
    with pytest.raises(PkiError) as info:
        _watcher(tmp_path, ca, Recorder()).load()
    msg = str(info.value)
    assert "\n" not in msg
    assert "number 1, lower than number 2" in msg and "pki.crl_rollback: allow" in msg
    # the explicit override starts with it, warns, and does not forget number 2
    allowed = _watcher(tmp_path, ca, Recorder(), allow=True)
    allowed.load()
    assert _revoked(allowed) == set()
    state = json.loads((tmp_path / "state" / CRL_NUMBERS_FILE).read_text())
    assert state["highest_crl_number"][ca_key(ca.cert)] == 2


def test_numbers_are_kept_per_ca(tmp_path: Path, ca: TestCA) -> None:  # noqa: F811
    other = make_ca("branch", not_before=REAL_NOW - 10 * DAY, not_after=REAL_NOW + 300 * DAY)
    bundle = certificate_pem(ca.cert) + certificate_pem(other.cert)
    _write_crl(ca, tmp_path / "a.pem", number=5, next_update=REAL_NOW + 7 * DAY)
    _write_crl(other, tmp_path / "b.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    (tmp_path / "crl.pem").write_bytes(
        (tmp_path / "a.pem").read_bytes() + (tmp_path / "b.pem").read_bytes()
    )
    _watcher(tmp_path, ca, Recorder(), bundle=bundle).load()
    # the branch CA's CRL 1 is not "older" than corp's 5: both start fine again
    w = _watcher(tmp_path, ca, Recorder(), bundle=bundle)
    w.load()
    state = json.loads((tmp_path / "state" / CRL_NUMBERS_FILE).read_text())
    assert state["highest_crl_number"] == {ca_key(ca.cert): 5, ca_key(other.cert): 1}


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"highest_crl_number": {"ski:ab": "2"}}', b"[]"]
)
def test_corrupt_state_is_one_clear_line(
    tmp_path: Path,
    ca: TestCA,  # noqa: F811
    content: bytes,
) -> None:
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / CRL_NUMBERS_FILE).write_bytes(content)
    with pytest.raises(PkiError) as info:
        _watcher(tmp_path, ca, Recorder()).load()
    assert "corrupt CRL-number state" in str(info.value) and "\n" not in str(info.value)


def test_unwritable_state_dir_refuses_start(tmp_path: Path, ca: TestCA) -> None:  # noqa: F811
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    (tmp_path / "state").write_text("a file, not a directory")
    with pytest.raises(PkiError) as info:
        _watcher(tmp_path, ca, Recorder()).load()
    assert "state_dir" in str(info.value) and "\n" not in str(info.value)


def test_config_keys(pki_dir: Path) -> None:  # noqa: F811
    cfg = parse(gateway(), pki_dir)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.state_dir == Path("/var/lib/vpnd")
    assert cfg.pki.crl_rollback is CrlRollback.DENY
    cfg = parse(with_value(gateway(), "state_dir", "state"), pki_dir)
    assert isinstance(cfg, GatewayConfig) and cfg.state_dir == pki_dir / "state"
    cfg = parse(with_value(gateway(), "pki.crl_rollback", "allow"), pki_dir)
    assert cfg.pki.crl_rollback is CrlRollback.ALLOW
    assert any("crl_rollback" in w for w in cfg.warnings)
    err = parse_error(with_value(gateway(), "pki.crl_rollback", "yes"), pki_dir)
    assert "pki.crl_rollback" in str(err)
    err = parse_error(with_value(gateway(), "state_dir", 5), pki_dir)
    assert "state_dir" in str(err)
