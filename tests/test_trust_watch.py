"""TrustWatcher: live CRL reloads, fail closed on bad data, stale CRL handling."""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
from pathlib import Path

import pytest
from pki_fixtures import TestCA, make_ca

from vpnd.gateway.trust_watch import TrustWatcher
from vpnd.pki import TrustStore
from vpnd.pki.crl import RevokedEntry, build_crl, crl_pem
from vpnd.pki.keys import certificate_pem

REAL_NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


class Recorder:
    def __init__(self) -> None:
        self.contexts: list[Path | None] = []
        self.trusts: list[TrustStore] = []
        self.broken: list[str] = []

    def make_context(self, crl: Path | None) -> ssl.SSLContext:
        self.contexts.append(crl)
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def on_trust(self, trust: TrustStore) -> list[str]:
        self.trusts.append(trust)
        return ["alice"] if len(self.trusts) > 1 else []

    def on_broken(self, reason: str) -> None:
        self.broken.append(reason)


def _write_crl(ca: TestCA, path: Path, *, number: int, next_update: dt.datetime,
               revoked: tuple[int, ...] = ()) -> None:  # fmt: skip
    crl = build_crl(
        ca_cert=ca.cert,
        ca_key=ca.key,
        revoked=[RevokedEntry(s, REAL_NOW - DAY, None) for s in revoked],
        crl_number=number,
        this_update=REAL_NOW - 2 * DAY,
        next_update=next_update,
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl_pem(crl))
    os.replace(tmp, path)  # like vpnctl: a new inode


@pytest.fixture
def ca() -> TestCA:
    return make_ca("corp", not_before=REAL_NOW - 10 * DAY, not_after=REAL_NOW + 300 * DAY)


def _watcher(tmp_path: Path, ca: TestCA, rec: Recorder, allow_stale: bool = False) -> TrustWatcher:
    (tmp_path / "ca.pem").write_bytes(certificate_pem(ca.cert))
    return TrustWatcher(
        ca=tmp_path / "ca.pem",
        crl=tmp_path / "crl.pem",
        allow_stale=allow_stale,
        make_context=rec.make_context,
        on_trust=rec.on_trust,
        on_broken=rec.on_broken,
    )


def test_a_changed_crl_is_adopted_and_sessions_rechecked(tmp_path: Path, ca: TestCA) -> None:
    rec = Recorder()
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    w = _watcher(tmp_path, ca, rec)
    w.load()
    assert rec.contexts == [tmp_path / "crl.pem"]
    w.check()
    assert rec.trusts == []  # nothing changed, nothing done
    _write_crl(ca, tmp_path / "crl.pem", number=2, next_update=REAL_NOW + 7 * DAY, revoked=(42,))
    w.check()
    assert len(rec.trusts) == 1
    assert w.crl_state is not None and w.crl_state.number == 2 and w.crl_state.revoked == 1
    assert rec.contexts[-1] == tmp_path / "crl.pem"  # new handshakes use the new CRL


def test_missing_or_forged_crl_fails_closed_and_recovers(tmp_path: Path, ca: TestCA) -> None:
    rec = Recorder()
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    w = _watcher(tmp_path, ca, rec)
    w.load()
    (tmp_path / "crl.pem").unlink()
    w.check()
    assert rec.broken and "no such file" in rec.broken[-1]
    assert w.broken is not None
    # A CRL signed by another key with our CA's name is refused as well.
    impostor = make_ca("corp", not_before=REAL_NOW - DAY, not_after=REAL_NOW + 9 * DAY)
    _write_crl(impostor, tmp_path / "crl.pem", number=9, next_update=REAL_NOW + 7 * DAY)
    w.check()
    assert len(rec.broken) == 2 and "signature" in rec.broken[-1]
    _write_crl(ca, tmp_path / "crl.pem", number=3, next_update=REAL_NOW + 7 * DAY)
    w.check()
    assert w.broken is None and len(rec.trusts) == 1


def test_stale_crl_drops_openssl_crl_and_logs_loudly(
    tmp_path: Path, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW - DAY)
    w = _watcher(tmp_path, ca, rec)
    with caplog.at_level(logging.WARNING, logger="vpnd.trust"):
        w.load()
        w.check()
    # Our verifier refuses with the true reason instead of OpenSSL's misleading alert.
    assert rec.contexts == [None, None]
    assert any("STALE" in r.getMessage() and "REFUSING" in r.getMessage() for r in caplog.records)


def test_stale_crl_allowed_warns(
    tmp_path: Path, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW - DAY)
    w = _watcher(tmp_path, ca, rec, allow_stale=True)
    with caplog.at_level(logging.WARNING, logger="vpnd.trust"):
        w.load()
        w.check()
    assert w.trust is not None and w.trust.allow_stale_crl
    assert any("STALE" in r.getMessage() and "'allow'" in r.getMessage() for r in caplog.records)


def test_revocation_is_applied_even_if_the_tls_context_cannot_be_rebuilt(
    tmp_path: Path, ca: TestCA
) -> None:
    rec = Recorder()
    _write_crl(ca, tmp_path / "crl.pem", number=1, next_update=REAL_NOW + 7 * DAY)
    w = _watcher(tmp_path, ca, rec)
    w.load()

    def broken_context(crl: Path | None) -> ssl.SSLContext:
        raise RuntimeError("gw.key does not match gw.pem")  # mid-update of the gateway's files

    w._make_context = broken_context
    _write_crl(ca, tmp_path / "crl.pem", number=2, next_update=REAL_NOW + 7 * DAY, revoked=(7,))
    w.check()
    assert len(rec.trusts) == 1  # the live sessions were re-checked (revoked ones closed)
    assert rec.broken and "TLS context" in rec.broken[-1]  # and new peers are refused
    w._make_context = rec.make_context
    w.check()  # retried on the next poll, without any file change
    assert w.broken is None and rec.contexts[-1] == tmp_path / "crl.pem"
