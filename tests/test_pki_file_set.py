"""write_together: a failure at any step leaves exactly the old set, never half of the new."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vpnd.pki.file_set import write_together
from vpnd.pki.identity import PkiError

NAMES = ("alice.key", "alice.pem", "ca.pem")
MODES = {"alice.key": 0o600, "alice.pem": 0o644, "ca.pem": 0o644}


def new_set(directory: Path, tag: str) -> list[tuple[Path, bytes, int]]:
    return [(directory / n, f"{tag} {n}\n".encode(), MODES[n]) for n in NAMES]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of the directory (hidden ones too) with its bytes and mode."""
    return {
        name: ((directory / name).read_bytes(), stat.S_IMODE((directory / name).stat().st_mode))
        for name in sorted(os.listdir(directory))
    }


def expected(tag: str) -> dict[str, tuple[bytes, int]]:
    return {n: (f"{tag} {n}\n".encode(), MODES[n]) for n in NAMES}


def fail_on_call(
    monkeypatch: pytest.MonkeyPatch, name: str, n: int, *, also_after: bool = False
) -> list[int]:
    """Make ``os.<name>`` raise ENOSPC on its ``n``-th call (and later ones if asked)."""
    real: Callable[..., Any] = getattr(os, name)
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n or (also_after and calls[0] > n):
            raise OSError(28, "No space left on device", str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, flaky)
    return calls


def test_writes_the_whole_set_with_modes_and_no_leftovers(tmp_path: Path) -> None:
    write_together(new_set(tmp_path, "old"))
    assert snapshot(tmp_path) == expected("old")
    write_together(new_set(tmp_path, "new"))
    assert snapshot(tmp_path) == expected("new")


# Each step that touches the disk, at each file: staging (fsync of each staged file),
# backing up (link of each old file), committing (replace of each file).
STEPS = [(op, n) for op in ("fsync", "link", "replace") for n in (1, 2, 3)]


@pytest.mark.parametrize(("op", "n"), STEPS)
def test_failure_at_any_step_keeps_the_old_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, n: int
) -> None:
    write_together(new_set(tmp_path, "old"))
    calls = fail_on_call(monkeypatch, op, n)
    with pytest.raises(PkiError, match="No space left on device"):
        write_together(new_set(tmp_path, "new"))
    assert calls[0] >= n  # the failure was really injected
    monkeypatch.undo()
    assert snapshot(tmp_path) == expected("old")


@pytest.mark.parametrize(("op", "n"), [("fsync", 2), ("replace", 1), ("replace", 3)])
def test_failure_without_an_old_set_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, n: int
) -> None:
    fail_on_call(monkeypatch, op, n)
    with pytest.raises(PkiError, match="No space left on device"):
        write_together(new_set(tmp_path, "new"))
    monkeypatch.undo()
    assert snapshot(tmp_path) == {}


def test_partial_old_set_comes_back_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the CA file existed before: the undo removes the new key and certificate.
    (tmp_path / "ca.pem").write_bytes(b"old ca.pem\n")
    (tmp_path / "ca.pem").chmod(0o644)
    fail_on_call(monkeypatch, "replace", 3)
    with pytest.raises(PkiError):
        write_together(new_set(tmp_path, "new"))
    monkeypatch.undo()
    assert snapshot(tmp_path) == {"ca.pem": (b"old ca.pem\n", 0o644)}


def test_failed_undo_is_reported_and_keeps_the_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_together(new_set(tmp_path, "old"))
    fail_on_call(monkeypatch, "replace", 2, also_after=True)
    with pytest.raises(PkiError, match=r"could not put back the old .*alice\.key"):
        write_together(new_set(tmp_path, "new"))
    monkeypatch.undo()
    files = snapshot(tmp_path)
    backups = [name for name in files if name.startswith(".alice.key.") and name.endswith(".old")]
    assert len(backups) == 1
    assert files[backups[0]] == (b"old alice.key\n", 0o600)
    assert files["alice.pem"] == (b"old alice.pem\n", 0o644)


def test_an_interrupt_also_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_together(new_set(tmp_path, "old"))
    real = os.replace
    calls = [0]

    def interrupted(src: Any, dst: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_together(new_set(tmp_path, "new"))
    monkeypatch.undo()
    assert snapshot(tmp_path) == expected("old")


def test_the_same_path_twice_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same path twice"):
        write_together([(tmp_path / "a", b"1", 0o600), (tmp_path / "a", b"2", 0o600)])
    assert snapshot(tmp_path) == {}


def test_without_hard_links_the_backup_is_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_together(new_set(tmp_path, "old"))

    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    fail_on_call(monkeypatch, "replace", 3)
    with pytest.raises(PkiError):
        write_together(new_set(tmp_path, "new"))
    assert snapshot(tmp_path) == expected("old")  # the key's copy came back 0600
    monkeypatch.setattr(os, "replace", os.rename)
    write_together(new_set(tmp_path, "new"))
    assert snapshot(tmp_path) == expected("new")
