"""``vpnctl update``: change a name's groups, addresses or routes in the inventory.

The change needs no CA key: the gateway signs the next renewal from the inventory,
and applies the new groups as a ceiling at once. ``--now`` asks the running gateway
(control command ``renew-hint``) to make the peer renew within seconds.

Registered by ``vpnctl.cli.build_parser``; the engine is ``vpnd.pki.identity_update``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TextIO

from vpnctl import argparsing as types
from vpnctl import render
from vpnctl.argparsing import CliParser, UsageError
from vpnctl.control_commands import add_socket_option
from vpnd.control.client import ControlClient, ControlClientError, default_socket
from vpnd.control.protocol import ControlError, ProtocolError
from vpnd.control.results import RenewHintResult
from vpnd.pki.identity_update import IdentityChange, update_identity
from vpnd.pki.inventory import IdentityRecord
from vpnd.pki.pkidir import PkiDir

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]
CommandFactory = Callable[..., CliParser]
PkiFactory = Callable[[argparse.Namespace], PkiDir]

HINT_REASON = "the admin changed this peer's terms"


def register(command: CommandFactory, open_pki: PkiFactory) -> None:
    """Add ``update`` to vpnctl's subcommand table."""

    def cmd_update(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        return run_update(args, out, err, open_pki(args))

    p = command(
        "update",
        cmd_update,
        "change a peer's groups, addresses or routes in the inventory: the next renewal "
        "carries them, and the gateway applies removed groups at once; --now asks the "
        "gateway to make the peer renew within seconds",
    )
    p.add_argument("name", metavar="NAME", type=types.peer_name)
    p.add_argument(
        "--groups",
        metavar="G1,G2",
        type=types.groups,
        action="extend",
        default=None,
        help="the peer's firewall groups from now on, comma-separated (replaces them)",
    )
    p.add_argument("--no-groups", action="store_true", help="remove every group")
    p.add_argument(
        "--ip",
        dest="addresses",
        metavar="ADDR",
        type=types.address,
        action="extend",
        nargs="+",
        default=None,
        help="the peer's overlay address(es) from its next certificate on",
    )
    p.add_argument(
        "--routes",
        metavar="CIDR",
        type=types.network,
        action="extend",
        nargs="+",
        default=None,
        help="subnets the peer may route from its next certificate on (replaces them)",
    )
    p.add_argument("--no-routes", action="store_true", help="remove every routed subnet")
    p.add_argument(
        "--now",
        action="store_true",
        help="ask the running gateway (--socket) to make the peer renew now",
    )
    add_socket_option(p, top=False)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _wanted(args: argparse.Namespace) -> tuple[list[str] | None, list[Any] | None]:
    if args.no_groups and args.groups is not None:
        raise UsageError("give --groups or --no-groups, not both")
    if args.no_routes and args.routes is not None:
        raise UsageError("give --routes or --no-routes, not both")
    groups = [] if args.no_groups else args.groups
    routes = [] if args.no_routes else args.routes
    if groups is None and routes is None and args.addresses is None:
        raise UsageError(
            "nothing to change: give --groups, --no-groups, --ip, --routes or --no-routes"
        )
    return groups, routes


def run_update(args: argparse.Namespace, out: TextIO, err: TextIO, pki: PkiDir) -> int:
    groups, routes = _wanted(args)
    change = update_identity(pki, args.name, groups=groups, addresses=args.addresses, routes=routes)
    hint: dict[str, Any] | None = None
    failure: str | None = None
    if args.now:
        hint, failure = _send_hint(args, change.after.name)
    if args.json:
        out.write(json.dumps(_change_json(change, hint), indent=2, sort_keys=True) + "\n")
    else:
        out.write(_change_text(change, hint))
    if failure is not None:
        err.write(
            f"vpnctl: error: the inventory is updated, but the gateway was not told to renew "
            f"{change.after.name} now: {failure}\n"
        )
        return 1
    return 0


def _send_hint(args: argparse.Namespace, name: str) -> tuple[dict[str, Any] | None, str | None]:
    given: str | None = getattr(args, "socket", None)
    client = ControlClient(given or default_socket())
    try:
        doc = client.call("renew-hint", {"name": name, "reason": HINT_REASON})
        return RenewHintResult.from_json(doc).to_json(), None  # a broken reply is an error
    except ControlError as exc:
        return None, f"{exc.code.value}: {exc.message}"
    except (ControlClientError, ProtocolError) as exc:
        return None, str(exc)


def _terms(ident: IdentityRecord) -> dict[str, list[str]]:
    return {
        "groups": list(ident.groups),
        "addresses": [str(a) for a in ident.addresses],
        "routes": [str(r) for r in ident.routes],
    }


def _change_json(change: IdentityChange, hint: dict[str, Any] | None) -> dict[str, object]:
    after = change.after
    return {
        "name": after.name,
        "state": after.state,
        "changed": list(change.changed),
        "before": _terms(change.before),
        "after": _terms(after),
        "generation": after.generation,
        "current_serial": None if after.current_serial is None else f"{after.current_serial:x}",
        "next_renewal": None if change.renews_at is None else change.renews_at.isoformat(),
        "renew_hint": hint,
    }


def _change_text(change: IdentityChange, hint: dict[str, Any] | None) -> str:
    name = change.after.name
    if not change.changed:
        lines = f"{name}: nothing changed\n"
    else:
        before, after = _terms(change.before), _terms(change.after)
        pairs = [
            (field, f"{render.joined(before[field])} -> {render.joined(after[field])}")
            for field in change.changed
        ]
        lines = f"updated {name}\n" + render.fields(pairs)
        lines += _when_text(change)
    if hint is not None:
        sessions = hint.get("sessions", 0)
        plural = "" if sessions == 1 else "s"
        lines += f"asked the gateway to renew {name} now ({sessions} session{plural})\n"
    return lines


def _when_text(change: IdentityChange) -> str:
    notes = []
    if change.removed_groups:
        notes.append(
            f"removed group(s) {', '.join(change.removed_groups)} apply on the gateway at once"
        )
    if change.after.state == "pending":
        notes.append("the invited peer gets these terms when it enrolls")
    elif change.renews_at is not None:
        notes.append(
            f"the peer's next renewal (about {render.moment(change.renews_at)}, or --now) "
            "carries the new terms"
        )
    else:
        notes.append("the peer has no valid certificate: its next one carries the new terms")
    return "".join(f"  note: {n}\n" for n in notes)
