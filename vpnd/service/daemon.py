"""Composition root: ``run(config_path)`` starts one vpnd and returns its exit code.

It loads and validates the config once, takes the instance lock, refuses a live
control socket, runs the same checks as ``vpnd --check``, then hands over to the
service of the mode (``GatewayService`` or ``ClientService``), which builds the real
TUN, netlink, nftables and TLS objects and, on SIGTERM/SIGINT (or a crash of the
session), removes everything it put into the kernel.

Exit codes: 0 stopped cleanly; 1 refused to start, or stopped by a fatal error;
2 the config is invalid; 130 interrupted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import sys

from vpnd.client.runner import LocalError
from vpnd.config import ClientConfig, ConfigError, GatewayConfig, load_config
from vpnd.service import preflight
from vpnd.service.client_service import ClientService
from vpnd.service.gateway_service import GatewayService
from vpnd.service.runstate import (
    InstanceLock,
    RuntimeDirError,
    control_socket_in_use,
    resolve_runtime_dir,
)
from vpnd.service.startup import Edges, StartupError
from vpnd.telemetry.logsetup import setup_logging

log = logging.getLogger("vpnd")


class _Refused(Exception):
    """Start-up refused; every reason was already logged, one line each."""


def run(config_path: str) -> int:
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        print(f"vpnd: {err}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level.value, cfg.log.format.value)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    try:
        return asyncio.run(_main(cfg, config_path))
    except _Refused:
        return 1
    except StartupError as err:
        log.error("cannot start: %s", err)
        return 1
    except LocalError as err:
        log.error("stopping: %s (a local problem: reconnecting cannot help)", err)
        return 1
    except KeyboardInterrupt:
        return 130


async def _main(cfg: GatewayConfig | ClientConfig, config_path: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Before anything touches the kernel: one vpnd per (network namespace, TUN name),
    # and never a second one on a live control socket.
    lock = InstanceLock(resolve_runtime_dir(), cfg.tun.name)
    try:
        lock.acquire()
    except RuntimeDirError as err:
        raise StartupError(str(err)) from None
    try:
        if control_socket_in_use(cfg.control_socket):
            raise StartupError(
                f"control_socket {cfg.control_socket}: another vpnd is listening there; "
                "stop it first or set another control_socket"
            )
        # The same checks as `vpnd --check`, once we know we are the only instance (a
        # second one must hear "another vpnd", not "port in use"), before any kernel work.
        _preflight(cfg)
        if isinstance(cfg, GatewayConfig):
            return await _run_gateway(cfg, config_path, stop, lock)
        return await _run_client(cfg, config_path, stop, lock)
    finally:
        lock.release()


def _preflight(cfg: GatewayConfig | ClientConfig) -> None:
    report = preflight.check(cfg, now=dt.datetime.now(dt.UTC), privileged=True)
    for warning in report.warnings:
        if warning not in cfg.warnings:
            log.warning("%s", warning)
    for problem in report.problems:
        log.error("cannot start: %s", problem)
    if report.problems:
        raise _Refused


async def _run_gateway(
    cfg: GatewayConfig, config_path: str, stop: asyncio.Event, lock: InstanceLock
) -> int:
    service = GatewayService(cfg, config_path=config_path, lock=lock, edges=Edges())
    return await _serve_until(service, stop)


async def _run_client(
    cfg: ClientConfig, config_path: str, stop: asyncio.Event, lock: InstanceLock
) -> int:
    service = ClientService(cfg, config_path=config_path, lock=lock, edges=Edges())
    return await _serve_until(service, stop)


async def _serve_until(service: GatewayService | ClientService, stop: asyncio.Event) -> int:
    """Run ``service`` until ``stop`` (SIGTERM/SIGINT) or it ends by itself."""
    relay = asyncio.create_task(_relay(stop, service))
    try:
        return await service.run()
    finally:
        relay.cancel()


async def _relay(stop: asyncio.Event, service: GatewayService | ClientService) -> None:
    await stop.wait()
    service.stop()
