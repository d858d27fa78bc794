"""``vpnctl``: the admin CLI. A thin argparse and formatting layer over ``vpnd.pki.PkiDir``.

Exit codes: 0 success (also "already revoked": revoking is idempotent), 1 refused
(PKI said no: bad passphrase, address taken, expired CA, unknown name...), 2 usage
(malformed command line or argument). Every error is one ``vpnctl: error:`` line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from vpnctl import argparsing as types
from vpnctl import (
    control_commands,
    invite_cli,
    issuer_cli,
    lifecycle_cli,
    provision_cli,
    render,
    renew_cli,
)
from vpnctl.argparsing import CliParser, HelpRequested, UsageError
from vpnd import __version__
from vpnd.files.passphrase import PassphraseError, read_passphrase
from vpnd.pki.crl import REASONS
from vpnd.pki.identity import PkiError, Role
from vpnd.pki.issue_terms import (
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    DEFAULT_GATEWAY_DAYS,
    DEFAULT_PEER_DAYS,
)
from vpnd.pki.keys import KEY_TYPES_CA, KEY_TYPES_LEAF, load_certificates, load_csr
from vpnd.pki.pkidir import PkiDir
from vpnd.pki.profile import describe_certificate
from vpnd.pki.results import Issued

ENV_PKI = "VPNCTL_PKI"
ENV_PASSPHRASE_FILE = "VPNCTL_CA_PASSPHRASE_FILE"  # noqa: S105 - an env var name

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]


class CliError(Exception):
    """Refused for a reason outside the PKI itself (e.g. unreadable passphrase file): exit 1."""


def _stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


# --- shared option plumbing ---------------------------------------------------------------


def _add_pki_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand; SUPPRESS keeps a subparser from
    # overwriting a value given before it.
    parser.add_argument(
        "--pki",
        metavar="DIR",
        default=None if top else argparse.SUPPRESS,
        help=f"PKI directory (default: ${ENV_PKI})",
    )


def _add_passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-file",
        metavar="F",
        help=f"file whose first line is the CA key passphrase (default: ${ENV_PASSPHRASE_FILE}; "
        "prompted for on a terminal when the key is encrypted)",
    )


def _add_cert_options(parser: argparse.ArgumentParser) -> None:
    types.add_peer_options(
        parser,
        ip_help="overlay address(es); default: the next free one (a gateway: the first usable)",
    )
    parser.add_argument(
        "--days",
        type=types.positive_int,
        help=f"lifetime in days (default {DEFAULT_PEER_DAYS}, gateways {DEFAULT_GATEWAY_DAYS}; "
        "never beyond the CA's expiry)",
    )
    parser.add_argument(
        "--gateway", action="store_true", help="a gateway certificate (serverAuth; needs --dns)"
    )
    parser.add_argument(
        "--dns",
        dest="dns_names",
        metavar="NAME",
        type=types.dns_name,
        action="extend",
        nargs="+",
        default=[],
        help="gateway DNS name(s) clients pin (only with --gateway)",
    )


def _role(args: argparse.Namespace) -> Role:
    if args.gateway and not args.dns_names:
        raise UsageError("--gateway needs at least one --dns NAME")
    if args.dns_names and not args.gateway:
        raise UsageError("--dns is only for gateway certificates: add --gateway")
    return Role.GATEWAY if args.gateway else Role.PEER


def _pki_path(args: argparse.Namespace) -> Path:
    raw = args.pki or os.environ.get(ENV_PKI)
    if not raw:
        raise UsageError(f"no PKI directory: give --pki DIR or set {ENV_PKI}")
    return Path(raw)


def _read_passphrase(path: str) -> bytes:
    try:
        return read_passphrase(path)
    except PassphraseError as exc:
        raise CliError(str(exc)) from None


def _passphrase_source(args: argparse.Namespace) -> str | None:
    given: str | None = getattr(args, "passphrase_file", None)
    return given or os.environ.get(ENV_PASSPHRASE_FILE) or None


def _signing_pki(args: argparse.Namespace) -> PkiDir:
    """A PkiDir able to sign: passphrase from file/env, else a prompt on a terminal."""
    path = _pki_path(args)
    source = _passphrase_source(args)
    if source is not None:
        return PkiDir(path, passphrase=_read_passphrase(source))
    plain = PkiDir(path)
    if not plain.ca_key_encrypted():
        return plain
    if not _stdin_is_tty():
        raise CliError(
            f"{plain.ca_key_path} is encrypted: give --passphrase-file F or set "
            f"{ENV_PASSPHRASE_FILE} (no terminal to prompt on)"
        )
    entered = getpass.getpass(f"passphrase for {plain.ca_key_path}: ").encode()
    if not entered:
        raise CliError("empty passphrase")
    return PkiDir(path, passphrase=entered)


# --- commands -----------------------------------------------------------------------------


def _cmd_ca_init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = _pki_path(args)
    source = _passphrase_source(args)
    passphrase = _read_passphrase(source) if source is not None else None
    pki = PkiDir(path, passphrase=passphrase)
    made = pki.init_ca(
        name=args.name,
        networks=args.networks,
        days=args.days,
        key_type=args.key_type,
        crl_days=args.crl_days,
    )
    out.write(f"created CA {made.name} in {pki.path}\n")
    out.write(
        render.fields(
            [
                ("fingerprint", f"sha256 {made.fingerprint}"),
                ("networks", render.joined(made.networks)),
                ("expires", f"{render.moment(made.not_after)} ({args.days} days)"),
                (
                    "key",
                    f"{pki.ca_key_path.name} {made.key_type}, "
                    + ("encrypted" if made.encrypted else "NOT encrypted"),
                ),
                ("files", render.joined(p.name for p in made.files)),
            ]
        )
    )
    if not made.encrypted:
        err.write("vpnctl: warning: ca.key is not encrypted; consider --passphrase-file\n")
    return 0


def _report_issued(issued: Issued, out: TextIO, err: TextIO) -> None:
    for warning in issued.warnings:
        err.write(f"vpnctl: warning: {warning}\n")
    rec = issued.record
    pairs = [
        ("addresses", render.joined(rec.addresses)),
        ("groups", render.joined(rec.groups)),
    ]
    if rec.routes:
        pairs.append(("routes", render.joined(rec.routes)))
    if rec.dns_names:
        pairs.append(("dns names", render.joined(rec.dns_names)))
    lifetime = (rec.not_after - rec.issued_at).days
    pairs += [
        ("valid until", f"{render.moment(rec.not_after)} ({lifetime} days)"),
        ("fingerprint", f"sha256 {rec.fingerprint}"),
    ]
    if issued.files:
        pairs.append(
            (
                "wrote",
                render.joined(
                    f"{p} (0600)" if p.suffix == ".key" else str(p) for p in issued.files
                ),
            )
        )
    out.write(f"issued {rec.name} ({rec.role.value}), serial {rec.serial_hex}\n")
    out.write(render.fields(pairs))


def _cmd_issue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    role = _role(args)
    pki = _signing_pki(args)
    issued = pki.issue(
        args.name,
        out_dir=args.out,
        role=role,
        addresses=args.addresses,
        groups=args.groups,
        routes=args.routes,
        dns_names=args.dns_names,
        days=args.days,
        key_type=args.key_type,
    )
    _report_issued(issued, out, err)
    return 0


def _cmd_sign(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    role = _role(args)
    csr = load_csr(args.csr)
    pki = _signing_pki(args)
    issued = pki.sign_csr(
        csr,
        out_path=args.out,
        role=role,
        addresses=args.addresses,
        groups=args.groups,
        routes=args.routes,
        dns_names=args.dns_names,
        days=args.days,
        name=args.name,
        replace=args.replace,
    )
    _report_issued(issued, out, err)
    return 0


def _cmd_revoke(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if (args.name is None) == (args.serial is None):
        raise UsageError("give either NAME or --serial HEX (exactly one)")
    pki = _signing_pki(args)
    result = pki.revoke(name=args.name, serial=args.serial, reason=args.reason)
    for rec in result.revoked:
        out.write(
            f"revoked {rec.name} serial {rec.serial_hex} "
            f"(reason: {rec.revoke_reason or 'none given'})\n"
        )
    for rec in result.already_revoked:
        when = render.moment(rec.revoked_at) if rec.revoked_at else "?"
        out.write(f"{rec.name} serial {rec.serial_hex} is already revoked (since {when})\n")
    if result.crl is not None:
        out.write(
            f"re-signed {result.crl.path}: CRL number {result.crl.number}, "
            f"{result.crl.revoked_count} revoked, next update "
            f"{render.moment(result.crl.next_update)}\n"
        )
    return 0


def _cmd_crl(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    pki = _signing_pki(args)
    signed = pki.refresh_crl(days=args.days)
    out.write(
        f"signed {signed.path}: CRL number {signed.number}, {signed.revoked_count} revoked, "
        f"next update {render.moment(signed.next_update)}\n"
    )
    return 0


def _cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    pki = PkiDir(_pki_path(args))
    certs = pki.list_certificates(expiring_within_days=args.expiring)
    if args.json:
        out.write(json.dumps([render.listed_json(c) for c in certs], indent=2) + "\n")
    else:
        out.write(render.list_table(certs, pki.now()))
    return 0


def _cmd_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    certs = load_certificates(args.cert)
    if len(certs) > 1:
        err.write(f"vpnctl: note: {args.cert} holds {len(certs)} certificates; showing the first\n")
    info = describe_certificate(certs[0])
    days_left = (info.not_after - dt.datetime.now(dt.UTC)).days
    if args.json:
        out.write(json.dumps({**info.to_json(), "days_left": days_left}, indent=2) + "\n")
    else:
        out.write(render.certificate_text(info, days_left))
    return 0


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> CliParser:
    parser = CliParser(
        prog="vpnctl",
        description="Administer a vpnd PKI: CA, certificates, revocation.",
        epilog="Exit codes: 0 ok, 1 refused, 2 usage error.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_pki_option(parser, top=True)
    control_commands.add_socket_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)

    def command(name: str, handler: Handler, help_text: str, where: object = sub) -> CliParser:
        assert isinstance(where, argparse._SubParsersAction)
        p: CliParser = where.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        _add_pki_option(p, top=False)
        return p

    ca = sub.add_parser("ca", help="CA commands", description="CA commands")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", parser_class=CliParser)
    ca_sub.required = True
    p = command("init", _cmd_ca_init, "create the CA, inventory and first CRL", ca_sub)
    p.add_argument("--name", required=True, help="CA name (a-z, 0-9, '-')")
    p.add_argument(
        "--network",
        dest="networks",
        metavar="CIDR",
        type=types.network,
        action="append",
        required=True,
        help="overlay network the CA may issue addresses in (repeatable)",
    )
    p.add_argument("--days", type=types.positive_int, default=DEFAULT_CA_DAYS)
    p.add_argument("--key-type", choices=KEY_TYPES_CA, default=KEY_TYPES_CA[0])
    p.add_argument(
        "--crl-days",
        type=types.positive_int,
        default=DEFAULT_CRL_DAYS,
        help="how long each signed CRL stays valid (nextUpdate), stored in the inventory",
    )
    _add_passphrase_option(p)
    issuer_cli.register(
        command, ca_sub, _signing_pki, _add_passphrase_option, lambda a: PkiDir(_pki_path(a))
    )

    p = command(
        "issue",
        _cmd_issue,
        "create a key and certificate for a peer or gateway. Addresses: the network and "
        "broadcast addresses are never used, and the first usable address is reserved "
        "for the gateway; renewing a name keeps its address",
    )
    p.add_argument("name", metavar="NAME", type=types.peer_name)
    _add_cert_options(p)
    p.add_argument("--key-type", choices=KEY_TYPES_LEAF, default=KEY_TYPES_LEAF[0])
    p.add_argument("--out", required=True, metavar="DIR", help="writes NAME.pem, NAME.key, ca.pem")
    _add_passphrase_option(p)

    p = command(
        "sign",
        _cmd_sign,
        "sign a CSR (from 'vpnd keygen'); its requested extensions are ignored",
    )
    p.add_argument("csr", metavar="CSR_FILE")
    _add_cert_options(p)
    p.add_argument(
        "--name",
        type=types.peer_name,
        help="the certificate's name (default: the CSR's CN, canonicalised)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="allow a name that already has a valid certificate: the new one takes over "
        "its address and ends its session (never a gateway's name)",
    )
    p.add_argument("--out", required=True, metavar="CERT", help="certificate file to write")
    _add_passphrase_option(p)

    p = command(
        "revoke",
        _cmd_revoke,
        "revoke a name's valid certificates, or one serial, and re-sign the CRL "
        "(already revoked: reported, exit 0)",
    )
    p.add_argument("name", metavar="NAME", nargs="?", type=types.peer_name)
    p.add_argument("--serial", metavar="HEX", type=types.serial)
    p.add_argument("--reason", choices=sorted(REASONS))
    _add_passphrase_option(p)

    p = command("crl", _cmd_crl, "re-sign the CRL (run from cron before its nextUpdate)")
    p.add_argument(
        "--days", type=types.positive_int, help="validity of this CRL (default: the configured)"
    )
    _add_passphrase_option(p)

    p = command("list", _cmd_list, "list issued certificates")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--expiring",
        metavar="DAYS",
        type=types.non_negative_int,
        help="only valid certificates expiring within DAYS (what needs renewal)",
    )

    p = command("show", _cmd_show, "decode a certificate file")
    p.add_argument("cert", metavar="CERT_FILE")
    p.add_argument("--json", action="store_true")

    control_commands.register(sub)  # status, peers, kick, reload
    provision_cli.register(command, _signing_pki, lambda a: PkiDir(_pki_path(a)))  # enroll, deploy
    lifecycle_cli.register(command, lambda a: PkiDir(_pki_path(a)))  # update
    invite_cli.register(command, lambda a: PkiDir(_pki_path(a)))  # invite, invites
    renew_cli.register(command)  # renew (a client's certificate, now)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str], out: TextIO, err: TextIO) -> int:
    """Run vpnctl with ``argv`` (without the program name); return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            out.write(f"vpnctl {__version__}\n")
            return 0
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            raise UsageError("a command is required (see 'vpnctl --help')")
        with warnings.catch_warnings():
            # cryptography warns (multi-line, on stderr) about an over-long CN in a
            # CSR; the refusal that follows is the one line the admin needs.
            warnings.filterwarnings("ignore", message="Attribute's length")
            return handler(args, out, err)
    except HelpRequested as help_:
        out.write(help_.text)
        return 0
    except UsageError as exc:
        err.write(f"vpnctl: error: {_one_line(str(exc))}\n")
        return 2
    except (PkiError, CliError) as exc:
        err.write(f"vpnctl: error: {_one_line(str(exc))}\n")
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        err.write(f"vpnctl: error: {where}{_one_line(exc.strerror or str(exc))}\n")
        return 1
    except KeyboardInterrupt:
        err.write("vpnctl: interrupted\n")
        return 130


def run() -> None:
    sys.exit(main(sys.argv[1:], sys.stdout, sys.stderr))
