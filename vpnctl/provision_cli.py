"""``vpnctl enroll`` and ``vpnctl deploy``: argparse and output around their engines.

Registered by ``vpnctl.cli.build_parser`` through :func:`register`. Exit codes as for
the rest of vpnctl: 0 ok, 1 refused/failed (one ``vpnctl: error:`` line), 2 usage.

``--passphrase-file`` here is the SSH identity's passphrase (as in issue 7); the CA
key's passphrase comes from ``--ca-passphrase-file``, $VPNCTL_CA_PASSPHRASE_FILE or a
prompt, exactly as for ``vpnctl sign``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import asyncssh
from tqdm import tqdm

from vpnctl import argparsing as types
from vpnctl import render
from vpnctl.argparsing import CliParser, UsageError
from vpnctl.deploy import HostResult, deploy_hosts, results_table
from vpnctl.enroll import PeerRequest, enroll, restart_service
from vpnctl.host_inspection import DEFAULT_RENEW_WITHIN_DAYS
from vpnctl.hosts_file import HostsFileError, load_hosts_file
from vpnctl.remote_layout import (
    DEFAULT_REMOTE_DIR,
    DEFAULT_UNIT,
    LayoutError,
    check_client_settings,
    check_remote_dir,
)
from vpnctl.ssh_remote import (
    PassphraseNeeded,
    ProvisionError,
    SshOptions,
    load_identity,
    ssh_session,
)
from vpnctl.ssh_target import SshTarget, TargetError, parse_ssh_target
from vpnd.files.passphrase import PassphraseError, read_passphrase
from vpnd.pki.pkidir import PkiDir

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]
CommandFactory = Callable[[str, Handler, str], CliParser]
PkiFactory = Callable[[argparse.Namespace], PkiDir]
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_CONCURRENCY = 8


def _ssh_target(text: str) -> SshTarget:
    try:
        return parse_ssh_target(text)
    except TargetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _remote_dir(text: str) -> str:
    try:
        return check_remote_dir(text)
    except LayoutError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_ssh_options(p: CliParser, *, per_host: bool) -> None:
    fallback = " (a host's own setting in the hosts file wins)" if per_host else ""
    p.add_argument(
        "--identity",
        metavar="KEYFILE",
        type=Path,
        help="SSH private key (default: ssh-agent when SSH_AUTH_SOCK is set, else "
        "~/.ssh/id_*)" + fallback,
    )
    p.add_argument(
        "--passphrase-file",
        dest="identity_passphrase_file",
        metavar="F",
        help="file whose first line is the --identity key's passphrase (default: prompt "
        "on a terminal)",
    )
    p.add_argument(
        "--known-hosts",
        metavar="FILE",
        type=Path,
        help=f"verify host keys against FILE (default {DEFAULT_KNOWN_HOSTS}); unknown or "
        "changed keys are refused" + fallback,
    )
    p.add_argument(
        "--jump",
        metavar="[USER@]HOST[:PORT]",
        type=_ssh_target,
        help="connect through this SSH jump host (its key is verified too)" + fallback,
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="restart the client service afterwards and report whether it came up",
    )
    p.add_argument("--unit", default=DEFAULT_UNIT, help=f"service to restart ({DEFAULT_UNIT})")
    p.add_argument(
        "--ca-passphrase-file",
        dest="passphrase_file",
        metavar="F",
        help="file whose first line is the CA key passphrase (default: "
        "$VPNCTL_CA_PASSPHRASE_FILE, or a prompt on a terminal)",
    )


def register(command: CommandFactory, signing_pki: PkiFactory, reading_pki: PkiFactory) -> None:
    """Add ``enroll`` and ``deploy``. ``command(name, handler, help)`` makes a subparser
    that already has ``--pki``; ``signing_pki(args)`` opens the CA able to sign (asking
    for its passphrase), ``reading_pki(args)`` opens it read-only (for --dry-run)."""
    p = command(
        "enroll",
        _enroller(signing_pki),
        "provision one host over SSH: its key is made there, only the CSR comes back; "
        "the signed certificate, ca.pem and client.yaml go up atomically",
    )
    p.add_argument("name", metavar="NAME", type=types.peer_name)
    p.add_argument(
        "--ssh", required=True, metavar="[USER@]HOST[:PORT]", type=_ssh_target, dest="target"
    )
    types.add_peer_options(
        p, ip_help="overlay address(es); default: the next free one (renewals keep theirs)"
    )
    p.add_argument("--days", type=types.positive_int, help="certificate lifetime in days")
    p.add_argument(
        "--remote-dir",
        default=DEFAULT_REMOTE_DIR,
        type=_remote_dir,
        help=f"directory on the host ({DEFAULT_REMOTE_DIR})",
    )
    p.add_argument("--gateway-address", metavar="HOST:PORT", help="the gateway, for client.yaml")
    p.add_argument(
        "--server-name", metavar="NAME", help="DNS name the gateway cert must carry (pinned)"
    )
    _add_ssh_options(p, per_host=False)

    p = command(
        "deploy",
        _deployer(signing_pki, reading_pki),
        "provision every host of a YAML hosts file over SSH, concurrently and idempotently "
        "(enrolled / renewed / unchanged / failed per host); exit 0 only if all succeeded",
    )
    p.add_argument("hosts_file", metavar="HOSTS_FILE")
    p.add_argument(
        "--concurrency",
        type=types.positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"hosts provisioned at once ({DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--renew-within",
        metavar="DAYS",
        type=types.non_negative_int,
        default=DEFAULT_RENEW_WITHIN_DAYS,
        help="re-enroll (new key) a host whose certificate expires within DAYS "
        f"({DEFAULT_RENEW_WITHIN_DAYS})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="connect and inspect, report what would happen; change nothing anywhere",
    )
    _add_ssh_options(p, per_host=True)


# --- authentication plumbing ----------------------------------------------------------------


class _Identities:
    """Loads each identity file once, prompting for a passphrase only on a terminal."""

    def __init__(self, passphrase_file: str | None) -> None:
        self._passphrase = _read_passphrase(passphrase_file) if passphrase_file else None
        self._loaded: dict[Path, asyncssh.SSHKey] = {}

    def get(self, path: Path) -> asyncssh.SSHKey:
        path = path.expanduser()
        if path not in self._loaded:
            try:
                key = load_identity(path, self._passphrase)
            except PassphraseNeeded:
                if not (sys.stdin is not None and sys.stdin.isatty()):
                    raise ProvisionError(
                        f"identity {path} is encrypted: give --passphrase-file F "
                        "(no terminal to prompt on)"
                    ) from None
                entered = getpass.getpass(f"passphrase for {path}: ").encode()
                key = load_identity(path, entered)
            self._loaded[path] = key
        return self._loaded[path]


def _read_passphrase(path: str) -> bytes:
    try:
        return read_passphrase(path)
    except PassphraseError as exc:
        raise ProvisionError(str(exc)) from None


def _options(
    identities: _Identities,
    *,
    identity: Path | None,
    known_hosts: Path | None,
    jump: SshTarget | None,
) -> SshOptions:
    return SshOptions(
        known_hosts=(known_hosts or Path(DEFAULT_KNOWN_HOSTS)).expanduser(),
        identity=identities.get(identity) if identity is not None else None,
        identity_path=identity,
        jump=jump,
    )


def _check_passphrase_use(args: argparse.Namespace, identity_given: bool) -> None:
    if args.identity_passphrase_file and not identity_given:
        raise UsageError("--passphrase-file is for an --identity key (or identity: in the file)")


# --- enroll ---------------------------------------------------------------------------------


def _enroller(signing_pki: PkiFactory) -> Handler:
    def handler(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        _check_passphrase_use(args, args.identity is not None)
        try:
            check_client_settings(args.gateway_address, args.server_name)
        except LayoutError as exc:
            raise UsageError(f"{exc} (--gateway-address and --server-name)") from None
        request = PeerRequest(
            name=args.name,
            remote_dir=args.remote_dir,
            addresses=tuple(args.addresses),
            groups=tuple(args.groups),
            routes=tuple(args.routes),
            days=args.days,
            gateway_address=args.gateway_address,
            server_name=args.server_name,
        )
        try:
            options = _options(
                _Identities(args.identity_passphrase_file),
                identity=args.identity,
                known_hosts=args.known_hosts,
                jump=args.jump,
            )
            pki = signing_pki(args)
            return asyncio.run(
                _enroll(args, request=request, options=options, pki=pki, out=out, err=err)
            )
        except ProvisionError as exc:
            err.write(f"vpnctl: error: {exc}\n")
            return 1

    return handler


async def _enroll(
    args: argparse.Namespace,
    *,
    request: PeerRequest,
    options: SshOptions,
    pki: PkiDir,
    out: TextIO,
    err: TextIO,
) -> int:
    target: SshTarget = args.target
    async with ssh_session(target, options) as remote:
        done = await enroll(remote, request, pki)
        for warning in done.warnings:
            err.write(f"vpnctl: warning: {warning}\n")
        rec = done.record
        out.write(
            f"enrolled {rec.name} on {target}: serial {rec.serial_hex}, "
            f"key made on the host by {done.keygen}\n"
        )
        pairs = [
            ("addresses", render.joined(rec.addresses)),
            ("groups", render.joined(rec.groups)),
            ("valid until", render.moment(rec.not_after)),
            ("fingerprint", f"sha256 {rec.fingerprint}"),
            (
                "files",
                render.joined(f"{f} (0600)" if f.endswith(".key") else f for f in done.files),
            ),
        ]
        out.write(render.fields(pairs))
        if not args.restart:
            return 0
        restarted = await restart_service(remote, args.unit)
        if restarted.ok:
            out.write(f"{restarted.message}\n")
            return 0
        err.write(f"vpnctl: error: delivered, but {restarted.message}\n")
        return 1


# --- deploy ---------------------------------------------------------------------------------


def _deployer(signing_pki: PkiFactory, reading_pki: PkiFactory) -> Handler:
    def handler(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        try:
            hosts = load_hosts_file(args.hosts_file)
        except HostsFileError as exc:
            err.write(f"vpnctl: error: {exc}\n")
            return 2
        _check_passphrase_use(
            args, args.identity is not None or any(h.identity is not None for h in hosts)
        )
        try:
            identities = _Identities(args.identity_passphrase_file)
            # Keys are loaded (and passphrases asked for) before anything connects.
            options = {
                h.name: _options(
                    identities,
                    identity=h.identity or args.identity,
                    known_hosts=h.known_hosts or args.known_hosts,
                    jump=h.jump or args.jump,
                )
                for h in hosts
            }
            # A dry run never signs, so it needs no CA passphrase.
            pki = reading_pki(args) if args.dry_run else signing_pki(args)
        except ProvisionError as exc:
            err.write(f"vpnctl: error: {exc}\n")
            return 1
        with tqdm(
            total=len(hosts), file=err, disable=not err.isatty(), unit="host", desc="deploy"
        ) as bar:

            def done(result: HostResult) -> None:
                bar.update(1)

            results = asyncio.run(
                deploy_hosts(
                    hosts,
                    pki=pki,
                    options_for=lambda h: options[h.name],
                    concurrency=args.concurrency,
                    renew_within_days=args.renew_within,
                    dry_run=args.dry_run,
                    restart_unit=args.unit if args.restart else None,
                    on_done=done,
                )
            )
        out.write(results_table(results))
        failed = sum(not r.ok for r in results)
        if args.dry_run:
            out.write("dry run: nothing was changed\n")
        if failed:
            err.write(f"vpnctl: error: {failed} of {len(results)} hosts failed\n")
            return 1
        return 0

    return handler
