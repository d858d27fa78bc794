"""GatewayService over the in-memory kernel: start-up order, reload, errors, shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import FakeEdges, Site, put

from vpnd.config import ConfigError, GatewayConfig, load_config
from vpnd.net.errors import NetError
from vpnd.net.ownership import format_alias
from vpnd.pki.identity import PkiError
from vpnd.service import sdnotify
from vpnd.service.gateway_service import GatewayService
from vpnd.service.startup import StartupError

TUN = "vpnsvc0"
RESTART = "changed, takes effect after a restart"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def make(site: Site, edges: FakeEdges | None = None, **over: Any) -> GatewayService:
    path = site.write(site.gateway_doc(**over))
    cfg = load_config(path)
    assert isinstance(cfg, GatewayConfig)
    return GatewayService(
        cfg,
        config_path=str(path),
        lock=site.lock(cfg.tun.name),
        edges=edges or FakeEdges(),
        close_grace=0,
    )


@pytest.fixture
async def running(site: Site) -> AsyncIterator[GatewayService]:
    svc = make(site)
    await svc.startup()
    yield svc
    await svc.shutdown()
    svc.lock.release()


def edges_of(svc: GatewayService) -> FakeEdges:
    assert isinstance(svc.edges, FakeEdges)
    return svc.edges


def rewrite(svc: GatewayService, site: Site, **over: Any) -> None:
    site.write(site.gateway_doc(**over))


async def test_startup_builds_the_kernel_state_and_shutdown_removes_all_of_it(site: Site) -> None:
    svc = make(site)
    edges = edges_of(svc)
    net = edges.fake_net
    await svc.startup()
    link = net.links[TUN]
    assert link.up and link.mtu == 1400
    assert link.addresses == [ipaddress.ip_interface("10.77.0.1/16")]
    assert link.alias == format_alias(os.getpid())
    assert ipaddress.ip_network("10.77.0.0/16") in link.routes  # the connected overlay route
    assert net.forwarding["ipv4"] is True and net.forwarding["ipv6"] is False
    (ruleset,) = edges.rulesets
    assert "forward" in ruleset.scripts[0][1]  # installed before the listener started
    (listener,) = edges.listeners
    assert listener.args[:2] == ("127.0.0.1", 4443)
    assert listener.kwargs["max_pending"] == 256
    assert listener.kwargs["max_write_backlog"] == 4194304 + 262144
    state = json.loads(svc.lock.state_path.read_text())
    assert state["nft_tables"] == [ruleset.table] and state["tun"] == TUN
    assert (site.dir / "vpnd.sock").exists()
    assert svc.crl_info() is not None and svc.crl_info().number == 1  # type: ignore[union-attr]

    await svc.shutdown()
    assert listener.closed and ruleset.removed and net.closed
    assert TUN not in net.links  # the TUN closed: its addresses and routes went with it
    assert net.forwarding["ipv4"] is False  # the value before vpnd changed it
    assert not (site.dir / "vpnd.sock").exists()
    assert svc.exit_code == 0
    await svc.shutdown()  # idempotent
    svc.lock.release()


async def test_run_returns_when_stopped(site: Site) -> None:
    svc = make(site)
    svc.stop()  # already asked to stop: run starts, serves not at all, and cleans up
    assert await svc.run() == 0
    assert TUN not in edges_of(svc).fake_net.links
    svc.lock.release()


async def test_a_fatal_gateway_error_ends_serve_with_exit_code_1(running: GatewayService) -> None:
    assert running.gateway is not None and running.gateway.on_fatal is not None
    running.gateway.on_fatal("TUN vpnsvc0 vanished")
    await running.serve()
    assert running.exit_code == 1 and running.fatal == "TUN vpnsvc0 vanished"


async def test_reload_applies_live_settings_and_names_the_restart_keys(
    running: GatewayService, site: Site
) -> None:
    gateway = running.gateway
    assert gateway is not None
    rewrite(
        running,
        site,
        listen="127.0.0.1:4444",
        tun={"name": TUN, "mtu": 1300},
        push_routes=["192.168.50.0/24"],
        keepalive={"interval": 5, "timeout": 20},
        limits={"max_pending_per_source": 8, "max_sessions": 10},
        handshake_timeout=5,
        log={"format": "json"},
    )
    report = await running.reload()
    assert report.changed == [
        "push_routes: [] -> [192.168.50.0/24]",
        "keepalive_interval: 10.0 -> 5.0",
        "keepalive_timeout: 30.0 -> 20.0",
        "handshake_timeout: 10.0 -> 5.0",
        "max_sessions: 10000 -> 10",
    ]
    assert report.errors == [
        f"listen: {RESTART}",
        f"tun: {RESTART}",
        f"limits.max_pending_per_source: {RESTART}",
        "handshake_timeout: the TLS part takes effect after a restart "
        "(the tunnel-setup part applies to new sessions now)",
        f"log.format: {RESTART}",
    ]
    assert gateway.settings.push_routes == (ipaddress.ip_network("192.168.50.0/24"),)
    assert gateway.settings.max_sessions == 10 and gateway.settings.tun_name == TUN
    assert gateway.settings.mtu == 1400  # a restart key: CONFIG keeps the TUN's real MTU
    assert running.config.handshake_timeout == 5
    assert (await running.reload()).changed == []  # the same file again: nothing to do


async def test_reload_of_the_policy_updates_the_firewall_and_the_nft_host_set(
    running: GatewayService, site: Site
) -> None:
    (ruleset,) = edges_of(running).rulesets
    before = len(ruleset.scripts)
    rule = {"from": "any", "to": "192.168.1.10/32", "proto": "icmp"}
    rewrite(running, site, policy={"rules": [rule]})
    report = await running.reload()
    assert report.changed == ["policy: 0 rules -> 1 rules, 0 tracked flow(s) cut"]
    assert report.errors == []
    assert running.gateway is not None and len(running.gateway.policy.rules) == 1
    assert "192.168.1.10" in ruleset.scripts[before][1]  # the host set now holds it
    assert running.control is not None


async def test_policy_reload_with_forward_filter_changed_leaves_the_ruleset(
    running: GatewayService, site: Site
) -> None:
    (ruleset,) = edges_of(running).rulesets
    before = len(ruleset.scripts)
    rule = {"from": "any", "to": "192.168.1.10/32", "proto": "icmp"}
    rewrite(running, site, policy={"rules": [rule]}, nftables={"forward_filter": False})
    report = await running.reload()
    assert report.errors == [f"nftables: {RESTART}"]
    assert len(ruleset.scripts) == before


async def test_a_failed_nft_host_update_is_reported_not_fatal(
    running: GatewayService, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ruleset,) = edges_of(running).rulesets

    async def refuse(hosts: object) -> None:
        raise NetError("nft: busy")

    monkeypatch.setattr(ruleset, "set_hosts", refuse)
    rewrite(running, site, policy={"rules": [{"from": "any", "to": "any", "proto": "any"}]})
    report = await running.reload()
    assert report.errors == ["nftables: host addresses not updated: nft: busy"]
    assert report.changed[0].startswith("policy: 0 rules -> 1 rules")


async def test_reload_adopts_a_renewed_certificate_and_a_new_crl(
    running: GatewayService, site: Site
) -> None:
    renewed = site.issue_gateway()
    put(renewed, site.dir, "gw")
    site.write_crl(number=2, revoked=[site.alice])
    report = await running.reload()
    assert report.changed == [
        f"gateway certificate: now serial {renewed.cert.serial_number:x}, valid until "
        f"{renewed.cert.not_valid_after_utc.isoformat()} (live tunnels kept)",
        "crl: number 1 -> 2, 1 revoked",
    ]
    assert running.own == renewed.cert
    assert running.control is not None and running.control.own_cert == renewed.cert


async def test_reload_refuses_a_certificate_with_other_overlay_addresses(
    running: GatewayService, site: Site
) -> None:
    old = running.own
    put(site.issue_gateway(addresses=["10.77.0.9"]), site.dir, "gw")
    with pytest.raises(PkiError, match="other overlay addresses: restart"):
        await running.reload()
    assert running.own is old


async def test_reload_refuses_a_mode_change_and_keeps_the_config(
    running: GatewayService, site: Site
) -> None:
    site.write(site.client_doc())
    with pytest.raises(ConfigError, match="changed to client: restart vpnd instead"):
        await running.reload()
    assert isinstance(running.config, GatewayConfig)


async def test_reload_refuses_an_empty_passphrase_file(running: GatewayService, site: Site) -> None:
    empty = site.dir / "pass"
    empty.write_bytes(b"\n")
    empty.chmod(0o600)
    pki = dict(site.gateway_doc()["pki"], key_passphrase_file="pass")
    rewrite(running, site, pki=pki)
    with pytest.raises(PkiError, match=r"pki.key_passphrase_file: passphrase file .* is empty"):
        await running.reload()
    assert running.config.pki.key_passphrase_file is None


async def test_reload_changes_the_log_level_live(running: GatewayService, site: Site) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        rewrite(running, site, log={"level": "debug"})
        report = await running.reload()
        assert report.changed == ["log level: info -> debug"]
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)


async def test_a_foreign_link_of_that_name_stops_start_up(site: Site) -> None:
    svc = make(site)
    net = edges_of(svc).fake_net
    net.create_link(TUN)
    with pytest.raises(StartupError, match="vpnd did not create it"):
        await svc.startup()
    await svc.shutdown()
    assert net.closed and edges_of(svc).tuns == []
    svc.lock.release()


async def test_a_link_of_a_live_vpnd_stops_start_up(site: Site) -> None:
    svc = make(site)
    net = edges_of(svc).fake_net
    net.create_link(TUN).alias = format_alias(os.getpid())
    with pytest.raises(StartupError, match="in use by a running vpnd"):
        await svc.startup()
    await svc.shutdown()
    svc.lock.release()


async def test_a_stale_link_is_replaced(site: Site) -> None:
    svc = make(site)
    net = edges_of(svc).fake_net
    net.create_link(TUN).alias = format_alias(2**22 + 7)  # above pid_max: surely gone
    await svc.startup()
    assert f"delete link {TUN}" in net.calls and net.links[TUN].alias == format_alias(os.getpid())
    await svc.shutdown()
    svc.lock.release()


async def test_a_busy_listen_port_undoes_everything_done_before(site: Site) -> None:
    edges = FakeEdges()
    edges.listen_error = OSError(98, "Address already in use")
    svc = make(site, edges)
    with pytest.raises(StartupError, match=r"listen 127.0.0.1:4443: Address already in use"):
        await svc.startup()
    await svc.shutdown()
    net = edges.fake_net
    assert TUN not in net.links and net.forwarding["ipv4"] is False
    assert edges.rulesets[0].removed and not (site.dir / "vpnd.sock").exists()
    svc.lock.release()


async def test_kernel_errors_stop_start_up_with_their_line(site: Site) -> None:
    edges = FakeEdges()

    async def refuse(ifname: str, alias: str) -> None:
        raise NetError(f"mark link {ifname}: operation not permitted")

    edges.fake_net.set_link_alias = refuse  # type: ignore[method-assign]
    svc = make(site, edges)
    with pytest.raises(StartupError, match="operation not permitted"):
        await svc.startup()
    await svc.shutdown()
    assert edges.tuns[0].closed
    svc.lock.release()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_metrics_are_served_and_a_busy_metrics_port_stops_start_up(site: Site) -> None:
    port = free_port()
    svc = make(site, metrics={"listen": f"127.0.0.1:{port}"})
    await svc.startup()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    body = await reader.read()
    writer.close()
    assert b"vpnd_" in body
    second = make(site, FakeEdges(), metrics={"listen": f"127.0.0.1:{port}"},
                  tun={"name": "vpnsvc2"}, control_socket=str(site.dir / "b.sock"))  # fmt: skip
    with pytest.raises(StartupError, match=str(port)):
        await second.startup()
    await second.shutdown()
    second.lock.release()
    await svc.shutdown()
    svc.lock.release()


async def test_no_firewall_without_nat_anti_spoofing_or_filter(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    svc = make(site, nftables={"forward_filter": False}, forwarding=False)
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        await svc.startup()
    assert edges_of(svc).rulesets == [] and svc.nft is None
    assert edges_of(svc).fake_net.forwarding["ipv4"] is False
    assert any("OPEN ROUTER" in r.getMessage() for r in caplog.records)
    await svc.shutdown()
    svc.lock.release()


async def test_crl_stale_allow_is_warned_at_start(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    pki = dict(site.gateway_doc()["pki"], crl_stale="allow")
    svc = make(site, pki=pki)
    with caplog.at_level(logging.WARNING, logger="vpnd"):
        await svc.startup()
    assert any("will be ACCEPTED" in r.getMessage() for r in caplog.records)
    await svc.shutdown()
    svc.lock.release()


async def test_an_older_crl_than_seen_stops_start_up(site: Site) -> None:
    state = site.dir / "state"
    state.mkdir()
    svc = make(site)
    await svc.startup()  # records CRL number 1
    await svc.shutdown()
    svc.lock.release()
    site.write_crl(number=5)
    later = make(site)
    await later.startup()  # records 5
    await later.shutdown()
    later.lock.release()
    site.write_crl(number=2)
    again = make(site)
    with pytest.raises(StartupError, match="crl_rollback"):
        await again.startup()
    await again.shutdown()
    again.lock.release()


async def test_sighup_runs_the_reload(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    done = asyncio.Event()
    ready: Callable[..., None] = lambda *a: done.set()  # noqa: E731
    monkeypatch.setattr(sdnotify, "ready", ready)
    edges = FakeEdges()
    edges.signals = True
    svc = make(site, edges)
    await svc.startup()
    done.clear()  # start-up said ready too
    site.write(site.gateway_doc(push_routes=["192.168.9.0/24"]))
    with caplog.at_level(logging.INFO, logger="vpnd"):
        signal.raise_signal(signal.SIGHUP)
        await done.wait()
    assert "SIGHUP reload: push_routes: [] -> [192.168.9.0/24]" in caplog.messages
    done.clear()
    site.write(site.client_doc())
    with caplog.at_level(logging.INFO, logger="vpnd"):
        signal.raise_signal(signal.SIGHUP)
        await done.wait()
    assert any(m.startswith("SIGHUP reload refused: ") for m in caplog.messages)
    await svc.shutdown()
    svc.lock.release()
