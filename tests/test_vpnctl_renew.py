"""vpnctl renew, and the renewal lines of a client's vpnctl status."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import run_vpnctl
from control_fixtures import STATUS, ServerThread

from vpnctl.control_commands import status_text
from vpnd.control.protocol import ControlError, ErrorCode
from vpnd.control.results import RenewalStatus, RenewResult, StatusInfo

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")

RENEWAL = RenewalStatus(
    enabled=True,
    state="scheduled",
    cert_age_s=2 * 86400 + 3 * 3600,
    not_after="2026-06-08T12:00:00+00:00",
    generation=4,
    next_renewal="2026-06-05T20:00:00+00:00",
    renewals=3,
    failures=0,
    last_error=None,
    last_renewed="2026-06-03T09:00:00+00:00",
    quarantined=False,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "vpnd.sock") as running:
        yield running


def test_renew_prints_the_new_certificate(server: ServerThread) -> None:
    code, out, err = run_vpnctl("--socket", str(server.path), "renew")
    assert (code, err) == (0, "")
    values = dict(
        line.split(None, 1) for line in out.replace("not after", "not_after").splitlines()
    )
    assert values["result"] == "renewed"
    assert values["serial"] == "1f"
    assert values["not_after"] == "2026-07-01T12:00:00+00:00"


def test_renew_json(server: ServerThread) -> None:
    code, out, _ = run_vpnctl("--socket", str(server.path), "renew", "--json")
    assert code == 0
    assert RenewResult.from_json(json.loads(out)).renewed


def test_renew_failure_is_one_line(server: ServerThread) -> None:
    async def refuse() -> RenewResult:
        raise ControlError(ErrorCode.BUSY, "renewal failed: the gateway refused (revoked)")

    server.handler.renew = refuse  # type: ignore[method-assign]
    code, out, err = run_vpnctl("--socket", str(server.path), "renew")
    assert (code, out) == (1, "")
    assert err == "vpnctl: error: busy: renewal failed: the gateway refused (revoked)\n"


def test_renew_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    code, _, err = run_vpnctl("--socket", str(tmp_path / "none.sock"), "renew")
    assert code == 1 and err.startswith("vpnctl: error: ") and err.count("\n") == 1


def _client_status(renewal: RenewalStatus | None) -> dict[str, str]:
    info = dataclasses.replace(STATUS, role="client", sessions=1, renewal=renewal)
    return dict(line.split("  ", 1) for line in status_text(info).splitlines())


def test_client_status_shows_age_generation_and_next_renewal() -> None:
    lines = {k.strip(): v.strip() for k, v in _client_status(RENEWAL).items()}
    assert lines["cert age"] == "2d03h, generation 4, valid until 2026-06-08 12:00:00Z"
    assert lines["next renewal"] == "2026-06-05 20:00:00Z (scheduled)"
    assert lines["renewals"] == "3 since start, last 2026-06-03 09:00:00Z"
    assert "renewal error" not in lines


def test_client_status_shows_failures_quarantine_and_off() -> None:
    failing = dataclasses.replace(
        RENEWAL, state="backoff", failures=2, last_error="no live session", quarantined=True
    )
    lines = {k.strip(): v.strip() for k, v in _client_status(failing).items()}
    assert lines["renewal error"] == "no live session (2 in a row)"
    assert lines["next renewal"].endswith("(backoff, quarantined: renewing only)")
    off = dataclasses.replace(RENEWAL, enabled=False, generation=None)
    lines = {k.strip(): v.strip() for k, v in _client_status(off).items()}
    assert lines["renewal"] == "off (renewal.enabled is false)"
    assert lines["cert age"].startswith("2d03h, valid until")


def test_status_round_trips_renewal_and_gateways_omit_it() -> None:
    info = dataclasses.replace(STATUS, role="client", renewal=RENEWAL)
    assert StatusInfo.from_json(info.to_json()) == info
    assert "renewal" not in STATUS.to_json()
    assert StatusInfo.from_json(STATUS.to_json()).renewal is None
