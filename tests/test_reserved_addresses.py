"""Reserved overlay addresses and default routes never reach a peer certificate's holder.

The gateway refuses at admission a peer certificate holding the gateway's own overlay
address, an overlay's network or broadcast address, or a default route (0.0.0.0/0,
::/0): full tunnel is a client mode. vpnctl refuses to issue them (see the vpnctl tests
at the bottom), and never leases the gateway's address to a peer, even after
``revoke gw``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line
from cli_helpers import run_vpnctl as vpnctl
from inprocess_fixtures import DAY, REAL_NOW, World, owners


@pytest.mark.parametrize(
    ("addresses", "routes", "v6", "why"),
    [
        (["10.8.0.1"], [], False, "the gateway's own"),
        (["10.8.0.0"], [], False, "network address"),
        (["10.8.0.255"], [], False, "broadcast address"),
        (["10.8.0.9", "fd00:8::1"], [], True, "the gateway's own"),
        (["10.8.0.9"], ["0.0.0.0/0"], False, "default route"),
        (["10.8.0.9"], ["::/0"], False, "default route"),
        (["10.8.0.9", "fd00:8::9"], ["::/0"], True, "default route"),
    ],
)
@pytest.mark.looptime
async def test_gateway_refuses_reserved_addresses_and_default_routes(
    tmp_path: Path, addresses: list[str], routes: list[str], v6: bool, why: str
) -> None:
    w = World(tmp_path, v6=v6)
    await w.start_gateway()
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        leaf = w.ca.issue(
            "odd",
            addresses=addresses,
            routes=routes,
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 9 * DAY,
        )
        odd = w.start_client("odd", leaf=leaf)
        await w.until(lambda: odd.client.last_outcome is not None, "refused")
        odd.client.stop()
        outcome = odd.client.last_outcome
        assert outcome is not None and not outcome.established
        assert why in outcome.message, outcome.message
        assert odd.tun == []
        assert set(owners(w)) == {"alice"}
        assert w.gateway is not None and w.gateway.handshakes["accepted"] == 1
    finally:
        await w.close()


@pytest.mark.looptime
async def test_gateway_control_an_ordinary_site_peer_is_admitted(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        leaf = w.ca.issue(
            "site",
            addresses=["10.8.0.9"],
            routes=["192.168.60.0/24"],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 9 * DAY,
        )
        site = w.start_client("site", leaf=leaf)
        await asyncio.wait_for(site.client.connected.wait(), 5)
        site.client.stop()
    finally:
        await w.close()


# --- vpnctl ---------------------------------------------------------------------------


@pytest.fixture
def gw_pki(pki: Path, out: Path) -> Path:
    code, _, err = vpnctl("issue", "gw", "--gateway", "--dns", "gw.test", "--out", str(out))
    assert code == 0, err
    return pki


@pytest.mark.usefixtures("vpnctl_clean_env")
@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--ip", "10.8.0.1"], "10.8.0.1"),
        (["--ip", "10.8.0.0"], "network address"),
        (["--ip", "10.8.0.255"], "broadcast address"),
        (["--routes", "0.0.0.0/0"], "default route"),
        (["--routes", "::/0"], "default route"),
    ],
)
def test_vpnctl_refuses_reserved_addresses_and_default_routes(
    gw_pki: Path, out: Path, args: list[str], why: str
) -> None:
    code, _, err = vpnctl("issue", "odd", *args, "--out", str(out))
    assert code == 1, err
    assert_one_error_line(err)
    assert why in err


def _leases(pki: Path) -> dict[str, list[str]]:
    code, text, err = vpnctl("--pki", str(pki), "list", "--json")
    assert code == 0, err
    return {r["name"]: r["addresses"] for r in json.loads(text) if r["status"] == "valid"}


@pytest.mark.usefixtures("vpnctl_clean_env")
def test_after_revoking_the_gateway_its_address_is_never_leased_to_a_peer(
    gw_pki: Path, out: Path
) -> None:
    code, _, err = vpnctl("revoke", "gw")
    assert code == 0, err
    code, _, err = vpnctl("issue", "alice", "--out", str(out))
    assert code == 0, err
    assert _leases(gw_pki)["alice"] == ["10.8.0.2"]
    code, _, err = vpnctl("issue", "bob", "--ip", "10.8.0.1", "--out", str(out))
    assert code == 1
    assert_one_error_line(err)
    assert "gateway" in err
    # a gateway on another address: that one is kept from peers too, once it is revoked
    code, _, err = vpnctl(
        "issue", "gw2", "--gateway", "--dns", "gw2.test", "--ip", "10.8.0.50", "--out", str(out)
    )
    assert code == 0, err
    code, _, err = vpnctl("revoke", "gw2")
    assert code == 0, err
    code, _, err = vpnctl("issue", "carol", "--ip", "10.8.0.50", "--out", str(out))
    assert code == 1 and "gateway" in err
