"""vpnctl enroll against an in-process SSH server on 127.0.0.1 (see provision_fixtures)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from cli_helpers import assert_one_error_line, run_vpnctl
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from provision_fixtures import VPND, Setup, provisioning, tree

from vpnd.config import ClientConfig, load_config
from vpnd.pki.keys import load_private_key
from vpnd.pki.profile import describe_certificate

GW = ["--gateway-address", "10.0.0.1:4443", "--server-name", "gw.test"]


pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    with provisioning(tmp_path) as setup:
        yield setup


def enroll(s: Setup, target: str, name: str, remote_dir: Path, *extra: str) -> tuple[int, str, str]:
    return run_vpnctl(
        "--pki", str(s.pki.path), "enroll", name, "--ssh", target,
        "--identity", str(s.identity), "--known-hosts", str(s.known_hosts),
        "--remote-dir", str(remote_dir), *extra,
    )  # fmt: skip


def public_der(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def local_files_containing(root: Path, needle: bytes, skip: Path) -> list[Path]:
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents and needle in p.read_bytes()
    ]


def test_enroll_with_remote_vpnd_keygen(s: Setup) -> None:
    host = s.new_host(path=s.bin_dir("bin", {"vpnd": str(VPND)}))
    rdir = s.remote / "etc" / "vpnd"
    code, out, err = enroll(s, host.target, "Alice", rdir, "--groups", "eng", *GW)
    assert code == 0, err
    assert "enrolled alice" in out and "vpnd keygen" in out

    files = tree(rdir)
    assert {k: v[0] for k, v in files.items()} == {
        "alice.key": 0o600,
        "alice.pem": 0o644,
        "ca.pem": 0o644,
        "client.yaml": 0o644,
    }
    assert rdir.stat().st_mode & 0o777 == 0o755
    key = load_private_key(rdir / "alice.key")
    cert = x509.load_pem_x509_certificate(files["alice.pem"][1])
    assert public_der(cert.public_key()) == public_der(key.public_key())
    info = describe_certificate(cert)
    assert (info.name, tuple(info.groups)) == ("alice", ("eng",))
    assert files["ca.pem"][1] == s.pki.ca_cert_path.read_bytes()

    cfg = load_config(rdir / "client.yaml")  # vpnd's own loader, files checked
    assert isinstance(cfg, ClientConfig)
    assert (str(cfg.server), cfg.server_name) == ("10.0.0.1:4443", "gw.test")
    assert (cfg.pki.cert, cfg.pki.key, cfg.pki.ca) == (
        rdir / "alice.pem",
        rdir / "alice.key",
        rdir / "ca.pem",
    )

    (listed,) = s.pki.list_certificates()
    assert listed.record.delivered and listed.record.serial == cert.serial_number
    # The key never travelled: SFTP only ever read the CSR, and no local file holds it.
    assert (
        host.stats.reads == [r for r in host.stats.reads if r.endswith("/alice.csr")]
        and len(host.stats.reads) == 1
    )
    assert any(c.startswith("vpnd keygen --name alice") for c in host.stats.commands)
    key_pem = (rdir / "alice.key").read_bytes()
    assert local_files_containing(s.tmp, key_pem, skip=s.remote) == []


def test_enroll_falls_back_to_openssl(s: Setup) -> None:
    host = s.new_host()  # PATH /usr/bin:/bin: openssl, no vpnd
    rdir = s.remote / "opt" / "vpn"
    code, out, err = enroll(s, host.target, "bob", rdir)
    assert code == 0, err
    assert "openssl" in out
    files = tree(rdir)
    assert {k: v[0] for k, v in files.items()} == {
        "bob.key": 0o600,
        "bob.pem": 0o644,
        "ca.pem": 0o644,
    }  # no gateway settings given: no client.yaml
    key = load_private_key(rdir / "bob.key")
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate(files["bob.pem"][1])
    assert public_der(cert.public_key()) == public_der(key.public_key())
    assert any(c.startswith("umask 077 && openssl req") for c in host.stats.commands)


def test_unknown_host_key_refused(s: Setup) -> None:
    host = s.new_host(trusted=False)
    rdir = s.remote / "vpnd"
    code, _, err = enroll(s, host.target, "alice", rdir, *GW)
    line = assert_one_error_line(err)
    assert code == 1
    assert "unknown" in line and "ssh-keyscan -p" in line and "out of band" in line
    assert not rdir.exists() and host.stats.commands == []
    assert s.pki.list_certificates() == []


def test_changed_host_key_refused(s: Setup) -> None:
    host = s.new_host(trusted=False)
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    s.known_hosts.write_text(host.known_hosts_line(impostor))
    code, _, err = enroll(s, host.target, "alice", s.remote / "vpnd")
    line = assert_one_error_line(err)
    assert code == 1 and "does NOT match" in line and "ssh-keygen -R" in line
    assert host.stats.commands == [] and s.pki.list_certificates() == []


def test_missing_known_hosts_file(s: Setup) -> None:
    host = s.new_host()
    s.known_hosts.unlink()
    code, _, err = enroll(s, host.target, "alice", s.remote / "vpnd")
    assert code == 1 and "does not exist" in assert_one_error_line(err)


def _old_bundle(rdir: Path) -> dict[str, tuple[int, bytes]]:
    rdir.mkdir(parents=True)
    for name, mode in (("alice.key", 0o600), ("alice.pem", 0o644), ("ca.pem", 0o644)):
        (rdir / name).write_bytes(f"old {name}\n".encode())
        (rdir / name).chmod(mode)
    return tree(rdir)


def test_keygen_failing_midway_leaves_host_and_inventory_as_they_were(s: Setup) -> None:
    # A vpnd that writes half a key and dies.
    broken = 'for a; do [ "$prev" = --out-key ] && echo partial > "$a"; prev=$a; done\n'
    broken += "echo 'vpnd: error: disk on fire' >&2; exit 1\n"
    host = s.new_host(path=s.bin_dir("bin", {"vpnd": broken}))
    rdir = s.remote / "etc" / "vpnd"
    before = _old_bundle(rdir)
    code, _, err = enroll(s, host.target, "alice", rdir, *GW)
    line = assert_one_error_line(err)
    assert code == 1 and "key generation (vpnd keygen) failed: vpnd: error: disk on fire" in line
    assert tree(rdir) == before  # no staging dir, no half key, old bundle intact
    assert s.pki.list_certificates() == []


def test_upload_failing_after_signing_marks_undelivered(s: Setup) -> None:
    host = s.new_host()
    host.fail_write = "client.yaml"
    rdir = s.remote / "etc" / "vpnd"
    before = _old_bundle(rdir)
    code, _, err = enroll(s, host.target, "alice", rdir, *GW)
    line = assert_one_error_line(err)
    assert code == 1 and "injected" in line and "marked undelivered" in line
    assert tree(rdir) == before
    (listed,) = s.pki.list_certificates()
    assert not listed.record.delivered
    # vpnctl list --json shows it.
    code, out, _ = run_vpnctl("--pki", str(s.pki.path), "list", "--json")
    assert code == 0 and '"delivered": false' in out


def test_rename_failing_midway_restores_the_old_bundle(s: Setup) -> None:
    host = s.new_host()
    host.fail_rename = "/ca.pem"  # after the key and certificate were renamed
    rdir = s.remote / "etc" / "vpnd"
    before = _old_bundle(rdir)
    code, _, err = enroll(s, host.target, "alice", rdir, *GW)
    assert code == 1 and "marked undelivered" in assert_one_error_line(err)
    assert tree(rdir) == before


def test_failure_removes_a_remote_dir_it_created(s: Setup) -> None:
    host = s.new_host()
    host.fail_write = "ca.pem"
    code, _, err = enroll(s, host.target, "alice", s.remote / "new" / "vpnd")
    assert code == 1, err
    assert list(s.remote.iterdir()) == []


def test_wrong_identity_refused(s: Setup, tmp_path: Path) -> None:
    host = s.new_host()
    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(stranger)
    code, _, err = run_vpnctl(
        "--pki", str(s.pki.path), "enroll", "alice", "--ssh", host.target,
        "--identity", str(stranger), "--known-hosts", str(s.known_hosts),
        "--remote-dir", str(s.remote / "v"),
    )  # fmt: skip
    assert code == 1 and "refused authentication" in assert_one_error_line(err)


def test_encrypted_identity_needs_passphrase_file(s: Setup, tmp_path: Path) -> None:
    host = s.new_host()
    s.client_key.write_private_key(s.identity, "pkcs8-pem", passphrase="hunter22")
    code, _, err = enroll(s, host.target, "alice", s.remote / "v")
    assert code == 1 and "--passphrase-file" in assert_one_error_line(err)

    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    code, _, err = enroll(s, host.target, "alice", s.remote / "v", "--passphrase-file", str(wrong))
    assert code == 1 and "wrong passphrase" in assert_one_error_line(err)

    right = tmp_path / "pass"
    right.write_text("hunter22\n")
    code, _, err = enroll(s, host.target, "alice", s.remote / "v", "--passphrase-file", str(right))
    assert code == 0, err


def test_through_a_jump_host(s: Setup) -> None:
    target = s.new_host()
    jump = s.new_host()
    jump.allow_forwarding = True
    code, _, err = enroll(
        s, target.target, "alice", s.remote / "v", "--jump", f"root@127.0.0.1:{jump.port}"
    )
    assert code == 0, err
    assert jump.stats.forwards == [("127.0.0.1", target.port)]
    assert jump.stats.commands == [] and target.stats.commands


def test_restart_reports_the_service_state(s: Setup) -> None:
    log = s.tmp / "systemctl.log"
    fake = f'echo "$@" >> {log}\n[ "$1" = is-active ] && echo active\nexit 0\n'
    host = s.new_host(path=s.bin_dir("bin", {"systemctl": fake}))
    code, out, err = enroll(s, host.target, "alice", s.remote / "v", *GW, "--restart")
    assert code == 0, err
    assert "vpnd-client restarted: active" in out
    assert log.read_text().splitlines() == ["restart vpnd-client", "is-active vpnd-client"]


def test_restart_without_systemd_is_reported(s: Setup) -> None:
    # A PATH with sh and openssl but no systemctl.
    bare = s.bin_dir(
        "bare", {"sh": "/bin/sh", "openssl": "/usr/bin/openssl", "cat": "/bin/cat"}
    ).split(":")[0]
    host = s.new_host(path=bare)
    code, _, err = enroll(s, host.target, "alice", s.remote / "v", *GW, "--restart")
    assert code == 1 and "delivered, but" in assert_one_error_line(err) and "no systemctl" in err
    (listed,) = s.pki.list_certificates()
    assert listed.record.delivered


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ssh", "root@host:99999"], "port"),
        (["--ssh", "root@h", "--gateway-address", "gw:1"], "server name is missing"),
        (["--ssh", "root@h", "--remote-dir", "etc/vpnd"], "absolute"),
        (["--ssh", "root@h", "--passphrase-file", "/x"], "--identity"),
        (["--ssh", "root@h", "--gateway-address", "nope", "--server-name", "gw"], "no :port"),
    ],
)
def test_usage_errors(s: Setup, args: list[str], needle: str) -> None:
    code, _, err = run_vpnctl("--pki", str(s.pki.path), "enroll", "alice", *args)
    assert code == 2 and needle in assert_one_error_line(err)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_bcrypt_encrypted_openssh_key_gets_a_way_out(s: Setup, tmp_path: Path) -> None:
    key = tmp_path / "id_openssh"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f", str(key)], check=True)
    (tmp_path / "pw").write_text("pw\n")
    code, _, err = run_vpnctl(
        "--pki", str(s.pki.path), "enroll", "alice", "--ssh", "root@127.0.0.1:1",
        "--identity", str(key), "--passphrase-file", str(tmp_path / "pw"),
        "--known-hosts", str(s.known_hosts),
    )  # fmt: skip
    line = assert_one_error_line(err)
    assert code == 1
    if importlib.util.find_spec("bcrypt") is None:
        assert "needs the Python package bcrypt" in line and "ssh-keygen -p -m PKCS8" in line
    else:  # the key loads; port 1 answers nobody
        assert "cannot connect to root@127.0.0.1:1" in line
