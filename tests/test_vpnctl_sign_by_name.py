"""vpnctl sign never takes an existing name over silently, nor a gateway's name ever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vpnd.pki.keys import load_certificate
from vpnd.pki.profile import describe_certificate

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def csr_named(path: Path, cn: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def records(pki: Path) -> list[tuple[object, ...]]:
    """What the inventory holds (not ``days_left``, which moves with the clock)."""
    code, text, err = run_vpnctl("--pki", str(pki), "list", "--json")
    assert code == 0, err
    data: list[dict[str, object]] = json.loads(text)
    return [(r["name"], r["serial"], r["role"], r["status"], r["addresses"]) for r in data]


@pytest.mark.parametrize("cn", ["bob", "Bob", " bob ", "bob\n", "BOB\t"])
def test_a_csr_for_an_existing_name_is_refused_without_replace(
    pki: Path, out: Path, cn: str
) -> None:
    code, _, err = run_vpnctl("issue", "bob", "--ip", "10.8.0.5", "--out", str(out))
    assert code == 0, err
    before = records(pki)
    csr = csr_named(out / "new.csr", cn)
    code, _, err = run_vpnctl("sign", str(csr), "--out", str(out / "new.pem"))
    assert code == 1
    assert_one_error_line(err)
    assert "'bob' already has a valid certificate" in err and "--replace" in err
    assert records(pki) == before  # nothing issued, bob keeps his address alone
    assert not (out / "new.pem").exists()
    # an explicit --replace is the admin's decision: the new certificate takes over
    code, _, err = run_vpnctl("sign", str(csr), "--replace", "--out", str(out / "new.pem"))
    assert code == 0, err
    info = describe_certificate(load_certificate(out / "new.pem"))
    assert info.name == "bob" and [str(a) for a in info.addresses] == ["10.8.0.5"]


def test_name_flag_overrides_the_csr_and_is_canonicalised(pki: Path, out: Path) -> None:
    code, _, err = run_vpnctl("issue", "bob", "--out", str(out))
    assert code == 0, err
    csr = csr_named(out / "new.csr", "bob")
    code, _, err = run_vpnctl("sign", str(csr), "--name", " Carol ", "--out", str(out / "c.pem"))
    assert code == 0, err
    info = describe_certificate(load_certificate(out / "c.pem"))
    assert info.name == "carol"
    assert info.addresses != describe_certificate(load_certificate(out / "bob.pem")).addresses
    code, _, err = run_vpnctl("sign", str(csr), "--name", "bad name", "--out", str(out / "d.pem"))
    assert code in {1, 2}
    assert_one_error_line(err)


@pytest.mark.parametrize("how", [("gw",), ("GW ",), ("x", "--name", "gw")])
def test_a_peer_can_never_take_a_gateways_name(pki: Path, out: Path, how: tuple[str, ...]) -> None:
    code, _, err = run_vpnctl("issue", "gw", "--gateway", "--dns", "gw.test", "--out", str(out))
    assert code == 0, err
    before = records(pki)
    csr = csr_named(out / "p.csr", how[0])
    for extra in ([], ["--replace"]):
        code, _, err = run_vpnctl("sign", str(csr), *how[1:], *extra, "--out", str(out / "p.pem"))
        assert code == 1, extra
        assert_one_error_line(err)
        assert "name of a gateway" in err
    code, _, err = run_vpnctl("issue", "gw", "--out", str(out))
    assert code == 1 and "name of a gateway" in err
    assert records(pki) == before
    # so `revoke gw` revokes the gateway, and nothing else
    code, _, err = run_vpnctl("revoke", "gw")
    assert code == 0, err
    assert [r[0] for r in records(pki) if r[3] == "revoked"] == ["gw"]


def test_a_gateway_can_never_take_a_valid_peers_name(pki: Path, out: Path) -> None:
    code, _, err = run_vpnctl("issue", "alice", "--out", str(out))
    assert code == 0, err
    csr = csr_named(out / "g.csr", "alice")
    code, _, err = run_vpnctl(
        "sign", str(csr), "--gateway", "--dns", "a.test", "--replace", "--out", str(out / "g.pem")
    )
    assert code == 1
    assert_one_error_line(err)
    assert "name of a peer" in err
