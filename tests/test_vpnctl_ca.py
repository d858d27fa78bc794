"""vpnctl ca init, the PKI directory option, and the CA key passphrase."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line, run_vpnctl

from vpnctl import cli
from vpnd.files import atomic as atomicfile
from vpnd.pki.crl import load_crls
from vpnd.pki.keys import load_certificate
from vpnd.pki.pkidir import PkiDir

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


def init(pki: Path, *extra: str) -> tuple[int, str, str]:
    return run_vpnctl(
        "--pki", str(pki), "ca", "init", "--name", "test-ca", "--network", "10.8.0.0/24", *extra
    )


def test_ca_init_creates_the_pki(tmp_path: Path) -> None:
    pki = tmp_path / "new" / "pki"
    code, out, err = init(pki, "--network", "fd00:8::/64", "--days", "400")
    assert code == 0, err
    assert sorted(os.listdir(pki)) == ["ca.key", "ca.pem", "crl.pem", "inventory.sqlite"]
    assert pki.stat().st_mode & 0o777 == 0o700
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED" not in (pki / "ca.key").read_bytes()
    ca = load_certificate(pki / "ca.pem")
    assert "10.8.0.0/24" in out and "fd00:8::/64" in out
    assert ca.not_valid_after_utc.strftime("%Y-%m-%d") in out
    crl = load_crls(pki / "crl.pem")[0]
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert "not encrypted" in err


def test_ca_init_refuses_to_overwrite_any_pki_file(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert init(pki)[0] == 0
    before = {f: (pki / f).read_bytes() for f in ("ca.pem", "ca.key", "crl.pem")}
    code, _, err = init(pki)
    assert code == 1
    assert_one_error_line(err)
    assert "refusing to overwrite" in err
    assert {f: (pki / f).read_bytes() for f in before} == before
    # A lone leftover file counts too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "crl.pem").write_text("old")
    code, _, err = init(other)
    assert code == 1 and "crl.pem" in err
    assert sorted(os.listdir(other)) == ["crl.pem"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--network", "10.8.0.300/24"], "CIDR"),
        (["--network", "10.8.0.1/24"], "host bits"),
        (["--network", "10.8.0.0/24", "--days", "0"], "at least 1"),
        (["--network", "10.8.0.0/24", "--days", "-3"], "at least 1"),
        (["--network", "10.8.0.0/24", "--key-type", "ed25519"], "invalid choice"),
        ([], "--network"),
    ],
)
def test_ca_init_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    pki = tmp_path / "pki"
    code, _, err = run_vpnctl("--pki", str(pki), "ca", "init", "--name", "test-ca", *args)
    assert code == 2
    assert_one_error_line(err)
    assert needle in err
    assert not pki.exists()


def test_ca_init_refuses_a_bad_name(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    code, _, err = run_vpnctl(
        "--pki", str(pki), "ca", "init", "--name", "my/ca", "--network", "10.8.0.0/24"
    )
    assert code == 1
    assert_one_error_line(err)
    assert not pki.exists() or os.listdir(pki) == []


def test_pki_dir_from_option_after_command_env_or_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = tmp_path / "pki"
    code, _, err = run_vpnctl(
        "ca", "init", "--pki", str(pki), "--name", "x", "--network", "10.8.0.0/24"
    )
    assert code == 0, err
    code, out, _ = run_vpnctl("list", "--pki", str(pki))
    assert code == 0 and "NAME" in out
    code, _, err = run_vpnctl("list")
    assert code == 2
    assert_one_error_line(err)
    assert "VPNCTL_PKI" in err
    monkeypatch.setenv(cli.ENV_PKI, str(pki))
    assert run_vpnctl("list")[0] == 0


def test_list_on_a_directory_without_ca(tmp_path: Path) -> None:
    code, _, err = run_vpnctl("--pki", str(tmp_path), "list")
    assert code == 1
    assert_one_error_line(err)
    assert "ca init" in err


def test_init_failure_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = atomicfile.atomic_write

    def failing(path: object, data: bytes, mode: int = 0o644) -> None:
        if str(path).endswith("crl.pem"):
            raise OSError(28, "No space left on device", str(path))
        real(path, data, mode)  # type: ignore[arg-type]

    monkeypatch.setattr("vpnd.pki.pkidir.atomic_write", failing)
    pki = tmp_path / "pki"
    code, _, err = init(pki)
    assert code == 1
    assert_one_error_line(err)
    assert "No space left" in err
    assert os.listdir(pki) == []
    monkeypatch.setattr("vpnd.pki.pkidir.atomic_write", real)
    assert init(pki)[0] == 0


# --- passphrase-protected CA ---------------------------------------------------------------


@pytest.fixture
def locked(tmp_path: Path) -> tuple[Path, Path]:
    pki, pw = tmp_path / "pki", tmp_path / "pw"
    pw.write_text("correct horse\n")
    code, _, err = init(pki, "--passphrase-file", str(pw))
    assert code == 0, err
    (tmp_path / "out").mkdir()
    return pki, pw


def test_encrypted_key_on_disk(locked: tuple[Path, Path]) -> None:
    pki, _ = locked
    data = (pki / "ca.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in data
    assert PkiDir(pki).ca_key_encrypted()


def test_right_passphrase_signs(locked: tuple[Path, Path], tmp_path: Path) -> None:
    pki, pw = locked
    code, out, err = run_vpnctl(
        "--pki",
        str(pki),
        "issue",
        "alice",
        "--out",
        str(tmp_path / "out"),
        "--passphrase-file",
        str(pw),
    )
    assert code == 0, err
    assert "issued alice" in out


def test_passphrase_file_from_environment(
    locked: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki, pw = locked
    monkeypatch.setenv(cli.ENV_PASSPHRASE_FILE, str(pw))
    code, _, err = run_vpnctl("--pki", str(pki), "crl")
    assert code == 0, err


def test_wrong_passphrase_is_refused(locked: tuple[Path, Path], tmp_path: Path) -> None:
    pki, _ = locked
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    code, _, err = run_vpnctl(
        "--pki",
        str(pki),
        "issue",
        "alice",
        "--out",
        str(tmp_path / "out"),
        "--passphrase-file",
        str(wrong),
    )
    assert code == 1
    assert_one_error_line(err)
    assert "wrong passphrase" in err
    assert os.listdir(tmp_path / "out") == []
    assert run_vpnctl("--pki", str(pki), "list", "--json")[1].strip() == "[]"


def test_missing_passphrase_without_terminal(locked: tuple[Path, Path], tmp_path: Path) -> None:
    pki, _ = locked
    crl_before = (pki / "crl.pem").read_bytes()
    code, _, err = run_vpnctl("--pki", str(pki), "crl")
    assert code == 1
    assert_one_error_line(err)
    assert "--passphrase-file" in err and cli.ENV_PASSPHRASE_FILE in err
    assert (pki / "crl.pem").read_bytes() == crl_before


def test_missing_passphrase_prompts_on_a_terminal(
    locked: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pki, _ = locked
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return "correct horse"

    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    code, out, err = run_vpnctl("--pki", str(pki), "crl")
    assert code == 0, err
    assert len(prompts) == 1 and "ca.key" in prompts[0]
    assert "CRL number 2" in out


@pytest.mark.parametrize("content", [b"", b"\nsecret\n"])
def test_empty_passphrase_is_an_error(tmp_path: Path, content: bytes) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(content)
    pki = tmp_path / "pki"
    code, _, err = init(pki, "--passphrase-file", str(pw))
    assert code == 1
    assert_one_error_line(err)
    assert "empty" in err
    assert not pki.exists()


def test_unreadable_passphrase_file(tmp_path: Path) -> None:
    code, _, err = init(tmp_path / "pki", "--passphrase-file", str(tmp_path / "missing"))
    assert code == 1
    assert_one_error_line(err)
    assert "cannot read passphrase file" in err


def test_passphrase_first_line_only(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret\r\nignored second line\n")
    pki = tmp_path / "pki"
    assert init(pki, "--passphrase-file", str(pw))[0] == 0
    only = tmp_path / "only"
    only.write_bytes(b"s3cret")
    assert run_vpnctl("--pki", str(pki), "crl", "--passphrase-file", str(only))[0] == 0


def test_help_and_version_go_to_out(tmp_path: Path) -> None:
    code, out, err = run_vpnctl("--help")
    assert code == 0 and "issue" in out and err == ""
    code, out, _ = run_vpnctl("issue", "--help")
    assert code == 0 and "--gateway" in out and "reserved" in out
    code, out, _ = run_vpnctl("--version")
    assert code == 0 and out.startswith("vpnctl ")
    code, _, err = run_vpnctl()
    assert code == 2
    assert_one_error_line(err)
    code, _, err = run_vpnctl("frobnicate")
    assert code == 2
    assert_one_error_line(err)
