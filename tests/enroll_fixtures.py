"""An inventory with a pending invite and an issuing intermediate, for enrollment tests."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pki_fixtures import NOW, TestCA, make_ca

from vpnd.pki import certificate_pem
from vpnd.pki.authority import csr_for
from vpnd.pki.enrollment import CSR_PLACEHOLDER_NAME
from vpnd.pki.enrollment_token import EnrollmentToken, ca_pin, hash_secret, new_invite
from vpnd.pki.identity import Role
from vpnd.pki.inventory import IdentityRecord, Inventory, InviteRecord
from vpnd.pki.keys import PrivateKey, generate_key


@dataclass(frozen=True)
class Signer:
    cert: x509.Certificate
    key: PrivateKey
    chain_pem: bytes
    fingerprint: str = ""


@dataclass
class EnrollLab:
    root: TestCA
    issuer: TestCA
    signer: Signer
    inventory_path: Path

    def open(self) -> Inventory:
        return Inventory.open(self.inventory_path)

    def invite(
        self,
        name: str = "alice",
        *,
        groups: tuple[str, ...] = ("staff",),
        address: str = "10.77.0.9",
        ttl: dt.timedelta = dt.timedelta(hours=24),
        created: dt.datetime = NOW,
        generation: int = 1,
    ) -> EnrollmentToken:
        invite_id, secret = new_invite()
        with self.open() as inv, inv.transaction():
            inv.put_identity(
                IdentityRecord(
                    name=name,
                    role=Role.PEER,
                    addresses=(ipaddress.ip_address(address),),
                    groups=groups,
                    routes=(),
                    dns_names=(),
                    generation=generation,
                    current_serial=None,
                    state="pending",
                    updated_at=created,
                )
            )
            inv.add_invite(
                InviteRecord(
                    invite_id=invite_id,
                    name=name,
                    secret_hash=hash_secret(invite_id, secret),
                    server="gw.test:4443",
                    created_at=created,
                    expires_at=created + ttl,
                )
            )
        return EnrollmentToken("gw.test:4443", ca_pin(self.root.cert), invite_id, secret)

    def root_pem(self) -> bytes:
        return certificate_pem(self.root.cert)


def make_lab(tmp_path: Path) -> EnrollLab:
    root = make_ca("root-ca", path_length=1)
    issuer = root.intermediate("issuer")
    signer = Signer(issuer.cert, issuer.key, certificate_pem(issuer.cert))
    path = tmp_path / "inventory.sqlite"
    Inventory.create(path).close()
    return EnrollLab(root, issuer, signer, path)


def csr_der(key: PrivateKey | None = None, name: str = CSR_PLACEHOLDER_NAME) -> bytes:
    key = key or generate_key("ecdsa-p256")
    return csr_for(name=name, key=key).public_bytes(serialization.Encoding.DER)
