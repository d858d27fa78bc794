"""Building the gateway's enrollment handler from its config (``enrollment.enabled``).

The issuer is loaded and checked once at start-up (a bad one stops the gateway with
one line); each redeem opens the inventory afresh in the executor thread (SQLite
connections are per thread) and the CA bundle is re-read for each connection, so a
CA rotation reaches new enrollments without a restart.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from cryptography import x509

from vpnd.config import GatewayConfig
from vpnd.gateway.enrollment import EnrollmentHandler, EnrollmentSettings
from vpnd.pki.enrollment import Enrolled, redeem_invite
from vpnd.pki.identity import PkiError
from vpnd.pki.inventory import Inventory
from vpnd.pki.issue_terms import DEFAULT_PEER_DAYS
from vpnd.pki.issuer import Issuer, load_issuer
from vpnd.proto.enrollment import EnrollRequest
from vpnd.service.startup import StartupError


def enrolled_lifetime(cfg: GatewayConfig) -> float:
    """Seconds an enrolled certificate lives: the renewal lifetime when the gateway
    renews (the client then keeps it fresh), else the usual peer lifetime."""
    if cfg.renewal.enabled:
        return cfg.renewal.lifetime
    return DEFAULT_PEER_DAYS * 86400.0


def server_name_of(own: x509.Certificate) -> str:
    try:
        san = own.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names: list[str] = []
    else:
        names = san.get_values_for_type(x509.DNSName)
    if not names:
        raise StartupError(
            "enrollment needs a DNS name on the gateway certificate (clients pin it)"
        )
    return names[0]


def build_enrollment(
    cfg: GatewayConfig,
    own: x509.Certificate,
    roots: Sequence[x509.Certificate],
    *,
    wall: Callable[[], float],
    mono: Callable[[], float],
    issuer: Issuer | None = None,
) -> EnrollmentHandler:
    """``issuer``: the one the gateway's lifecycle already loaded (else loaded here)."""
    pki = cfg.pki
    if pki.issuer is None or pki.inventory is None:  # the config loader refuses this
        raise StartupError("enrollment.enabled needs pki.issuer and pki.inventory")
    if issuer is None:
        try:
            issuer = load_issuer(
                pki.issuer.cert,
                pki.issuer.key,
                passphrase_file=pki.issuer.key_passphrase_file,
                roots=roots,
                now=dt.datetime.fromtimestamp(wall(), dt.UTC),
            )
        except PkiError as err:
            raise StartupError(str(err)) from None
    signer = issuer
    inventory_path = pki.inventory
    lifetime = enrolled_lifetime(cfg)
    ca_path = pki.ca

    def redeem(req: EnrollRequest, now: dt.datetime) -> Enrolled:
        with Inventory.open(inventory_path) as inv:
            return redeem_invite(
                inv,
                signer,
                invite_id=req.invite_id,
                secret=req.secret,
                csr_der=req.csr_der,
                lifetime_s=lifetime,
                now=now,
            )

    settings = EnrollmentSettings(
        rate=cfg.enrollment.rate,
        burst=cfg.enrollment.burst,
        timeout=cfg.handshake_timeout,
        server_name=server_name_of(own),
    )
    return EnrollmentHandler(
        settings, ca_pem=ca_path.read_bytes, redeem=redeem, mono=mono, wall=wall
    )
