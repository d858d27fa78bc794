"""The source trees vpnd is benchmarked from: the working tree, and a baseline commit.

A baseline is exported with ``git archive`` into the run's temporary directory (removed
with it: no git worktree entry can be left behind). Both trees are launched the same way,
through their stable command-line entries, ``python -P -m vpnd`` / ``-m vpnctl`` with
``PYTHONPATH`` set to the tree: ``-P`` keeps the working directory off ``sys.path``, and
``PYTHONPATH`` comes before the venv's editable install of the working tree. Which
``vpnd`` a tree really imports is checked before it is measured.
"""

from __future__ import annotations

import compileall
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import PYTHON, ROOT, BenchError

PACKAGES = ("vpnd", "vpnctl")
GIT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Tree:
    """One checkout of the project: where it is, which commit, how it is named in tables."""

    root: Path
    commit: str
    """Abbreviated commit id; ``+`` marks a working tree with uncommitted changes."""
    subject: str
    key: str
    label: str

    def env(self) -> dict[str, str]:
        """The environment that makes ``python -P`` import this tree's packages."""
        return {**os.environ, "PYTHONPATH": str(self.root)}

    def command(self, package: str, *args: str) -> list[str]:
        return [PYTHON, "-P", "-m", package, *args]

    def imported_from(self) -> Path:
        """The directory of the ``vpnd`` package this tree's launches import; must be ours."""
        probe = "import vpnd, pathlib; print(pathlib.Path(vpnd.__file__).resolve().parent)"
        res = subprocess.run([PYTHON, "-P", "-c", probe], env=self.env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        if res.returncode != 0:
            raise BenchError(f"{self.label}: cannot import vpnd: {res.stderr.strip()[-200:]}")
        where = Path(res.stdout.strip())
        if where != (self.root / "vpnd").resolve():
            raise BenchError(f"{self.label}: launches would import vpnd from {where}")
        return where

    def precompile(self) -> None:
        """Byte-compile both packages, so neither tree pays for it in start->ping."""
        for package in PACKAGES:
            if not compileall.compile_dir(self.root / package, quiet=1):
                raise BenchError(f"{self.label}: {package} does not compile")


def _git(*args: str) -> str:
    res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                         timeout=GIT_TIMEOUT, check=False)  # fmt: skip
    if res.returncode != 0:
        raise BenchError(f"git {args[0]}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res.stdout.strip()


def current_tree() -> Tree:
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    tag = commit + ("+" if dirty else "")
    subject = _git("log", "-1", "--format=%s", "HEAD")
    return Tree(ROOT, tag, subject, "vpnd", "vpnd")


def export_tree(rev: str, dest: Path) -> Tree:
    """``rev``'s files (tracked files only, as committed) under ``dest``."""
    try:
        full = _git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")
    except BenchError:
        raise BenchError(f"--baseline {rev}: not a commit of this repository") from None
    commit = _git("rev-parse", "--short", full)
    subject = _git("log", "-1", "--format=%s", full)
    dest.mkdir(parents=True)
    archive = dest.with_name(dest.name + ".tar")
    try:
        with archive.open("wb") as out:
            res = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", full],
                                 stdout=out, stderr=subprocess.PIPE, timeout=GIT_TIMEOUT,
                                 check=False)  # fmt: skip
        if res.returncode != 0:
            raise BenchError(f"git archive {rev}: {res.stderr.decode(errors='replace').strip()}")
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    finally:
        archive.unlink(missing_ok=True)
    return Tree(dest, commit, subject, "vpnd-base", f"vpnd @ {commit}")


__all__ = ["Tree", "current_tree", "export_tree"]
