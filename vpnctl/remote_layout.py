"""What a provisioned host ends up with: file names, modes and the client config.

Pure (no SSH): both ``vpnctl enroll`` and the hosts-file validator use it, so a bad
gateway address is refused before anything is signed or connected.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import yaml

from vpnd.config import ConfigError, parse_config

DEFAULT_REMOTE_DIR = "/etc/vpnd"
DEFAULT_UNIT = "vpnd-client"
CA_FILE = "ca.pem"
CLIENT_CONFIG = "client.yaml"
STAGING_PREFIX = ".vpnctl-stage-"
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
STAGING_DIR_MODE = 0o700  # holds the fresh private key until the final rename
REMOTE_DIR_MODE = 0o755


class LayoutError(ValueError):
    """A remote directory or client setting that cannot work; one line."""


def check_remote_dir(text: str) -> str:
    """An absolute, normalised POSIX path without control characters."""
    if not text.startswith("/"):
        raise LayoutError(f"remote dir {text!r} must be an absolute path such as /etc/vpnd")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise LayoutError(f"remote dir {text!r} contains control characters")
    norm = posixpath.normpath(text)
    if norm == "/" or ".." in text.split("/"):
        raise LayoutError(f"remote dir {text!r} must be a dedicated directory, not / or '..'")
    return norm


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the bundle of peer ``name`` lives under ``remote_dir``."""

    remote_dir: str
    name: str

    @property
    def key_name(self) -> str:
        return f"{self.name}.key"

    @property
    def cert_name(self) -> str:
        return f"{self.name}.pem"

    @property
    def csr_name(self) -> str:
        return f"{self.name}.csr"

    def path(self, file_name: str) -> str:
        return posixpath.join(self.remote_dir, file_name)

    def bundle(self, with_config: bool) -> tuple[str, ...]:
        """Files renamed into place, in order; the config last, so a daemon started from
        it never sees a config whose files are not there yet."""
        names = (self.key_name, self.cert_name, CA_FILE)
        return (*names, CLIENT_CONFIG) if with_config else names


def client_config(layout: Layout, gateway_address: str, server_name: str) -> bytes:
    """A ready ``client.yaml``; validated with vpnd's own loader before it is uploaded."""
    data: dict[str, object] = {
        "mode": "client",
        "server": gateway_address,
        "server_name": server_name,
        "pki": {
            "ca": layout.path(CA_FILE),
            "cert": layout.path(layout.cert_name),
            "key": layout.path(layout.key_name),
        },
    }
    try:
        parse_config(data, source=CLIENT_CONFIG, base_dir=Path("/"), check_files=False)
    except ConfigError as exc:
        # Name the option, not the YAML key, in what the admin reads.
        detail = exc.detail
        if exc.path == "server":
            raise LayoutError(f"gateway address {gateway_address!r}: {detail}") from None
        if exc.path == "server_name":
            raise LayoutError(f"server name {server_name!r}: {detail}") from None
        raise LayoutError(str(exc)) from None
    header = (
        f"# Written by vpnctl enroll for {layout.name}; run: vpnd --config "
        f"{layout.path(CLIENT_CONFIG)}\n"
    )
    return header.encode() + yaml.safe_dump(data, sort_keys=False).encode()


def check_client_settings(gateway_address: str | None, server_name: str | None) -> None:
    """Both or neither: a client config needs the gateway and the name it pins."""
    if (gateway_address is None) != (server_name is None):
        missing = "server name" if server_name is None else "gateway address"
        raise LayoutError(
            f"the {missing} is missing: a client config needs both the gateway address "
            "(HOST:PORT) and its server name"
        )
    if gateway_address is not None and server_name is not None:
        client_config(Layout("/etc/vpnd", "check"), gateway_address, server_name)
