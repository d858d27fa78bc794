"""argparse that never prints or exits by itself, plus the argument types vpnctl shares.

``main(argv, out, err)`` must own its streams and its exit code, so the parser raises
instead: ``UsageError`` (exit 2) and ``HelpRequested`` (help text for ``out``).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from typing import NoReturn

from vpnd.pki.identity import IPAddress, IPNetwork, PkiError
from vpnd.pki.inventory import parse_serial
from vpnd.pki.names import canonical_dns_name, canonical_group, canonical_name


class UsageError(Exception):
    """Malformed command line: exit code 2."""


class HelpRequested(Exception):  # a signal, not an error
    """``--help`` was given; ``text`` goes to the output stream, exit code 0."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


class CliParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError((message or f"exit {status}").strip())

    def print_help(self, file: object = None) -> NoReturn:
        raise HelpRequested(self.format_help())

    def print_usage(self, file: object = None) -> NoReturn:
        raise HelpRequested(self.format_usage())


def _typed(what: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return convert(text)
        except PkiError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise PkiError(f"{text!r} must be a whole number of at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise PkiError(f"{text!r} must be a whole number of at least 0")
    return value


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise PkiError(f"{text!r} has host bits set; did you mean {_fixed(text)}?") from None
        raise PkiError(f"{text!r} is not a CIDR network such as 10.8.0.0/24") from None


def _fixed(text: str) -> str:
    return str(ipaddress.ip_network(text.strip(), strict=False))


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise PkiError(f"{text!r} is not an IP address such as 10.8.0.5") from None


def _groups(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise PkiError(f"{text!r} holds an empty group name (use g1,g2)")
    return [canonical_group(p) for p in parts]


positive_int = _typed("a positive whole number", _positive_int)
non_negative_int = _typed("a whole number", _non_negative_int)
network = _typed("a CIDR network", _network)
address = _typed("an IP address", _address)
groups = _typed("a comma-separated group list", _groups)
peer_name = _typed("a peer name", canonical_name)
dns_name = _typed("a DNS name", canonical_dns_name)
serial = _typed("a hexadecimal serial", parse_serial)


def add_peer_options(parser: argparse.ArgumentParser, *, ip_help: str) -> None:
    """--ip, --groups, --routes: what an admin decides for a peer's certificate
    (shared by issue, sign, enroll)."""
    parser.add_argument(
        "--ip",
        dest="addresses",
        metavar="ADDR",
        type=address,
        action="extend",
        nargs="+",
        default=[],
        help=ip_help,
    )
    parser.add_argument(
        "--groups",
        metavar="G1,G2",
        type=groups,
        action="extend",
        default=[],
        help="firewall groups, comma-separated",
    )
    parser.add_argument(
        "--routes",
        metavar="CIDR",
        type=network,
        action="extend",
        nargs="+",
        default=[],
        help="subnets this peer may route (site-to-site)",
    )
