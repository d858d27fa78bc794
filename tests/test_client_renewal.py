"""The client's side of in-tunnel renewal: checking what the gateway sent."""

from __future__ import annotations

import pytest
from pki_fixtures import DAY, NOW, make_ca

from vpnd.client.control import ClientControl
from vpnd.client.renewal import (
    RenewalError,
    common_name,
    generation_of,
    refusal_line,
    verify_renewed,
)
from vpnd.control.protocol import ControlError, ErrorCode
from vpnd.control.results import ReloadReport, RenewalStatus
from vpnd.pki.keys import certificate_pem, generate_key
from vpnd.proto import RefusalCode, RenewalRefused


def test_a_renewed_leaf_from_the_root_verifies() -> None:
    ca = make_ca()
    key = generate_key("ecdsa-p256")
    leaf = ca.issue("alice", key=key, generation=3)
    renewed = verify_renewed(leaf.pem(), name="alice", key=key, trust=ca.trust(), now=NOW)
    assert renewed.identity.name == "alice"
    assert renewed.identity.serial == leaf.cert.serial_number
    assert renewed.pem == leaf.pem()
    assert generation_of(renewed.identity) == 3


def test_a_leaf_of_the_online_issuer_verifies_with_the_issuer_sent_after_it() -> None:
    root = make_ca(path_length=1)
    issuer = root.intermediate("issuer")
    key = generate_key("ed25519")
    leaf = issuer.issue("alice", key=key)
    assert len(leaf.chain) == 2
    renewed = verify_renewed(
        leaf.pem(), name="alice", key=key, trust=root.trust(crl_required=False), now=NOW
    )
    assert renewed.pem.count(b"BEGIN CERTIFICATE") == 2
    # Without the issuer certificate the leaf cannot be chained to the root.
    with pytest.raises(RenewalError, match="does not verify"):
        verify_renewed(
            certificate_pem(leaf.cert),
            name="alice",
            key=key,
            trust=root.trust(crl_required=False),
            now=NOW,
        )


def test_someone_elses_name_is_refused() -> None:
    ca = make_ca()
    key = generate_key("ecdsa-p256")
    leaf = ca.issue("mallory", key=key)
    with pytest.raises(RenewalError, match="names 'mallory', not us"):
        verify_renewed(leaf.pem(), name="alice", key=key, trust=ca.trust(), now=NOW)


def test_a_certificate_for_another_key_is_refused() -> None:
    ca = make_ca()
    leaf = ca.issue("alice")
    with pytest.raises(RenewalError, match="does not carry the key we generated"):
        verify_renewed(
            leaf.pem(), name="alice", key=generate_key("ecdsa-p256"), trust=ca.trust(), now=NOW
        )


def test_a_foreign_ca_or_an_expired_leaf_is_refused() -> None:
    ours, theirs = make_ca(), make_ca("other-ca")
    key = generate_key("ecdsa-p256")
    leaf = theirs.issue("alice", key=key)
    with pytest.raises(RenewalError, match="does not verify"):
        verify_renewed(leaf.pem(), name="alice", key=key, trust=ours.trust(), now=NOW)
    old = ours.issue("alice", key=key, not_before=NOW - 9 * DAY, not_after=NOW - DAY)
    with pytest.raises(RenewalError, match="does not verify"):
        verify_renewed(old.pem(), name="alice", key=key, trust=ours.trust(), now=NOW)


@pytest.mark.parametrize(
    ("pem", "words"),
    [
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "unreadable"),
        (b"no pem here", "unreadable"),
    ],
)
def test_garbage_is_one_line_never_a_traceback(pem: bytes, words: str) -> None:
    ca = make_ca()
    with pytest.raises(RenewalError, match=words) as info:
        verify_renewed(pem, name="alice", key=generate_key("ed25519"), trust=ca.trust(), now=NOW)
    assert "\n" not in str(info.value)


def test_too_many_certificates_are_refused() -> None:
    ca = make_ca()
    key = generate_key("ecdsa-p256")
    leaf = ca.issue("alice", key=key)
    with pytest.raises(RenewalError, match="sent 5 certificates"):
        verify_renewed(leaf.pem() * 5, name="alice", key=key, trust=ca.trust(), now=NOW)


def test_refusal_lines_name_the_code() -> None:
    refused = RenewalRefused(1, RefusalCode.REVOKED, "serial 1f is revoked")
    assert refusal_line(refused) == (
        "the gateway refused the renewal (revoked): serial 1f is revoked"
    )
    assert "code 4242" in refusal_line(RenewalRefused(1, 4242, ""))
    timeout = RenewalRefused(2, RefusalCode.TIMEOUT, "no answer within 60s", local=True)
    assert refusal_line(timeout) == "no answer within 60s"


def test_common_name_of_our_certificate() -> None:
    assert common_name(make_ca().issue("alice").cert) == "alice"


class FakeRenewer:
    def __init__(self, result: object | None, error: str | None = None) -> None:
        self.result = result
        self.last_error = error
        self.calls = 0

    def status(self) -> RenewalStatus:
        return RenewalStatus(
            enabled=True, state="scheduled", cert_age_s=1.0, not_after="x", generation=None,
            next_renewal="now", renewals=0, failures=0, last_error=None, last_renewed=None,
            quarantined=False,
        )  # fmt: skip

    async def renew_now(self) -> object | None:
        self.calls += 1
        return self.result


class NoClient:
    gateway = None
    connected_since = None
    drops: dict[str, int] = {}

    def counters(self) -> None:
        return None


def _control(renewer: FakeRenewer | None) -> ClientControl:
    ca = make_ca()
    leaf = ca.issue("alice")

    async def reload() -> ReloadReport:
        return ReloadReport()

    return ClientControl(
        NoClient(),
        started_at=NOW.timestamp(),
        server="gw:443",
        tun="tun0",
        own_cert=lambda: leaf.cert,
        ca_cert=ca.cert,
        reload=reload,
        clock=NOW.timestamp,
        renewer=renewer,
    )


async def test_renew_command_reports_the_certificate_now_in_use() -> None:
    renewer = FakeRenewer(object())
    control = _control(renewer)
    result = await control.renew()
    assert result.renewed and renewer.calls == 1
    assert result.serial == f"{control._own_cert().serial_number:x}"
    status = await control.status()
    assert status.renewal is not None and status.renewal.next_renewal == "now"


async def test_renew_command_failure_is_one_line() -> None:
    control = _control(FakeRenewer(None, "the gateway refused the renewal (revoked): no"))
    with pytest.raises(ControlError) as info:
        await control.renew()
    assert info.value.code is ErrorCode.BUSY
    assert "refused the renewal (revoked)" in info.value.message
    with pytest.raises(ControlError, match="no renewer"):
        await _control(None).renew()
    assert (await _control(None).status()).renewal is None
