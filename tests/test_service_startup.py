"""vpnd.service.startup: the shared start-up steps' error paths and periodic checks."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import ssl
from pathlib import Path

import pytest
from pki_fixtures import DAY
from service_fixtures import REAL, Site

from vpnd.config import ClientConfig, load_config
from vpnd.net.errors import NetError, TunError
from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.net.tun import LinuxTun
from vpnd.pki.keys import load_certificate
from vpnd.service import startup
from vpnd.service.runstate import InstanceLock, SysctlLedger
from vpnd.service.startup import Edges, StartupError
from vpnd.transport.tlsctx import TlsConfigError


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_open_tun_falls_back_without_offload_and_reports_a_refusal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[bool] = []

    def fake_open(name: str, *, offload: bool = False) -> FakeTun:
        opened.append(offload)
        if offload:
            raise TunError("TUNSETOFFLOAD: invalid argument")
        return FakeTun(name)

    monkeypatch.setattr(LinuxTun, "open", staticmethod(fake_open))
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        tun = startup.open_tun("vpn5", offload=True)
    assert isinstance(tun, FakeTun) and opened == [True, False]
    assert "TUN offload unavailable" in caplog.messages[0]
    tun.close()

    def refuse(name: str, *, offload: bool = False) -> FakeTun:
        raise TunError("/dev/net/tun: permission denied")

    monkeypatch.setattr(LinuxTun, "open", staticmethod(refuse))
    with pytest.raises(StartupError, match="permission denied"):
        startup.open_tun("vpn5")


async def test_forwarding_is_held_and_restored_and_failures_are_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = InstanceLock(tmp_path, "vpn5")
    lock.acquire()
    net = FakeNetConfigurator()
    async with contextlib.AsyncExitStack() as undo:
        startup.hold_forwarding(lock, net, [False, True], undo)
        assert net.forwarding == {"ipv4": True, "ipv6": True}
    assert net.forwarding == {"ipv4": False, "ipv6": False}

    def refuse(key: str, value: str) -> None:
        raise NetError(f"sysctl {key}: read-only file system")

    net.write_sysctl = refuse  # type: ignore[method-assign]
    with pytest.raises(StartupError, match=r"^forwarding: sysctl .*read-only"):
        async with contextlib.AsyncExitStack() as undo:
            startup.hold_forwarding(lock, net, [False], undo)
    lock.release()


def test_a_failed_restore_says_how_to_clean_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(SysctlLedger):
        def release(self, sys: object, key: str, pid: int) -> str | None:
            raise OSError(30, "Read-only file system")

    startup.release_sysctl(Broken(tmp_path), FakeNetConfigurator(), "net/ipv4/ip_forward")
    (line,) = caplog.messages
    assert "could not restore net.ipv4.ip_forward" in line and "vpnd cleanup" in line


def test_forwarding_families() -> None:
    v4 = (ipaddress.ip_network("10.0.0.0/24"),)
    v6 = (ipaddress.ip_network("fd00::/64"),)
    assert startup.forwarding_families(v4, ()) == [False]
    assert startup.forwarding_families(v4, v6) == [False, True]


def test_own_certificate_expiring_expired_and_unreadable(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(site.write(site.gateway_doc()))
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        startup.log_own_certificate(cfg, REAL + 20 * DAY)  # 10 days left, warned at 14
        startup.log_own_certificate(cfg, REAL + 40 * DAY)
    assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR"]
    assert "renew it now" in caplog.messages[0] and "EXPIRED" in caplog.messages[1]
    (site.dir / "gw.pem").write_text("garbage\n")
    with pytest.raises(StartupError, match=r"^pki.cert: "):
        startup.log_own_certificate(cfg, REAL)


def test_a_renewing_client_warns_only_when_renewal_is_overdue(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(site.write(site.client_doc()))
    assert isinstance(cfg, ClientConfig) and cfg.renewal.enabled
    cert = load_certificate(cfg.pki.cert)
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    life = na - nb
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        startup.log_own_certificate(cfg, nb + life * 0.7)  # renewing is due: no noise
        assert caplog.messages == []
        startup.log_own_certificate(cfg, nb + life * 0.8)  # past at + 0.1: overdue
        startup.log_own_certificate(cfg, na + DAY)
    assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR"]
    assert "automatic renewal has not succeeded yet" in caplog.messages[0]
    assert "renewal is on" in caplog.messages[1] and "EXPIRED" in caplog.messages[1]
    caplog.clear()
    off = load_config(site.write(site.client_doc(renewal={"enabled": False})))
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        startup.log_own_certificate(off, na - DAY)
    assert "renew it now" in caplog.messages[0]


class _Done(Exception):
    pass


async def test_expiry_is_rechecked_every_six_hours(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(site.write(site.gateway_doc()))
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise _Done
        if len(naps) == 2:
            (site.dir / "gw.pem").write_text("garbage\n")  # a bad file: no crash

    later = (REAL + 20 * DAY).timestamp()
    with caplog.at_level(logging.WARNING, logger="vpnd"), pytest.raises(_Done):
        await startup.expiry_warnings(lambda: cfg, Edges(sleep=sleep, wall=lambda: later))
    assert naps == [6 * 3600.0] * 3
    assert len([m for m in caplog.messages if "renew it now" in m]) == 1


def test_a_certificate_without_a_san_has_no_overlay_address(site: Site) -> None:
    assert startup.san_addresses(site.ca.cert) == []


def test_a_bad_tls_context_stops_start_up_with_its_line() -> None:
    def build() -> ssl.SSLContext:
        raise TlsConfigError("pki.key: does not match pki.cert")

    with pytest.raises(StartupError, match="does not match"):
        startup.check_ssl_context(build)


def test_edges_now_follows_the_wall_clock() -> None:
    moment = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert Edges(wall=moment.timestamp).now() == moment
