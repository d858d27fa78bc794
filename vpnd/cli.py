"""The ``vpnd`` command: run the daemon (``vpnd --config FILE``), check a config without
starting (``vpnd --check --config FILE``) or make a key and CSR on the peer
(``vpnd keygen``), the peer side of ``vpnctl sign``.

Exit codes: 0 ok, 1 refused or failed, 2 usage error; errors are one ``vpnd: error:`` line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NoReturn, TextIO

from cryptography.hazmat.primitives import serialization

from vpnd import __version__
from vpnd.pki.authority import csr_for
from vpnd.pki.file_set import write_together
from vpnd.pki.identity import PkiError
from vpnd.pki.keys import KEY_TYPES_LEAF, generate_key, private_key_pem
from vpnd.pki.names import canonical_name


class UsageError(Exception):
    """Malformed command line: exit code 2."""


class CliError(Exception):
    """Refused or failed: exit code 1."""


class HelpRequested(Exception):  # a signal, not an error
    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


class _Parser(argparse.ArgumentParser):
    # Never print or exit from inside argparse: main() owns its streams and exit code.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError((message or f"exit {status}").strip())

    def print_help(self, file: object = None) -> NoReturn:
        raise HelpRequested(self.format_help())

    def print_usage(self, file: object = None) -> NoReturn:
        raise HelpRequested(self.format_usage())


def _name(text: str) -> str:
    try:
        return canonical_name(text)
    except PkiError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> _Parser:
    parser = _Parser(
        prog="vpnd",
        description="vpnd: certificate-authenticated VPN daemon (gateway or client).",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage error.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--config", metavar="FILE", help="run the daemon with this YAML config")
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --config: validate the config, certificate, key, CA, CRL, listen port "
        "and TUN name without starting (touches no kernel state, no network); exit 0 or 1",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    keygen = sub.add_parser(
        "keygen",
        help="make a private key and a CSR for 'vpnctl sign'",
        description="Make a private key (0600) and a CSR carrying only NAME and the public "
        "key; the admin signs it with 'vpnctl sign CSR --out CERT'.",
    )
    keygen.add_argument("--name", required=True, type=_name, help="peer name (a-z, 0-9, '-')")
    keygen.add_argument("--out-key", required=True, metavar="KEY")
    keygen.add_argument("--out-csr", required=True, metavar="CSR")
    keygen.add_argument("--key-type", choices=KEY_TYPES_LEAF, default=KEY_TYPES_LEAF[0])
    keygen.add_argument("--force", action="store_true", help="overwrite an existing KEY")
    enroll = sub.add_parser(
        "enroll",
        help="enroll this host with an invite token from 'vpnctl invite'",
        description="Make a private key here (it never leaves), connect to the gateway "
        "named in TOKEN, check it against the CA pinned in TOKEN (never a system store), "
        "redeem the invite and write the key (0600), certificate, CA bundle and a ready "
        "client.yaml into DIR, all together. TOKEN '-' reads it from stdin (keeps it out "
        "of the process list).",
    )
    enroll.add_argument("token", metavar="TOKEN")
    enroll.add_argument(
        "--dir", required=True, metavar="DIR", help="where to write, e.g. /etc/vpnd"
    )
    enroll.add_argument("--key-type", choices=KEY_TYPES_LEAF, default=KEY_TYPES_LEAF[0])
    enroll.add_argument(
        "--force", action="store_true", help="replace an existing enrollment in DIR"
    )
    enroll.add_argument(
        "--timeout", type=float, default=20.0, metavar="S", help="seconds per step (default 20)"
    )
    cleanup = sub.add_parser(
        "cleanup",
        help="undo what a crashed vpnd left in the kernel (systemd ExecStopPost)",
        description="Remove the nftables table and stale links a dead vpnd left in this "
        "network namespace and put forwarding sysctls back to their pre-vpnd values, as "
        "recorded under the runtime dir ($VPND_RUNTIME_DIR, default /run/vpnd). Prints "
        "what it undid; exit 0 when done or nothing to do, 1 if that vpnd still runs.",
    )
    cleanup.add_argument(
        "--config", dest="cleanup_config", metavar="FILE", help="only the TUN of this config"
    )
    return parser


def _keygen(args: argparse.Namespace, out: TextIO) -> int:
    key_path, csr_path = Path(args.out_key), Path(args.out_csr)
    if key_path.resolve() == csr_path.resolve():
        raise UsageError("--out-key and --out-csr must be different files")
    for path in (key_path, csr_path):
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise PkiError(f"directory {parent} does not exist; create it first")
        if path.is_dir():
            raise PkiError(f"{path} is a directory; give a file name")
    if key_path.exists() and not args.force:
        # Overwriting a live key would break the running tunnel until a new cert arrives.
        raise PkiError(f"{key_path} already exists; remove it or pass --force")
    key = generate_key(args.key_type)
    csr = csr_for(name=args.name, key=key)
    write_together(
        [
            (key_path, private_key_pem(key), 0o600),
            (csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644),
        ]
    )
    out.write(f"wrote {key_path} (0600, {args.key_type}) and {csr_path} for {args.name}\n")
    out.write(f"next: the admin runs 'vpnctl sign {csr_path} --out {args.name}.pem'\n")
    return 0


def _enroll(args: argparse.Namespace, out: TextIO) -> int:
    # Lazily: keygen and --version need none of the network stack.
    import asyncio  # noqa: PLC0415

    from vpnd.client.enroll import EnrollError, enroll, tls_dialer  # noqa: PLC0415
    from vpnd.pki.enrollment_token import parse_token  # noqa: PLC0415

    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    text = sys.stdin.readline() if args.token == "-" else args.token  # noqa: S105 - "-" = stdin
    token = parse_token(text)
    dial = tls_dialer(token, timeout=args.timeout)
    try:
        got = asyncio.run(
            enroll(
                token,
                Path(args.dir),
                dial=dial,
                key_type=args.key_type,
                force=args.force,
                timeout=args.timeout,
            )
        )
    except EnrollError as exc:
        raise CliError(str(exc)) from None
    out.write(
        f"enrolled as {got.name} (serial {got.serial}, valid until "
        f"{got.not_after:%Y-%m-%d %H:%M}Z); wrote {', '.join(str(p) for p in got.files)}\n"
    )
    out.write(f"next: vpnd --config {got.config}   (or enable the vpnd-client service)\n")
    return 0


def _daemon(config: str, err: TextIO) -> int:
    if not Path(config).is_file():
        raise CliError(f"config file {config} does not exist")
    # Imported lazily: keygen and --version must work without the daemon's
    # kernel-facing dependencies.
    try:
        daemon = importlib.import_module("vpnd.service.daemon")
    except ModuleNotFoundError as exc:
        if exc.name == "vpnd.service.daemon":
            err.write(
                "vpnd: error: the daemon is not part of this build (vpnd.service.daemon missing)\n"
            )
        else:
            err.write(f"vpnd: error: cannot load the daemon: {exc}\n")
        return 1
    code = daemon.run(config)
    return int(code) if isinstance(code, int) else 1


def _cleanup(config: str | None, out: TextIO, err: TextIO) -> int:
    # Lazy, like the daemon: keygen and --version need no kernel-facing dependencies.
    cleanup = importlib.import_module("vpnd.service.cleanup")
    code = cleanup.run_cleanup(config, out, err)
    return int(code)


def _check(config: str, out: TextIO, err: TextIO) -> int:
    """``vpnd --check``: one line per problem on ``err``, a short OK summary on ``out``."""
    if not Path(config).is_file():
        raise CliError(f"config file {config} does not exist")
    # Lazily, like the daemon: keygen and --version need none of this.
    import datetime as dt  # noqa: PLC0415

    from vpnd.config import ConfigError, load_config  # noqa: PLC0415
    from vpnd.service.preflight import check  # noqa: PLC0415

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    report = check(cfg, now=dt.datetime.now(dt.UTC))
    for line in report.warnings:
        err.write(f"vpnd: warning: {_one_line(line)}\n")
    for line in report.problems:
        err.write(f"vpnd: error: {_one_line(line)}\n")
    if report.problems:
        return 1
    out.write(f"vpnd: ok: {cfg.mode.value} config {config}: {'; '.join(report.ok)}\n")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str], out: TextIO, err: TextIO) -> int:
    """Run vpnd with ``argv`` (without the program name); return the exit code."""
    try:
        return _dispatch(build_parser().parse_args(argv), out, err)
    except HelpRequested as help_:
        out.write(help_.text)
        return 0
    except UsageError as exc:
        err.write(f"vpnd: error: {_one_line(str(exc))}\n")
        return 2
    except (PkiError, CliError) as exc:
        err.write(f"vpnd: error: {_one_line(str(exc))}\n")
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        err.write(f"vpnd: error: {where}{_one_line(exc.strerror or str(exc))}\n")
        return 1


def _dispatch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.version:
        out.write(f"vpnd {__version__}\n")
        return 0
    if args.check:
        if args.command is not None:
            raise UsageError(
                f"--check validates a daemon config; it does not go with {args.command}"
            )
        if args.config is None:
            raise UsageError("--check needs --config FILE")
        return _check(args.config, out, err)
    if args.command == "keygen":
        if args.config is not None:
            raise UsageError("--config runs the daemon; it does not go with keygen")
        return _keygen(args, out)
    if args.command == "enroll":
        if args.config is not None:
            raise UsageError("--config runs the daemon; it does not go with enroll")
        return _enroll(args, out)
    if args.command == "cleanup":
        if args.config is not None and args.cleanup_config is not None:
            raise UsageError("give --config once, after 'cleanup'")
        return _cleanup(args.cleanup_config or args.config, out, err)
    if args.config is None:
        raise UsageError("give --config FILE to run the daemon, or a command (see --help)")
    return _daemon(args.config, err)


def run() -> None:
    sys.exit(main(sys.argv[1:], sys.stdout, sys.stderr))
