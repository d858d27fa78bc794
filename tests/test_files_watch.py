"""vpnd.files.watch (stat fingerprints, FileWatch, poll) and vpnd.files.passphrase."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vpnd.files.passphrase import PassphraseError, read_passphrase
from vpnd.files.watch import MISSING, FileWatch, fingerprint, poll


def test_fingerprint_of_a_file_a_missing_one_and_none(tmp_path: Path) -> None:
    f = tmp_path / "crl.pem"
    f.write_bytes(b"one")
    st = os.stat(f)
    assert fingerprint(f) == (st.st_ino, 3, st.st_mtime_ns, st.st_ctime_ns)
    assert fingerprint(tmp_path / "nope") == MISSING
    assert fingerprint(None) is None


def test_filewatch_sees_rewrites_renames_and_removals(tmp_path: Path) -> None:
    a, b = tmp_path / "cert.pem", tmp_path / "key.pem"
    a.write_bytes(b"1")
    b.write_bytes(b"1")
    watch = FileWatch(lambda: (a, b))
    watch.mark()
    assert not watch.changed()
    a.write_bytes(b"22")  # in place: other size
    assert watch.changed() and not watch.changed()  # reported once
    new = tmp_path / "key.new"
    new.write_bytes(b"1")
    new.replace(b)  # renamed over: other inode
    assert watch.changed()
    a.unlink()
    assert watch.changed() and watch.current()[0] == MISSING
    watch.forget()
    assert watch.changed()  # forced, e.g. to retry a load that failed


def test_filewatch_follows_the_paths_it_is_given(tmp_path: Path) -> None:
    paths = [tmp_path / "a"]
    paths[0].write_bytes(b"x")
    watch = FileWatch(lambda: tuple(paths))
    watch.mark()
    other = tmp_path / "b"
    other.write_bytes(b"xy")
    paths[0] = other  # a reload pointed the config elsewhere
    assert watch.changed()


class _Stop(Exception):
    pass


async def test_poll_runs_the_step_after_each_interval() -> None:
    slept: list[float] = []
    steps: list[int] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            raise _Stop

    async def step() -> None:
        steps.append(len(slept))

    with pytest.raises(_Stop):
        await poll(0.2, step, sleep=sleep)
    assert slept == [0.2] * 4 and steps == [1, 2, 3]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hunter22\n", b"hunter22"),
        (b"hunter22\r\nsecond line\n", b"hunter22"),
        (b"hunter22", b"hunter22"),
        (b" spaced pass \n", b" spaced pass "),
    ],
)
def test_passphrase_is_the_first_line(tmp_path: Path, content: bytes, expected: bytes) -> None:
    f = tmp_path / "pass"
    f.write_bytes(content)
    assert read_passphrase(f) == expected
    assert read_passphrase(str(f)) == expected


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\nhunter22\n"])
def test_an_empty_first_line_is_refused(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "pass"
    f.write_bytes(content)
    with pytest.raises(PassphraseError) as info:
        read_passphrase(f)
    assert str(info.value) == f"passphrase file {f} is empty (its first line is the passphrase)"


def test_an_unreadable_passphrase_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(PassphraseError) as info:
        read_passphrase(tmp_path / "nope")
    assert (
        str(info.value)
        == f"cannot read passphrase file {tmp_path / 'nope'}: No such file or directory"
    )
