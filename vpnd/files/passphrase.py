"""The one reader of passphrase files (a private key's or the CA key's).

The passphrase is the file's first line without its line ending, so ``echo pw > f``
and editors that add a newline both work. An empty first line is refused: it is
always a mistake (a truncated copy), never a passphrase anyone chose.
"""

from __future__ import annotations

import os
from pathlib import Path


class PassphraseError(Exception):
    """A passphrase file cannot be used; the message is one line naming the file."""


def read_passphrase(path: str | os.PathLike[str]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PassphraseError(
            f"cannot read passphrase file {path}: {exc.strerror or exc}"
        ) from None
    first = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not first:
        raise PassphraseError(f"passphrase file {path} is empty (its first line is the passphrase)")
    return first
