"""``vpnctl ca issuer`` and ``vpnctl ca upgrade``: the online issuing CA for the gateways.

Registered by ``vpnctl.cli.build_parser``; the engines are in ``vpnd.pki.issuer_admin``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from vpnctl import argparsing as types
from vpnctl import render
from vpnctl.argparsing import CliParser
from vpnd.pki.issuer import DEFAULT_ISSUER_DAYS
from vpnd.pki.issuer_admin import make_issuer, upgrade_ca
from vpnd.pki.keys import KEY_TYPES_CA
from vpnd.pki.pkidir import PkiDir

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]
CommandFactory = Callable[..., CliParser]
PkiFactory = Callable[[argparse.Namespace], PkiDir]


def register(
    command: CommandFactory,
    ca_sub: object,
    signing_pki: PkiFactory,
    add_passphrase: Callable[[argparse.ArgumentParser], None],
) -> None:
    def cmd_issuer(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        made = make_issuer(
            signing_pki(args),
            name=args.name,
            days=args.days,
            networks=args.networks or (),
            key_type=args.key_type,
            out_dir=Path(args.out) if args.out else None,
            replace=args.replace,
        )
        out.write(f"created issuing CA {made.name}\n")
        out.write(
            render.fields(
                [
                    ("fingerprint", f"sha256 {made.fingerprint}"),
                    ("serial", f"{made.serial:x}"),
                    ("networks", render.joined(made.networks)),
                    ("expires", render.moment(made.not_after)),
                    ("files", f"{made.cert_path} {made.key_path} (0600)"),
                ]
            )
        )
        if made.replaced:
            err.write(f"vpnctl: note: replaced the issuer sha256 {made.replaced[:16]}...\n")
        out.write(
            "next: copy both files to every gateway (key mode 0600) and set pki.issuer "
            "{cert, key}, pki.inventory and renewal.enabled in its config\n"
        )
        return 0

    def cmd_upgrade(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        done = upgrade_ca(signing_pki(args))
        out.write(
            "re-signed the root CA with pathlen 1 (same key and name: every certificate it "
            "issued stays valid)\n"
        )
        out.write(
            render.fields(
                [
                    ("fingerprint", f"sha256 {done.fingerprint}"),
                    ("previous", f"sha256 {done.previous_fingerprint} (kept in {done.backup})"),
                ]
            )
        )
        out.write(
            "next: install the new ca.pem on every gateway and client before they meet "
            "issuer-signed peers; enrollment pins change to the new fingerprint\n"
        )
        return 0

    p = command(
        "issuer",
        cmd_issuer,
        "sign an online issuing CA for the gateways (pathlen 0, name-constrained to the "
        "overlay, short-lived); it signs renewals and enrollments",
        ca_sub,
    )
    p.add_argument(
        "--name", default="issuer", type=types.peer_name, help="its name (default issuer)"
    )
    p.add_argument(
        "--days",
        type=types.positive_int,
        default=DEFAULT_ISSUER_DAYS,
        help=f"its lifetime (default {DEFAULT_ISSUER_DAYS}; never beyond the root)",
    )
    p.add_argument(
        "--network",
        dest="networks",
        metavar="CIDR",
        type=types.network,
        action="append",
        help="limit it to this part of the overlay (repeatable; default: all the root's)",
    )
    p.add_argument("--key-type", choices=KEY_TYPES_CA, default=KEY_TYPES_CA[0])
    p.add_argument("--out", metavar="DIR", help="where to write issuer.pem/.key (default: the PKI)")
    p.add_argument("--replace", action="store_true", help="replace an existing issuer.pem")
    add_passphrase(p)

    p = command(
        "upgrade",
        cmd_upgrade,
        "re-sign a root CA made before issuers (pathlen 0) with pathlen 1",
        ca_sub,
    )
    add_passphrase(p)
