"""``vpnctl renew``: make the vpnd client on this machine renew its certificate now.

The client sends a CSR for a new key over its live session; the gateway signs it and
the tunnel moves onto the new certificate without going down. A refusal or any other
failure is one line (the client retries on its own with backoff).

Registered by ``vpnctl.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TextIO

from vpnctl import render
from vpnctl.argparsing import CliParser
from vpnctl.control_commands import add_socket_option
from vpnd.control.client import ControlClient, ControlClientError, default_socket
from vpnd.control.protocol import ControlError, ProtocolError
from vpnd.control.results import RenewResult

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]
CommandFactory = Callable[..., CliParser]


def register(command: CommandFactory) -> None:
    """Add ``renew`` to vpnctl's subcommand table."""
    p = command(
        "renew",
        run_renew,
        "make the vpnd client on this machine renew its certificate now, over its tunnel",
    )
    add_socket_option(p, top=False)
    p.add_argument("--json", action="store_true", help="print the reply as JSON")


def run_renew(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    given: str | None = getattr(args, "socket", None)
    client = ControlClient(given or default_socket())
    try:
        result = client.renew()
    except ControlError as exc:
        err.write(f"vpnctl: error: {exc.code.value}: {exc.message}\n")
        return 1
    except (ControlClientError, ProtocolError) as exc:
        err.write(f"vpnctl: error: {exc}\n")
        return 1
    if args.json:
        out.write(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        out.write(renew_text(result))
    return 0


def renew_text(result: RenewResult) -> str:
    pairs = [
        ("result", result.message),
        ("serial", result.serial),
        ("fingerprint", result.fingerprint[:16] + "..."),
        ("not after", result.not_after),
    ]
    return render.fields(pairs, indent="")
