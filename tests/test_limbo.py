"""x509-limbo conformance: every case through vpnd's verifier core, skips written down.

CLIENT cases go through the peer path (client verifier), SERVER cases (including all
``crl::*`` cases) through the gateway path (server verifier for the expected name).
The vpnd profile (EKU/SAN/canonical CN/overlay networks) is switched off with
``VerifyOptions(profile=False)``: limbo certificates are not vpnd certificates. What
remains is exactly what vpnd relies on: path validation, strength rules, chain
structure checks and revocation.
"""

from __future__ import annotations

import datetime as dt
import gzip
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from vpnd.pki import PkiError, Reason, Role, TrustStore, VerifyError, VerifyOptions, verify_chain

# Shipped in the repository (source and licence in tests/data/x509-limbo/README.md), so a
# plain clone needs nothing beside it.
LIMBO = Path(__file__).resolve().parent / "data" / "x509-limbo" / "limbo.json.gz"

# One line per skipped case: why vpnd (deliberately, or through cryptography 50.0.2)
# decides differently from limbo's expectation.
SKIPS: dict[str, str] = {
    "rfc5280::ca-as-leaf": "conflicts with webpki::ca-as-leaf; vpnd refuses a CA as leaf",
    "pathlen::validation-ignores-pathlen-in-leaf": "leaf is CA:TRUE; vpnd refuses a CA as leaf",
    "pathlen::self-issued-certs-pathlen": "cryptography 50 does not exempt self-issued ICAs",
    "pathlen::max-chain-depth-1-self-issued": "cryptography 50 does not exempt self-issued ICAs",
    "crl::issuer-no-keyusage-extension": "cryptography's verifier requires keyUsage on every CA",
    "rfc5280::aki::cross-signed-root-missing-aki": "pedantic RFC 5280; no cross-signing",
    "rfc5280::nc::permitted-dns-match-noncritical": "RFC 5280 vs CABF conflict; we follow CABF",
    "rfc5280::pc::ica-noncritical-pc": "certificate policies are not supported by design",
    "rfc5280::nc::permitted-dn-match": "directoryName constraints unsupported (no peer name)",
    "webpki::eku::ee-anyeku": "CABF EKU pedantry; the vpnd profile refuses anyEKU itself",
    "webpki::eku::ee-without-eku": "CABF EKU pedantry; the vpnd profile refuses a missing EKU",
    "webpki::eku::root-has-eku": "CABF EKU pedantry about roots; roots are the operator's own",
    "webpki::san::public-suffix-wildcard-san": "public-suffix wildcards: vpnd has no PSL",
    "webpki::san::public-suffix-multi-label-wildcard-san": "public-suffix wildcards: no PSL",
    "webpki::san::public-suffix-private-namespace-wildcard-san": "public-suffix: no PSL",
}
# CABF BR 7.1.4.3 (CN must repeat a SAN entry): vpnd's CN is the peer name, deliberately
# not a SAN entry, and names are only ever matched against the SAN.
CN_NOT_IN_SAN = "CABF CN-in-SAN rule: a vpnd CN is the peer name, never matched or in SAN"
for _case in (
    "ipv4-hex-mismatch",
    "ipv4-leading-zeros-mismatch",
    "ipv6-uppercase-mismatch",
    "ipv6-uncompressed-mismatch",
    "ipv6-non-rfc5952-mismatch",
    "punycode-not-in-san",
    "utf8-vs-punycode-mismatch",
    "not-in-san",
    "case-mismatch",
):
    SKIPS[f"webpki::cn::{_case}"] = CN_NOT_IN_SAN

# Failures whose Reason is pinned, so they fail for the right cause.
EXPECTED_REASONS: dict[str, set[Reason]] = {
    "crl::revoked-certificate-with-crl": {Reason.REVOKED},
    "crl::crlnumber-missing": {Reason.CRL_INVALID},
    "crl::crlnumber-critical": {Reason.CRL_INVALID},
    "crl::issuer-missing-crlsign": {Reason.CRL_INVALID},
}


def _load() -> list[dict[str, Any]]:
    if not LIMBO.is_file():
        return []
    data: dict[str, Any] = json.loads(gzip.decompress(LIMBO.read_bytes()))
    cases: list[dict[str, Any]] = data["testcases"]
    return cases


CASES = _load()


def test_limbo_file_present() -> None:
    assert LIMBO.is_file(), (
        f"x509-limbo vectors missing at {LIMBO}: they ship with the repository "
        "(see tests/data/x509-limbo/README.md)"
    )
    assert len(CASES) > 100


def test_skips_name_real_cases() -> None:
    ids = {c["id"] for c in CASES}
    stale = sorted(set(SKIPS) - ids) + sorted(set(EXPECTED_REASONS) - ids)
    assert not stale, f"skip/reason entries for cases not in limbo.json: {stale}"


def _subject(case: dict[str, Any]) -> x509.DNSName | x509.IPAddress:
    peer = case["expected_peer_name"]
    if peer["kind"] == "DNS":
        return x509.DNSName(peer["value"])
    assert peer["kind"] == "IP", peer
    return x509.IPAddress(ipaddress.ip_address(peer["value"]))


def _san_values(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.RFC822Name)} | {
        str(v) for v in san.get_values_for_type(x509.DNSName)
    }


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_limbo(case: dict[str, Any]) -> None:
    if case["id"] in SKIPS:
        pytest.skip(SKIPS[case["id"]])
    kind = case["validation_kind"]
    assert kind in ("CLIENT", "SERVER"), kind
    assert not case["signature_algorithms"], "per-case signature algorithm sets unsupported"
    if kind == "SERVER" and case["expected_peer_name"] is None:
        pytest.fail("SERVER case without expected_peer_name: add a skip with a reason")
    # Extra "required" key usages beyond what the verifier kind implies are not modelled.
    assert set(case["extended_key_usage"] or []) <= {"serverAuth", "clientAuth"}

    def pem(text: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(text.encode())

    roots = tuple(pem(c) for c in case["trusted_certs"])
    intermediates = [pem(c) for c in case["untrusted_intermediates"]]
    leaf = pem(case["peer_certificate"])
    crls = tuple(x509.load_pem_x509_crl(c.encode()) for c in case["crls"])
    when = case["validation_time"]
    now = dt.datetime.fromisoformat(when) if when else dt.datetime.now(dt.UTC)
    options = VerifyOptions(
        profile=False, max_chain_depth=case["max_chain_depth"], max_sent_certs=64
    )
    role = Role.PEER if kind == "CLIENT" else Role.GATEWAY
    subject = _subject(case) if kind == "SERVER" else None
    try:
        trust = TrustStore(roots=roots, crls=crls, crl_required=bool(crls))
        chain = verify_chain(
            [leaf, *intermediates],
            now=now,
            trust=trust,
            role=role,
            subject=subject,
            options=options,
        )
    except PkiError as exc:
        assert case["expected_result"] == "FAILURE", f"refused a valid chain: {exc}"
        want = EXPECTED_REASONS.get(case["id"])
        if want is not None:
            assert isinstance(exc, VerifyError)
            assert exc.reason in want, str(exc)
        return
    assert case["expected_result"] == "SUCCESS", f"accepted an invalid chain: {case['id']}"
    assert chain[0] == leaf
    assert chain[-1] in roots
    for name in case["expected_peer_names"] or []:
        assert name["value"] in _san_values(leaf), name
