"""Opening the files a config names, without ever blocking or reading without bound.

Files are opened ``O_NONBLOCK`` and checked with ``fstat`` on the same descriptor, so a
FIFO or device named in a config is refused instead of hanging the daemon.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_YAML_BYTES = 1 << 20
"""A config or policy file larger than this is surely a mistake (or /dev/zero's cousin)."""


class FileProblem(Exception):
    """Why a file cannot be used; ``str()`` is a one-line reason that names the file."""


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise FileProblem(f"cannot open {path}: {err.strerror or err}") from None
    except ValueError as err:  # NUL bytes, unencodable names
        raise FileProblem(f"cannot open {str(path)!r}: {err}") from None
    try:
        st = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise FileProblem(f"cannot stat {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileProblem(f"{path} is not a regular file")
    return fd, st


def check_readable(path: Path) -> os.stat_result:
    """Return the ``stat`` of ``path`` if it is a non-empty regular file we can open."""
    fd, st = _open_regular(path)
    os.close(fd)
    if st.st_size == 0:
        raise FileProblem(f"{path} is empty")
    return st


def read_limited(path: Path, limit: int = MAX_YAML_BYTES) -> bytes:
    """The whole content of the regular file ``path``, refused if larger than ``limit``."""
    fd, st = _open_regular(path)
    try:
        if st.st_size > limit:
            raise FileProblem(f"{path} is {st.st_size} bytes, more than the {limit} allowed")
        chunks: list[bytes] = []
        total = 0
        while True:  # bounded: stops at EOF or at limit + 1 bytes
            try:
                chunk = os.read(fd, 65536)
            except OSError as err:
                raise FileProblem(f"cannot read {path}: {err.strerror or err}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FileProblem(f"{path} is more than the {limit} bytes allowed")
        return b"".join(chunks)
    finally:
        os.close(fd)
