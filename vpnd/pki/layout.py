"""Where a PKI directory keeps its files (the directory itself is created 0700).

ca.pem            CA certificate (0644)
ca.key            CA private key (0600, encrypted when a passphrase is given)
inventory.sqlite  issued certificates, address leases, revocations, CRL counter
crl.pem           the current signed CRL (0644)
issuer.pem        the online issuing CA (``vpnctl ca issuer``), for the gateways (0644)
issuer.key        its key (0600); copy it to the gateways, it need not stay here
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
INVENTORY = "inventory.sqlite"
CRL = "crl.pem"
ISSUER_CERT = "issuer.pem"
ISSUER_KEY = "issuer.key"
ISSUER_CRL = "issuer-crl.pem"
PKI_FILES = (CA_CERT, CA_KEY, INVENTORY, CRL)


@dataclass(frozen=True, slots=True)
class PkiLayout:
    """The paths of one PKI directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def inventory(self) -> Path:
        return self.root / INVENTORY

    @property
    def crl(self) -> Path:
        return self.root / CRL

    def files(self) -> tuple[Path, ...]:
        return tuple(self.root / name for name in PKI_FILES)

    def present(self) -> list[str]:
        """Names of the PKI files that already exist (``ca init`` refuses any)."""
        return [name for name in PKI_FILES if (self.root / name).exists()]
