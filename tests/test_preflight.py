"""vpnd.preflight: the checks behind `vpnd --check` and every start, one line per problem.

Certificates come from pki_fixtures, dated around NOW; ``check`` is given ``now=NOW``.
Kernel state is read from a fake /sys/class/net directory, so nothing here needs root.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
from cli_helpers import run_vpnd as run_cli
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from pki_fixtures import DAY, NOW, Leaf, make_ca

from vpnd.config import load_config
from vpnd.pki import Role, crl_pem, private_key_pem
from vpnd.service.preflight import Report, check, has_cap_net_admin, link_owner

GW_YAML = """\
mode: gateway
listen: "127.0.0.1:{port}"
pki:
  ca: ca.pem
  cert: gw.pem
  key: gw.key
  crl: crl.pem
{extra_pki}tun:
  name: {tun}
control_socket: {dir}/vpnd.sock
"""
CLIENT_YAML = """\
mode: client
server: "127.0.0.1:4443"
server_name: gw.test
pki:
  ca: ca.pem
  cert: alice.pem
  key: alice.key
tun:
  name: {tun}
control_socket: {dir}/vpnd.sock
"""


def put(leaf: Leaf, directory: Path, name: str) -> None:
    """Write ``<name>.pem`` and ``<name>.key`` (0600, as the config loader demands)."""
    _, key = leaf.write(directory, name)
    key.chmod(0o600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Site:
    """A gateway + client config in a directory, with good files until a test breaks one."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.ca = make_ca("corp-ca")
        self.gw = self.ca.issue(
            "gw", role=Role.GATEWAY, addresses=["10.77.0.1"], dns_names=["gw.test"]
        )
        self.alice = self.ca.issue("alice", addresses=["10.77.0.2"])
        self.ca.write(tmp)
        put(self.gw, tmp, "gw")
        put(self.alice, tmp, "alice")
        self.port = free_port()
        self.sys = tmp / "sys-class-net"
        self.sys.mkdir()

    def gateway(self, *, extra_pki: str = "", tun: str = "vpn0") -> Path:
        path = self.dir / "gateway.yaml"
        path.write_text(GW_YAML.format(port=self.port, extra_pki=extra_pki, tun=tun, dir=self.dir))
        return path

    def client(self, *, tun: str = "tun0") -> Path:
        path = self.dir / "client.yaml"
        path.write_text(CLIENT_YAML.format(tun=tun, dir=self.dir))
        return path

    def run(self, config: Path, now: dt.datetime = NOW) -> Report:
        return check(load_config(config), now=now, sys_class_net=self.sys)

    def link(self, name: str, alias: str | None) -> None:
        (self.sys / name).mkdir()
        (self.sys / name / "ifalias").write_text(f"{alias}\n" if alias else "\n")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def one_problem(report: Report, *needles: str) -> str:
    assert len(report.problems) == 1, report.problems
    line = report.problems[0]
    assert "\n" not in line
    for needle in needles:
        assert needle in line, line
    return line


def test_good_gateway_and_client_pass(site: Site) -> None:
    report = site.run(site.gateway())
    assert report.problems == [] and report.warnings == []
    summary = "; ".join(report.ok)
    assert "gateway certificate 'gw'" in summary and "CRL #1 fresh" in summary
    assert f"listen 127.0.0.1:{site.port} free" in summary and "TUN vpn0 free" in summary
    assert site.run(site.client()).problems == []


def test_gateway_given_a_peer_certificate_as_its_own(site: Site) -> None:
    put(site.alice, site.dir, "gw")  # gw.pem/gw.key now hold alice's pair
    one_problem(site.run(site.gateway()), "pki.cert:", "'alice'", "not a gateway certificate",
                "serverAuth")  # fmt: skip


def test_client_given_the_gateway_certificate(site: Site) -> None:
    put(site.gw, site.dir, "alice")
    one_problem(site.run(site.client()), "pki.cert:", "not a client certificate", "clientAuth")


def test_gateway_certificate_from_another_ca(site: Site) -> None:
    other = make_ca("other-ca")
    put(other.issue("gw", role=Role.GATEWAY, addresses=["10.77.0.1"], dns_names=["gw.test"]),
        site.dir, "gw")  # fmt: skip
    one_problem(site.run(site.gateway()), "pki.cert:", "does not chain to a CA in pki.ca",
                "other-ca")  # fmt: skip


def test_crl_of_another_ca(site: Site) -> None:
    other = make_ca("other-ca")
    (site.dir / "crl.pem").write_bytes(crl_pem(other.crl()))
    one_problem(site.run(site.gateway()), "pki.crl:", "other-ca", "not a CA in pki.ca")


def test_crl_with_the_right_name_but_another_key(site: Site) -> None:
    impostor = make_ca("corp-ca")  # same subject, different key
    (site.dir / "crl.pem").write_bytes(crl_pem(impostor.crl()))
    one_problem(site.run(site.gateway()), "pki.crl:", "signature")


def test_stale_crl_is_refused_or_a_warning_with_crl_stale_allow(site: Site) -> None:
    later = NOW + 8 * DAY  # the fixtures' CRL is good until NOW + 7 days
    one_problem(site.run(site.gateway(), later), "pki.crl:", "stale", "nextUpdate")
    report = site.run(site.gateway(extra_pki="  crl_stale: allow\n"), later)
    assert report.problems == []
    assert any("stale" in w and "crl_stale" in w for w in report.warnings)


def test_key_that_does_not_match_the_certificate(site: Site) -> None:
    put(site.alice, site.dir, "spare")
    (site.dir / "gw.key").write_bytes((site.dir / "spare.key").read_bytes())
    one_problem(site.run(site.gateway()), "pki.key:", "is not the key of the certificate 'gw'")


def test_encrypted_key_needs_and_honours_the_passphrase_file(site: Site) -> None:
    key = site.gw.key
    assert not isinstance(key, rsa.RSAPrivateKey)  # the vpnd profile has no RSA keys
    (site.dir / "gw.key").write_bytes(private_key_pem(key, b"s3cret"))  # stays 0600
    one_problem(site.run(site.gateway()), "pki.key:", "pki.key_passphrase_file")
    (site.dir / "pass").write_bytes(b"s3cret\n")
    (site.dir / "pass").chmod(0o600)
    report = site.run(site.gateway(extra_pki="  key_passphrase_file: pass\n"))
    assert report.problems == []
    (site.dir / "pass").write_bytes(b"wrong\n")
    one_problem(site.run(site.gateway(extra_pki="  key_passphrase_file: pass\n")), "passphrase")


def test_expired_and_not_yet_valid_own_certificate(site: Site) -> None:
    put(site.ca.issue("alice", addresses=["10.77.0.2"], not_before=NOW - 9 * DAY,
                      not_after=NOW - DAY), site.dir, "alice")  # fmt: skip
    # A client that renews may start: the gateway quarantines it to renew, or refuses.
    report = site.run(site.client())
    assert report.problems == [] and any("only to" in w for w in report.warnings)
    renewing_off = site.client()
    renewing_off.write_text(renewing_off.read_text() + "renewal:\n  enabled: false\n")
    one_problem(site.run(renewing_off), "pki.cert:", "expired")
    put(site.ca.issue("alice", addresses=["10.77.0.2"], not_before=NOW + DAY,
                      not_after=NOW + 9 * DAY), site.dir, "alice")  # fmt: skip
    one_problem(site.run(site.client()), "pki.cert:", "not valid before")


def test_revoked_own_certificate(site: Site) -> None:
    (site.dir / "crl.pem").write_bytes(crl_pem(site.ca.crl([site.gw])))
    one_problem(site.run(site.gateway()), "pki.cert:", "revoked")


def test_listen_port_in_use(site: Site) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", site.port))
        busy.listen()
        one_problem(site.run(site.gateway()), "listen:", "already in use")
    assert site.run(site.gateway()).problems == []  # the check itself left nothing bound


def test_tun_name_of_a_foreign_interface_is_refused(site: Site) -> None:
    site.link("eth0", None)
    want = "tun.name: interface eth0 exists and was not created by vpnd; pick another name"
    assert one_problem(site.run(site.gateway(tun="eth0"))) == want
    site.link("veth1", "uplink to the LAN")
    one_problem(site.run(site.client(tun="veth1")), "tun.name: interface veth1")


def test_tun_left_by_a_dead_vpnd_is_accepted_one_held_by_a_live_vpnd_is_not(site: Site) -> None:
    dead_pid = _exited_pid()
    site.link("vpn0", f"vpnd:{dead_pid}")
    report = site.run(site.gateway())
    assert report.problems == []
    assert any(line.startswith("TUN vpn0 left by a vpnd that is gone") for line in report.ok)
    assert link_owner("vpn0", site.sys) == (True, dead_pid)
    assert link_owner("nope", site.sys) == (False, None)
    site.link("vpn1", f"vpnd:{os.getpid()}")  # this very process: alive
    one_problem(site.run(site.gateway(tun="vpn1")), "tun.name: interface vpn1 is in use by a")


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_real_sysfs_loopback_is_not_vpnds(site: Site) -> None:
    # The real /sys/class/net, read-only: "lo" exists in every namespace.
    assert link_owner("lo") == (True, None)


def test_cap_net_admin_is_read_from_proc_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tvpnd\nCapEff:\t0000000000000000\n")
    assert not has_cap_net_admin(status)
    status.write_text("Name:\tvpnd\nCapEff:\t0000000000001000\n")  # bit 12
    assert has_cap_net_admin(status)


# --- the CLI: vpnd --check --config FILE ---------------------------------------------


def _dated_site(tmp_path: Path) -> Site:
    """A site whose certificates are valid *now* (the CLI uses the real clock)."""
    site = Site.__new__(Site)
    site.dir = tmp_path
    real = dt.datetime.now(dt.UTC)
    site.ca = make_ca("corp-ca", not_before=real - 10 * DAY, not_after=real + 365 * DAY)
    site.gw = site.ca.issue("gw", role=Role.GATEWAY, addresses=["10.77.0.1"],
                            dns_names=["gw.test"], not_before=real - DAY,
                            not_after=real + 30 * DAY)  # fmt: skip
    site.alice = site.ca.issue("alice", addresses=["10.77.0.2"], not_before=real - DAY,
                               not_after=real + 30 * DAY)  # fmt: skip
    (tmp_path / "ca.pem").write_bytes(site.ca.cert.public_bytes(Encoding.PEM))
    (tmp_path / "crl.pem").write_bytes(
        crl_pem(site.ca.crl(this_update=real - DAY, next_update=real + 7 * DAY))
    )
    put(site.gw, tmp_path, "gw")
    put(site.alice, tmp_path, "alice")
    site.port = free_port()
    site.sys = tmp_path / "sys-class-net"
    site.sys.mkdir()
    return site


def test_cli_check_ok_prints_one_summary_line(tmp_path: Path) -> None:
    site = _dated_site(tmp_path)
    code, out, err = run_cli("--check", "--config", str(site.gateway(tun="vpnchk0")))
    assert (code, err) == (0, "")
    assert out.startswith("vpnd: ok: gateway config ") and out.count("\n") == 1
    assert "TUN vpnchk0 free" in out
    assert not (tmp_path / "vpnd.sock").exists()  # nothing was started


def test_cli_check_reports_each_problem_on_one_line(tmp_path: Path) -> None:
    site = _dated_site(tmp_path)
    put(site.alice, tmp_path, "gw")  # a peer certificate as the gateway's own
    (tmp_path / "crl.pem").write_bytes(crl_pem(make_ca("other-ca").crl()))
    code, out, err = run_cli("--check", "--config", str(site.gateway(tun="lo")))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert all(line.startswith("vpnd: error: ") for line in lines)
    assert any("not a gateway certificate" in line for line in lines)
    assert any("pki.crl:" in line and "other-ca" in line for line in lines)
    assert any(
        "tun.name: interface lo exists and was not created by vpnd" in line for line in lines
    )
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["--check"], 2, "--check needs --config"),
        (["--check", "--config", "nope.yaml"], 1, "does not exist"),
        (["--check", "keygen", "--name", "a", "--out-key", "k", "--out-csr", "c"], 2, "keygen"),
    ],
)
def test_cli_check_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], code: int, needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    got, out, err = run_cli(*argv)
    assert got == code and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("vpnd: error: ") and needle in err


def test_cli_check_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.yaml"
    bad.write_text("mode: gateway\ntun:\n  mtu: huge\n")
    code, _, err = run_cli("--check", "--config", str(bad))
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("vpnd: error: ")


# --- the same checks at start: vpnd.daemon.run ----------------------------------------


def _break(site: Site, how: str) -> None:
    other = make_ca("other-ca")
    if how == "peer certificate as its own":
        put(site.alice, site.dir, "gw")
    elif how == "certificate from another CA":
        real = dt.datetime.now(dt.UTC)
        put(other.issue("gw", role=Role.GATEWAY, addresses=["10.77.0.1"],
                        dns_names=["gw.test"], not_before=real - DAY,
                        not_after=real + 30 * DAY), site.dir, "gw")  # fmt: skip
    elif how == "another CA's CRL":
        (site.dir / "crl.pem").write_bytes(crl_pem(other.crl()))


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("peer certificate as its own", "not a gateway certificate"),
        ("certificate from another CA", "does not chain to a CA in pki.ca"),
        ("another CA's CRL", "not a CA in pki.ca"),
        (None, None),
    ],
)
def test_gateway_start_refuses_with_one_line_before_touching_anything(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str | None,
    needle: str | None,
) -> None:
    from vpnd.service import daemon

    site = _dated_site(tmp_path)
    if how is not None:
        _break(site, how)
    started: list[str] = []

    async def fake_gateway(cfg: object, path: str, *_: object) -> int:  # all kernel work
        started.append(path)
        return 0

    # The instance lock (taken before the checks) lives in the test's own runtime dir.
    monkeypatch.setenv("VPND_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(daemon, "_run_gateway", fake_gateway)
    monkeypatch.setattr(daemon, "setup_logging", lambda *a: None)  # keep caplog's handler
    with caplog.at_level(logging.INFO, logger="vpnd"):
        code = daemon.run(str(site.gateway(tun="vpnchk1")))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if needle is None:
        assert (code, started, errors) == (0, [str(site.dir / "gateway.yaml")], [])
        return
    assert code == 1
    assert started == []  # refused before the TUN, netlink, nftables or the listener
    assert len(errors) == 1, errors
    assert errors[0].startswith("cannot start: ") and needle in errors[0]


def test_the_online_issuer_is_checked(site: Site, tmp_path: Path) -> None:
    from vpnd.files.atomic import PRIVATE, atomic_write
    from vpnd.pki.keys import generate_key, private_key_pem

    config = site.gateway()
    text = config.read_text()
    (site.dir / "issuer.pem").write_bytes((site.dir / "ca.pem").read_bytes())
    atomic_write(site.dir / "issuer.key", private_key_pem(generate_key("ecdsa-p256")), PRIVATE)
    (site.dir / "inventory.sqlite").write_bytes(b"x")
    config.write_text(
        text.replace(
            "pki:\n",
            f"pki:\n  issuer: {{cert: {site.dir}/issuer.pem, key: {site.dir}/issuer.key}}\n"
            f"  inventory: {site.dir}/inventory.sqlite\n",
            1,
        )
    )
    one_problem(site.run(config), "pki.issuer:", "does not match")
