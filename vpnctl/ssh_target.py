"""``[USER@]HOST[:PORT]`` as admins write it for ``--ssh``, ``--jump`` and hosts files."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_SSH_PORT = 22
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,31}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*"
)


class TargetError(ValueError):
    """A malformed SSH target; the message is one line and names the text."""


@dataclass(frozen=True, slots=True)
class SshTarget:
    host: str
    """An IP literal (IPv6 without brackets) or a host name."""
    port: int = DEFAULT_SSH_PORT
    user: str | None = None
    """None: the local user name (what ``ssh`` does)."""

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        prefix = f"{self.user}@" if self.user else ""
        return prefix + self.host_port


def parse_ssh_target(text: str) -> SshTarget:
    """Parse ``host``, ``user@host``, ``user@host:2222``, ``[2001:db8::1]:22``."""
    raw = text.strip()
    shown = repr(text)
    if not raw or any(c.isspace() for c in raw):
        raise TargetError(f"{shown} is not an SSH target such as root@host.example:22")
    user: str | None = None
    if "@" in raw:
        user, raw = raw.rsplit("@", 1)
        if not _USER.fullmatch(user):
            raise TargetError(f"{shown}: {user!r} is not a valid user name")
    port = DEFAULT_SSH_PORT
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise TargetError(f"{shown}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    else:
        host, port_text = raw, None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise TargetError(f"{shown}: port {port_text!r} is not a number 1..65535")
        port = int(port_text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise TargetError(f"{shown}: {host!r} is not a host name or IP address") from None
        host = host.lower()
    return SshTarget(host=host, port=port, user=user)
