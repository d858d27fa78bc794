"""Notice that files changed by polling ``stat()``, for the certificate and the CRL.

Polling, not inotify: files are replaced by rename (`vpnctl revoke`, `vpnctl deploy`),
copied over NFS or by config management; a poll catches each of those for one
syscall per file and tick. A file counts as changed when its inode, size, mtime or
ctime changed (a rename gives a new inode; an in-place rewrite a new mtime).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

Fingerprint = tuple[int, int, int, int] | None
"""(inode, size, mtime_ns, ctime_ns); ``MISSING`` if it cannot be stat'ed; None for no file."""

MISSING: Fingerprint = (-1, -1, -1, -1)


def fingerprint(path: Path | None) -> Fingerprint:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return MISSING
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileWatch:
    """Which of ``paths()`` changed since the last look. ``paths`` is called at every
    look, so a reload that points the watch at other files needs no new watch."""

    def __init__(self, paths: Callable[[], Sequence[Path | None]]) -> None:
        self._paths = paths
        self._seen: tuple[Fingerprint, ...] | None = None

    def current(self) -> tuple[Fingerprint, ...]:
        return tuple(fingerprint(p) for p in self._paths())

    def mark(self) -> None:
        """What is on disk now is what the caller has loaded."""
        self._seen = self.current()

    def forget(self) -> None:
        """The next ``changed()`` reports a change (e.g. to retry a failed load)."""
        self._seen = None

    def changed(self) -> bool:
        """Did anything change since the last ``mark``/``changed``? Marks what it saw."""
        now = self.current()
        if now == self._seen:
            return False
        self._seen = now
        return True


async def poll(
    interval: float,
    step: Callable[[], Awaitable[None]],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> NoReturn:
    """Run ``step`` every ``interval`` seconds until cancelled."""
    while True:
        await sleep(interval)
        await step()
