"""vpnctl enroll against a real OpenSSH server in a namespace, then a tunnel from the
provisioned host: the uploaded client.yaml, used as is, brings vpnd up and pings the
gateway. The private key is made on the host and must never reach the admin's side.

Topology (vpnlab): gw 172.31.0.1, site 172.31.0.2 (sshd on :2222), admin 172.31.0.3
(runs vpnctl). The PKI lives in the lab's workdir; the "remote" dir is a tmp path.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nslib import NetnsFactory, holds_within
from vpnlab import GW_OVERLAY, GW_WAN, PORT, SERVER_NAME, VPNCTL, VPND, Lab

from vpnd.pki.keys import load_private_key

pytestmark = pytest.mark.netns

SSHD = "/usr/sbin/sshd"
SSH_PORT = 2222
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@pytest.fixture
def lab(netns_factory: NetnsFactory) -> Iterator[Lab]:
    lab = Lab(netns_factory)
    lab.build(clients=("site", "admin"))
    lab.make_pki()
    try:
        yield lab
    finally:
        problems = lab.cleanup()
        assert not problems, problems


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )


def _start_sshd(lab: Lab, d: Path) -> tuple[Path, Path]:
    """sshd in the site namespace; returns (SFTP log, the admin's known_hosts)."""
    d.mkdir()
    _keygen(d / "host_key")
    _keygen(d / "admin_id")
    (d / "authorized_keys").write_text((d / "admin_id.pub").read_text())
    site = lab.hosts["site"]
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {SSH_PORT}\n"
        f"ListenAddress {site.wan_ip}\n"
        f"HostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "StrictModes no\n"
        # sftp-server -e -l INFO logs every open with its flags (internal-sftp would log
        # to syslog): how we see what was read. The command runs through the shell.
        f"Subsystem sftp {SFTP_SERVER} -e -l INFO 2>>{d / 'sftp.log'}\n"
        # vpnd on the host's PATH, so enroll uses 'vpnd keygen' there.
        f"SetEnv PATH={Path(VPND).parent}:/usr/bin:/bin\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep chroot
    subprocess.run([SSHD, "-t", "-f", str(cfg)], check=True, timeout=30)
    log = d / "sshd.log"
    site.ns.popen([SSHD, "-D", "-e", "-f", str(cfg)], log)
    sftp_log = d / "sftp.log"
    admin = lab.hosts["admin"].ns
    probe = f"exec 3<>/dev/tcp/{site.wan_ip}/{SSH_PORT}"
    assert holds_within(
        lambda: admin.run(["bash", "-c", probe], check=False).returncode == 0, 10
    ), log.read_text()
    sftp_log.touch()
    # The admin's known_hosts holds the host key we made: the out-of-band verification.
    known = d / "known_hosts"
    public = (d / "host_key.pub").read_text().split()[:2]
    known.write_text(f"[{site.wan_ip}]:{SSH_PORT} {' '.join(public)}\n")
    return sftp_log, known


def _spki(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_enroll_over_real_sshd_then_tunnel_up(lab: Lab, tmp_path: Path) -> None:
    sshd_dir = lab.workdir / "sshd"
    sftp_log, known = _start_sshd(lab, sshd_dir)
    remote = tmp_path / "site-root" / "etc" / "vpnd"
    site = lab.hosts["site"]

    res = lab.hosts["admin"].ns.run(
        [
            VPNCTL, "--pki", str(lab.pki), "enroll", "site",
            "--ssh", f"root@{site.wan_ip}:{SSH_PORT}",
            "--identity", str(sshd_dir / "admin_id"), "--known-hosts", str(known),
            "--remote-dir", str(remote), "--groups", "eng",
            "--gateway-address", f"{GW_WAN}:{PORT}", "--server-name", SERVER_NAME,
        ],
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr + (sshd_dir / "sshd.log").read_text()
    assert "key made on the host by vpnd keygen" in res.stdout, res.stdout

    modes = {p.name: p.stat().st_mode & 0o777 for p in remote.iterdir()}
    assert modes == {"site.key": 0o600, "site.pem": 0o644, "ca.pem": 0o644, "client.yaml": 0o644}

    # The key pair matches the certificate signed from the host's CSR.
    key_pem = (remote / "site.key").read_bytes()
    key = load_private_key(remote / "site.key")
    cert = x509.load_pem_x509_certificate((remote / "site.pem").read_bytes())
    assert _spki(cert.public_key()) == _spki(key.public_key())
    (listed,) = [c for c in lab.vpnctl("list", "--json").split('"name": ')[1:] if "site" in c]
    assert '"delivered": true' in listed

    # The key never crossed the connection: SFTP opened the CSR for reading (so the log
    # does see reads) and never the key; no file on the admin's side holds its bytes.
    opens = re.findall(r'open "([^"]+)" flags (\S+)', sftp_log.read_text())
    read = [path for path, flags in opens if "READ" in flags.split(",")]
    assert any(p.endswith("/site.csr") for p in read), sftp_log.read_text()
    assert not any(p.endswith(".key") for p, _ in opens), opens
    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for base in (lab.workdir, tmp_path):
        for f in base.rglob("*"):
            if f.is_file() and remote not in f.parents:
                data = f.read_bytes()
                assert key_pem not in data and key_der not in data, f"key bytes in {f}"

    # The uploaded client.yaml, as is, brings the tunnel up.
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), lab.hosts["gw"].log_text()
    site.log = lab.workdir / "site.vpnd.log"
    site.proc = site.ns.popen([VPND, "--config", str(remote / "client.yaml")], site.log)
    assert lab.wait_log("site", r"tunnel up: vpn0"), site.log_text()
    assert lab.ping("site", GW_OVERLAY)
