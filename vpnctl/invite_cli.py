"""``vpnctl invite`` and ``vpnctl invites``: one-time enrollment tokens for new laptops.

Registered by ``vpnctl.cli.build_parser`` through :func:`register`. ``invite`` needs
only the CA certificate and the inventory (never the CA key): it records a pending
identity and prints the token, once. The token is the only copy of the secret; the
inventory keeps its hash, and ``invites`` never prints either.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
from collections.abc import Callable
from typing import TextIO

import segno

from vpnctl import argparsing as types
from vpnctl.argparsing import CliParser, UsageError
from vpnd.config.durations import DurationError, format_duration, parse_duration
from vpnd.pki.enrollment_token import TokenError, parse_server
from vpnd.pki.inventory import IdentityRecord, Inventory, InviteRecord, serial_hex
from vpnd.pki.invites import create_invite, invite_status
from vpnd.pki.pkidir import PkiDir

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]
CommandFactory = Callable[[str, Handler, str], CliParser]
PkiFactory = Callable[[argparse.Namespace], PkiDir]
ENV_SERVER = "VPNCTL_INVITE_SERVER"
DEFAULT_TTL = "24h"


def _ttl(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _server(text: str) -> str:
    try:
        parse_server(text.strip())
    except TokenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def register(command: CommandFactory, pki: PkiFactory) -> None:
    p = command("invite", lambda a, o, e: _cmd_invite(a, o, e, pki), "invite a new peer")
    p.description = (
        "Record a pending peer NAME and print a one-time token for 'vpnd enroll TOKEN' on "
        "the laptop. The token holds the gateway address, the CA's pin and a secret "
        "stored only hashed; it works once, until --ttl runs out. No CA key needed."
    )
    p.add_argument("name", type=types.peer_name, metavar="NAME")
    types.add_peer_options(p, ip_help="overlay address (default: the next free one)")
    p.add_argument(
        "--ttl",
        type=_ttl,
        default=_ttl(DEFAULT_TTL),
        metavar="DURATION",
        help=f"how long the token can be used, e.g. 30m, 24h, 7d (default {DEFAULT_TTL})",
    )
    p.add_argument(
        "--server",
        type=_server,
        metavar="HOST:PORT",
        help=f"the gateway address laptops connect to (default: ${ENV_SERVER})",
    )
    p.add_argument("--qr", action="store_true", help="also print the token as a QR code")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("invites", lambda a, o, e: _cmd_invites(a, o, e, pki), "list invites")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--state", choices=("pending", "used", "expired"), help="only invites in this state"
    )


def _server_of(args: argparse.Namespace) -> str:
    if args.server:
        return str(args.server)
    env = os.environ.get(ENV_SERVER, "").strip()
    if not env:
        raise UsageError(f"give --server HOST:PORT (the gateway laptops reach) or set {ENV_SERVER}")
    try:
        parse_server(env)
    except TokenError as exc:
        raise UsageError(f"${ENV_SERVER}: {exc}") from None
    return env


def _cmd_invite(args: argparse.Namespace, out: TextIO, err: TextIO, pki: PkiFactory) -> int:
    server = _server_of(args)
    if len(args.addresses) > 2:
        raise UsageError("--ip takes at most one IPv4 and one IPv6 address")
    d = pki(args)
    ca_cert = d.ca_certificate()
    with Inventory.open(d.inventory_path) as inv:
        got = create_invite(
            inv,
            ca_cert,
            name=args.name,
            server=server,
            groups=args.groups,
            addresses=args.addresses,
            routes=args.routes,
            ttl_s=args.ttl,
            now=d.now(),
        )
    token = got.token.encode()
    ident, invite = got.identity, got.invite
    if args.json:
        json.dump(
            {
                "name": ident.name,
                "invite_id": invite.invite_id,
                "addresses": [str(a) for a in ident.addresses],
                "groups": list(ident.groups),
                "expires_at": invite.expires_at.isoformat(),
                "server": invite.server,
                "token": token,
            },
            out,
        )
        out.write("\n")
        return 0
    addrs = ", ".join(str(a) for a in ident.addresses)
    err.write(
        f"invited {ident.name} ({addrs}; groups {', '.join(ident.groups) or '-'}), invite "
        f"{invite.invite_id}, valid {format_duration(args.ttl)} until "
        f"{invite.expires_at:%Y-%m-%d %H:%M}Z, single use\n"
        "on the laptop, run: sudo vpnd enroll TOKEN --dir /etc/vpnd\n"
    )
    out.write(token + "\n")
    if args.qr:
        out.write(qr_text(token))
    return 0


def qr_text(token: str) -> str:
    """The token as a terminal QR code (two rows per line, with its quiet zone)."""
    buf = io.StringIO()
    segno.make(token, error="l", micro=False).terminal(out=buf, compact=True, border=2)
    return buf.getvalue()


def _row(inv: InviteRecord, ident: IdentityRecord | None, now: dt.datetime) -> dict[str, object]:
    return {
        "invite_id": inv.invite_id,
        "name": inv.name,
        "addresses": [str(a) for a in ident.addresses] if ident else [],
        "groups": list(ident.groups) if ident else [],
        "state": invite_status(inv, now),
        "server": inv.server,
        "created_at": inv.created_at.isoformat(),
        "expires_at": inv.expires_at.isoformat(),
        "used_at": inv.used_at.isoformat() if inv.used_at else None,
        "used_serial": serial_hex(inv.used_serial) if inv.used_serial is not None else None,
    }


def _cmd_invites(args: argparse.Namespace, out: TextIO, err: TextIO, pki: PkiFactory) -> int:
    d = pki(args)
    now = d.now()
    with Inventory.open(d.inventory_path) as inv:
        idents = {i.name: i for i in inv.identities()}
        rows = [_row(i, idents.get(i.name), now) for i in inv.invites()]
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    if not rows:
        err.write("no invites\n")
        return 0
    head = f"{'INVITE':<17} {'NAME':<20} {'ADDRESS':<15} {'STATE':<8} {'EXPIRES/USED':<17}"
    out.write(f"{head} SERIAL\n")
    for r in rows:
        when = str(r["used_at"] or r["expires_at"])[:16].replace("T", " ")
        serial = r["used_serial"] or "-"
        listed = r["addresses"]
        addrs = ",".join(listed) if isinstance(listed, list) and listed else "-"
        out.write(
            f"{r['invite_id']:<17} {r['name']:<20} {addrs:<15} {r['state']:<8} {when:<17} "
            f"{serial}\n"
        )
    return 0
