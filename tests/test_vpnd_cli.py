"""The vpnd command: keygen, --version, and the lazy daemon entry."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line as one_error_line
from cli_helpers import run_vpnd as run
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from vpnd import __version__
from vpnd.pki.authority import verify_csr
from vpnd.pki.keys import load_csr, load_private_key

ROOT = Path(__file__).resolve().parents[1]
assert_one_error_line = functools.partial(one_error_line, program="vpnd")


def keygen(tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    return run(
        "keygen", "--name", "Dave", "--out-key", str(tmp_path / "dave.key"),
        "--out-csr", str(tmp_path / "dave.csr"), *extra,
    )  # fmt: skip


def test_keygen_writes_private_key_and_csr(tmp_path: Path) -> None:
    code, out, err = keygen(tmp_path)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["dave.csr", "dave.key"]
    assert (tmp_path / "dave.key").stat().st_mode & 0o777 == 0o600
    key = load_private_key(tmp_path / "dave.key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = load_csr(tmp_path / "dave.csr")
    name, public = verify_csr(csr)
    assert name == "dave"
    assert public == key.public_key()
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "dave"
    assert len(list(csr.subject)) == 1
    assert not list(csr.extensions)  # the CA decides everything else
    assert "vpnctl sign" in out
    assert "PRIVATE" not in out and "PRIVATE" not in err


def test_keygen_ed25519(tmp_path: Path) -> None:
    assert keygen(tmp_path, "--key-type", "ed25519")[0] == 0
    assert isinstance(load_private_key(tmp_path / "dave.key"), ed25519.Ed25519PrivateKey)


def test_keygen_refuses_to_overwrite_a_key_unless_forced(tmp_path: Path) -> None:
    assert keygen(tmp_path)[0] == 0
    before = (tmp_path / "dave.key").read_bytes()
    code, _, err = keygen(tmp_path)
    assert code == 1
    assert_one_error_line(err)
    assert "--force" in err
    assert (tmp_path / "dave.key").read_bytes() == before
    assert keygen(tmp_path, "--force")[0] == 0
    assert (tmp_path / "dave.key").read_bytes() != before


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["keygen", "--name", "a/b", "--out-key", "k", "--out-csr", "c"], 2, "invalid"),
        (["keygen", "--name", "x" * 200, "--out-key", "k", "--out-csr", "c"], 2, "at most 63"),
        (["keygen", "--name", "a", "--out-key", "k"], 2, "--out-csr"),
        (["keygen", "--name", "a", "--out-key", "k", "--out-csr", "k"], 2, "different"),
        (
            ["keygen", "--name", "a", "--out-key", "k", "--out-csr", "c", "--key-type", "rsa"],
            2,
            "choice",
        ),
        (["keygen", "--name", "a", "--out-key", "no/k", "--out-csr", "c"], 1, "does not exist"),
        (
            ["--config", "x.yaml", "keygen", "--name", "a", "--out-key", "k", "--out-csr", "c"],
            2,
            "keygen",
        ),
        ([], 2, "--config"),
        (["--bogus"], 2, "unrecognized"),
    ],
)
def test_usage_and_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], code: int, needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    got, _, err = run(*argv)
    assert got == code
    assert_one_error_line(err)
    assert needle in err
    assert os.listdir(tmp_path) == []


def test_version_and_help() -> None:
    assert run("--version") == (0, f"vpnd {__version__}\n", "")
    code, out, err = run("--help")
    assert code == 0 and "keygen" in out and err == ""


def test_daemon_missing_config_file(tmp_path: Path) -> None:
    code, _, err = run("--config", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert_one_error_line(err)
    assert "does not exist" in err


def test_daemon_module_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("{}\n")
    monkeypatch.setitem(sys.modules, "vpnd.service.daemon", None)  # makes the import fail
    code, _, err = run("--config", str(config))
    assert code == 1
    assert_one_error_line(err)
    assert "vpnd.service.daemon" in err


def test_daemon_is_called_with_the_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("{}\n")
    calls: list[str] = []
    fake = types.ModuleType("vpnd.service.daemon")

    def fake_run(config_path: str) -> int:
        calls.append(config_path)
        return 3

    fake.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vpnd.service.daemon", fake)
    assert run("--config", str(config))[0] == 3
    assert calls == [str(config)]


def test_module_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "vpnd", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == f"vpnd {__version__}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "vpnctl", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("vpnctl ")
