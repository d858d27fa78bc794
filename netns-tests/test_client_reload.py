"""The client daemon's own lifecycle: SIGHUP reloads and keeps the tunnel; SIGTERM says
it is stopping (not that the gateway is)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import yaml
from vpnlab import GW_OVERLAY, Lab


def test_sighup_reloads_the_client_and_keeps_the_tunnel_passing_pings(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    alice = lab.start_client("alice")
    lab.wait_up("alice")
    assert lab.ping("alice", GW_OVERLAY, count=2)
    assert alice.proc is not None and alice.config is not None and alice.log is not None
    # Pings run across both reloads; not one may be lost.
    pings = lab.workdir / "alice-pings.log"
    pinger = alice.ns.popen(["ping", "-n", "-c", "40", "-i", "0.1", GW_OVERLAY], pings)
    os.kill(alice.proc.pid, signal.SIGHUP)
    assert lab.wait_log("alice", r"SIGHUP reload: no change"), alice.log_text()
    # A setting that does not need a new session applies without touching the tunnel.
    cfg = yaml.safe_load(alice.config.read_text())
    cfg["reconnect"]["max_delay"] = 7
    alice.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.kill(alice.proc.pid, signal.SIGHUP)
    assert lab.wait_log("alice", r"SIGHUP reload: max_delay: 5\.0 -> 7\.0"), alice.log_text()
    try:
        assert pinger.wait(30) == 0, pings.read_text()
    except subprocess.TimeoutExpired:
        pinger.kill()
        raise
    assert re.search(r"40 packets transmitted, 40 received", pings.read_text()), pings.read_text()
    assert alice.proc.poll() is None, "SIGHUP must not end the client"
    log = alice.log_text()
    assert log.count("tunnel up: tun0") == 1, log  # never went down
    assert "tunnel down" not in log, log
    assert lab.hosts["gw"].log_text().count("authenticated serial") == 1
    # A broken config is refused with one line; the running one stays.
    alice.config.write_text("mode: client\nserver: [\n")
    os.kill(alice.proc.pid, signal.SIGHUP)
    assert lab.wait_log("alice", r"SIGHUP reload refused: "), alice.log_text()
    assert lab.ping("alice", GW_OVERLAY, count=2)
    assert "Traceback" not in alice.log_text()

    # Its own SIGTERM: it says it is stopping, and does not blame the gateway.
    assert lab.stop("alice") == 0
    log = alice.log_text()
    assert re.search(r"stopping: closing the connection to the gateway", log), log
    assert "tunnel down: tun0 removed" in log
    assert "gateway is shutting down" not in log, log
