"""Write a set of files (a key with its certificate, a key with its CSR) all or nothing.

``write_together`` runs in three steps:

1. stage: every new file is written completely under a hidden temp name next to its
   target, with its final mode from the start, and fsynced;
2. back up: every target that exists gets a hard link under a hidden backup name (a
   copy with the same mode where the file system has no hard links), so the old file
   survives its replacement without ever being absent;
3. commit: the staged files are renamed over their targets one by one.

A failure in step 1 or 2 has touched no target. A failure in step 3 undoes the
renames already done: each replaced target gets its backup back (or is removed when
it did not exist before). Either way every temp and backup file is removed, so the
directory holds exactly the old set or, on success, exactly the new one.

A power loss inside step 3 cannot run the undo; the backups are then left next to the
targets under ``.NAME.*.old``, fsynced, so the old set can still be put back by hand.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vpnd.pki.identity import PkiError

STAGED_SUFFIX = ".staged"
BACKUP_SUFFIX = ".old"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


@dataclass(slots=True)
class _Entry:
    target: Path
    staged: Path
    backup: Path | None = None
    """The old target kept aside (a hard link or a copy); None when there was none."""
    committed: bool = False


def write_together(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Replace every ``(path, data, mode)`` of ``files``, or none of them.

    Raises ``PkiError`` naming the file that could not be written; the old files are
    then all in place again and no temp file is left behind.
    """
    targets = [Path(path) for path, _, _ in files]
    if len(set(targets)) != len(targets):
        raise ValueError("write_together got the same path twice")
    entries: list[_Entry] = []
    try:
        for path, data, mode in files:
            entries.append(_Entry(Path(path), stage_file(Path(path), data, mode)))
        for entry in entries:
            entry.backup = _back_up(entry.target)
        _fsync_dirs(_parents(entries))
        for entry in entries:
            os.replace(entry.staged, entry.target)
            entry.committed = True
    except OSError as exc:
        undo_failed = _undo(entries)
        _remove_leftovers(entries, done=False)
        what = exc.filename or "output files"
        detail = f"cannot write {what}: {exc.strerror or exc}"
        if undo_failed:
            detail += f"; could not put back the old {', '.join(undo_failed)}"
        raise PkiError(detail) from None
    except BaseException:
        _undo(entries)
        _remove_leftovers(entries, done=False)
        raise
    _fsync_dirs(_parents(entries))
    _remove_leftovers(entries, done=True)


def stage_file(target: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh hidden temp file next to ``target``; return its path.

    The temp file has ``mode`` before the first byte is written, so a private key is
    never readable by others, and it is fsynced so the rename publishes whole data.
    """
    directory = target.parent if str(target.parent) else Path(".")
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=STAGED_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def _back_up(target: Path) -> Path | None:
    """Keep the old ``target`` under a hidden name; None when there is none."""
    if not target.exists():
        return None
    backup = target.with_name(f".{target.name}.{secrets.token_hex(6)}{BACKUP_SUFFIX}")
    try:
        os.link(target, backup)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # A file system without hard links: a copy with the same mode does as well.
        copy = stage_file(target, target.read_bytes(), stat.S_IMODE(target.stat().st_mode))
        os.rename(copy, backup)
    return backup


def _undo(entries: Iterable[_Entry]) -> list[str]:
    """Put back the old file of every committed entry; return the names that failed."""
    failed: list[str] = []
    for entry in entries:
        if not entry.committed:
            continue
        try:
            if entry.backup is None:
                entry.target.unlink()
            else:
                os.replace(entry.backup, entry.target)
                entry.backup = None
            entry.committed = False
        except OSError:
            failed.append(str(entry.target))
    return failed


def _remove_leftovers(entries: Iterable[_Entry], *, done: bool) -> None:
    """Remove temp files; keep the backup of a target whose undo failed (for the admin)."""
    for entry in entries:
        leftovers = [] if entry.committed else [entry.staged]
        if entry.backup is not None and (done or not entry.committed):
            leftovers.append(entry.backup)
        for path in leftovers:
            with contextlib.suppress(OSError):
                path.unlink()


def _parents(entries: Iterable[_Entry]) -> set[Path]:
    return {e.target.parent if str(e.target.parent) else Path(".") for e in entries}


def _fsync_dirs(dirs: Iterable[Path]) -> None:
    # Renames and links are durable only once the directory entries are on disk.
    for directory in dirs:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
