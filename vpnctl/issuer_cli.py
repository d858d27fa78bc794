"""``vpnctl ca issuer`` and ``vpnctl ca upgrade``: the online issuing CA for the gateways.

Registered by ``vpnctl.cli.build_parser``; the engines are in ``vpnd.pki.issuer_admin``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from vpnctl import argparsing as types
from vpnctl import render
from vpnctl.argparsing import CliParser
from vpnd.pki.ca_forecast import ca_expiry
from vpnd.pki.identity import Role
from vpnd.pki.issuer import DEFAULT_ISSUER_DAYS
from vpnd.pki.issuer_admin import make_issuer, upgrade_ca
from vpnd.pki.keys import KEY_TYPES_CA, fingerprint, load_certificates
from vpnd.pki.layout import ISSUER_CERT
from vpnd.pki.pkidir import PkiDir

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]
CommandFactory = Callable[..., CliParser]
PkiFactory = Callable[[argparse.Namespace], PkiDir]


def ca_status(pki: PkiDir) -> dict[str, Any]:
    """What `vpnctl ca status` shows, as JSON-ready data (no CA key needed)."""
    now = pki.now()
    cas = [("root", pki.ca_certificate())]
    issuer_path = pki.path / ISSUER_CERT
    if issuer_path.exists():
        cas.append(("issuer", load_certificates(issuer_path)[0]))
    root_fp = fingerprint(cas[0][1])
    counts: dict[str, list[int]] = {fingerprint(cert): [0, 0] for _, cert in cas}
    other = 0
    for listed in pki.list_certificates():
        if listed.status != "valid":
            continue
        fp = listed.record.issuer_fp or root_fp  # records from before issuers: the root
        slot = counts.get(fp)
        if slot is None:
            other += 1
            continue
        slot[0 if listed.record.role is Role.PEER else 1] += 1
    rows = []
    forecast = []
    for kind, cert in cas:
        exp = ca_expiry(kind, cert, now)
        peers, gateways = counts[exp.fingerprint]
        rows.append(
            {
                "kind": kind,
                "name": exp.name,
                "fingerprint": exp.fingerprint,
                "not_after": exp.not_after.isoformat(),
                "days_left": exp.days_left,
                "warning_stage": exp.stage,
                "peers": peers,
                "gateways": gateways,
            }
        )
        if exp.stage is not None or exp.days_left < 0:
            forecast.append(exp.line())
    return {"cas": rows, "forecast": forecast, "other": other}


def register(
    command: CommandFactory,
    ca_sub: object,
    signing_pki: PkiFactory,
    add_passphrase: Callable[[argparse.ArgumentParser], None],
    open_pki: PkiFactory,
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

    def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        status = ca_status(open_pki(args))
        if args.json:
            out.write(json.dumps(status, indent=2) + "\n")
            return 0
        rows = [
            [c["kind"], c["name"], c["fingerprint"][:16], c["not_after"][:10],
             str(c["days_left"]), str(c["peers"]), str(c["gateways"])]
            for c in status["cas"]
        ]  # fmt: skip
        header = ("CA", "NAME", "SHA256", "NOT-AFTER", "DAYS", "PEERS", "GATEWAYS")
        out.write(render.table(header, rows))
        for line in status["forecast"]:
            out.write(f"forecast: {line}\n")
        if status["other"]:
            out.write(f"valid certificates from a CA not in this PKI: {status['other']}\n")
        return 0

    p = command(
        "status",
        cmd_status,
        "the root and the issuer: expiry and forecast (warned at 90, 30 and 7 days), and how "
        "many valid peer and gateway certificates each one signed",
        ca_sub,
    )
    p.add_argument("--json", action="store_true")

    p = command(
        "upgrade",
        cmd_upgrade,
        "re-sign a root CA made before issuers (pathlen 0) with pathlen 1",
        ca_sub,
    )
    add_passphrase(p)
