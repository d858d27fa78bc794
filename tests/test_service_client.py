"""ClientService over the in-memory kernel: start-up, reload, renewal, errors, shutdown."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pki_fixtures import DAY
from service_fixtures import REAL, FakeEdges, Site, put

from vpnd.client.runner import LocalError
from vpnd.config import ClientConfig, ConfigError, load_config
from vpnd.service.client_service import ClientService, warn_if_not_forwarding
from vpnd.service.startup import StartupError

TUN = "vpnsvc1"
RESTART = "changed, takes effect after a restart"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def make(
    site: Site, edges: FakeEdges | None = None, *, with_path: bool = True, **over: Any
) -> ClientService:
    path = site.write(site.client_doc(**over))
    cfg = load_config(path)
    assert isinstance(cfg, ClientConfig)
    return ClientService(
        cfg,
        config_path=str(path) if with_path else "",
        lock=site.lock(cfg.tun.name),
        edges=edges or FakeEdges(),
    )


def edges_of(svc: ClientService) -> FakeEdges:
    assert isinstance(svc.edges, FakeEdges)
    return svc.edges


@pytest.fixture
async def running(site: Site) -> AsyncIterator[ClientService]:
    svc = make(site)
    await svc.startup()
    await edges_of(svc).dialing.wait()
    yield svc
    await svc.shutdown()
    svc.lock.release()


async def test_start_dials_the_gateway_and_stop_undoes_everything(site: Site) -> None:
    svc = make(site)
    svc.stop()  # stop before serving: run starts, then cleans up at once
    assert await svc.run() == 0
    net = edges_of(svc).fake_net
    assert net.closed and not (site.dir / "client.sock").exists()
    assert svc.client is not None and svc.client.tun is None
    svc.lock.release()


async def test_running_client_has_its_control_socket(running: ClientService, site: Site) -> None:
    assert (site.dir / "client.sock").exists()
    assert edges_of(running).dials == 1
    assert running.control is not None
    assert running.exit_code == 0


async def test_reload_applies_settings_and_names_the_restart_keys(
    running: ClientService, site: Site
) -> None:
    site.write(
        site.client_doc(
            server="127.0.0.1:4444",
            reconnect={"max_delay": 60},
            control_socket=str(site.dir / "other.sock"),
            metrics={"listen": "127.0.0.1:9101"},
            log={"format": "json"},
        )
    )
    report = await running.reload()
    assert report.changed == ["server: 127.0.0.1:4443 -> 127.0.0.1:4444", "max_delay: 30.0 -> 60.0"]
    assert report.errors == [
        f"control_socket: {RESTART}",
        f"metrics: {RESTART}",
        f"log.format: {RESTART}",
    ]
    assert running.client is not None and running.client.settings.server == "127.0.0.1:4444"
    assert running.config.server.port == 4444


async def test_reload_refuses_a_mode_change(running: ClientService, site: Site) -> None:
    site.write(site.gateway_doc())
    with pytest.raises(ConfigError, match="changed to gateway: restart vpnd instead"):
        await running.reload()
    assert isinstance(running.config, ClientConfig)


async def test_without_a_config_path_reload_rereads_the_certificate_files(site: Site) -> None:
    svc = make(site, with_path=False)
    await svc.startup()
    assert (await svc.reload()).changed == []
    renewed = site.issue_client()
    put(renewed, site.dir, "alice")
    report = await svc.reload()
    assert report.changed == [
        f"certificate: now serial {renewed.cert.serial_number:x}, valid until "
        f"{renewed.cert.not_valid_after_utc.isoformat()}"
    ]
    assert svc.own == renewed.cert
    await svc.shutdown()
    svc.lock.release()


async def test_a_renewed_certificate_on_disk_is_picked_up_with_its_routes(
    running: ClientService, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    await running.check_certificate_files()  # nothing changed: nothing done
    client = running.client
    assert client is not None and not client.settings.own_routes
    renewed = site.issue_client(routes=["192.168.60.0/24"])
    put(renewed, site.dir, "alice")
    with caplog.at_level(logging.INFO, logger="vpnd"):
        await running.check_certificate_files()
    assert client.settings.own_routes == (ipaddress.ip_network("192.168.60.0/24"),)
    assert running.own == renewed.cert
    assert "certificate files changed: own_routes: none -> 192.168.60.0/24" in caplog.messages

    (site.dir / "alice.pem").write_text("not a certificate\n")
    with caplog.at_level(logging.ERROR, logger="vpnd"):
        await running.check_certificate_files()
    assert any("new certificate files cannot be used" in m for m in caplog.messages)
    assert running.own == renewed.cert  # the last good one stays


async def test_an_expired_own_certificate_stops_the_client_when_renewal_is_off(
    site: Site,
) -> None:
    later = (REAL + 60 * DAY).timestamp()
    svc = make(site, FakeEdges(wall=lambda: later), renewal={"enabled": False})
    with pytest.raises(LocalError, match="expired at"):
        await svc.run()
    assert edges_of(svc).dials == 0 and edges_of(svc).fake_net.closed
    assert not (site.dir / "client.sock").exists()
    svc.lock.release()


async def test_with_renewal_on_an_expired_certificate_still_dials(site: Site) -> None:
    # The gateway decides: quarantine to renew, or certificate_expired.
    later = (REAL + 60 * DAY).timestamp()
    svc = make(site, FakeEdges(wall=lambda: later))
    await svc.startup()
    await edges_of(svc).dialing.wait()
    assert edges_of(svc).dials == 1
    assert svc.renewer is not None
    status = svc.renewer.status()
    assert status.enabled and status.next_renewal == "now"
    assert status.cert_age_s > (60 * DAY).total_seconds()
    await svc.shutdown()
    svc.lock.release()


async def test_a_certificate_not_yet_valid_is_a_local_error(site: Site) -> None:
    earlier = (REAL - 5 * DAY).timestamp()
    svc = make(site, FakeEdges(wall=lambda: earlier))
    with pytest.raises(LocalError, match="check the clock"):
        await svc.run()
    svc.lock.release()


async def test_a_bad_ca_file_stops_start_up(site: Site) -> None:
    (site.dir / "ca.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    svc = make(site)
    with pytest.raises(StartupError):
        await svc.startup()
    await svc.shutdown()
    svc.lock.release()


async def test_an_empty_passphrase_file_stops_start_up(site: Site) -> None:
    empty = site.dir / "pass"
    empty.write_bytes(b"\n\n")
    empty.chmod(0o600)
    pki = dict(site.client_doc()["pki"], key_passphrase_file="pass")
    svc = make(site, pki=pki)
    with pytest.raises(StartupError, match=r"^pki.key_passphrase_file: passphrase file .* empty"):
        await svc.startup()
    svc.lock.release()


def test_a_site_router_without_forwarding_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    off, on = tmp_path / "ip_forward", tmp_path / "forwarding"
    off.write_text("0\n")
    on.write_text("1\n")
    routes = (ipaddress.ip_network("192.168.60.0/24"), ipaddress.ip_network("fd00:60::/64"))
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        warn_if_not_forwarding(routes, ((4, off), (6, on)))
        warn_if_not_forwarding(routes, ((4, tmp_path / "missing"),))
        warn_if_not_forwarding((), ((4, off),))
    (line,) = caplog.messages
    assert "routes 192.168.60.0/24 (site-to-site)" in line and "is 0" in line


@pytest.mark.parametrize("at", [0.1, 0.95])
async def test_renewal_at_the_ends_of_its_range_schedules(site: Site, at: float) -> None:
    svc = make(site, renewal={"at": at})
    await svc.startup()
    assert svc.renewer is not None and svc.own is not None
    sched = svc.renewer.schedule()
    nb = svc.own.not_valid_before_utc.timestamp()
    life = svc.own.not_valid_after_utc.timestamp() - nb
    assert nb < sched.target < nb + life
    assert abs((sched.target - nb) / life - at) <= 0.05
    assert svc.renewer.status().next_renewal not in ("", "now")
    await svc.shutdown()
    svc.lock.release()
