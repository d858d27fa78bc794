"""``vpnctl status|peers|kick|reload``: ask a running vpnd over its control socket.

Exit codes as for the rest of vpnctl: 0 ok, 1 refused or vpnd unreachable, 2 usage.
Handlers catch their own control errors so ``cli.main`` needs no knowledge of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from typing import Any, TextIO

from vpnctl import argparsing as types
from vpnctl import render
from vpnd.control.client import ENV_SOCKET, ControlClient, ControlClientError, default_socket
from vpnd.control.protocol import ControlError, ProtocolError
from vpnd.control.results import (
    CertSummary,
    CrlSummary,
    PeerInfo,
    ReloadReport,
    RenewalStatus,
    StatusInfo,
    peers_from_json,
)

PEER_COLUMNS = ("NAME", "ADDRESS", "GROUPS", "REMOTE", "SINCE", "RX", "TX", "DROPS", "DAYS-LEFT")

Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]


def add_socket_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--socket``, accepted before and after the subcommand (like ``--pki``)."""
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help=f"vpnd control socket (default: ${ENV_SOCKET} or /run/vpnd/vpnd.sock)",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the control commands to vpnctl's subcommand table."""

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        add_socket_option(p, top=False)
        p.add_argument("--json", action="store_true", help="print the reply as JSON")
        return p

    command("status", cmd_status, "show a running vpnd: uptime, sessions, certificates, CRL")
    command("peers", cmd_peers, "list connected peers with counters")
    p = command("kick", cmd_kick, "disconnect a connected peer (it may reconnect)")
    p.add_argument("name", metavar="NAME", type=types.peer_name)
    p.add_argument("--reason", default="", metavar="TEXT", help="told to the peer and logged")
    command(
        "reload",
        cmd_reload,
        "re-read config, policy, CA and CRL (the old config stays if the new one is invalid)",
    )


def _client(args: argparse.Namespace) -> ControlClient:
    given: str | None = getattr(args, "socket", None)
    return ControlClient(given or default_socket())


def _guarded(run: Callable[[argparse.Namespace, TextIO, TextIO], int]) -> Handler:
    def handler(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        try:
            return run(args, out, err)
        except ControlError as exc:
            err.write(f"vpnctl: error: {exc.code.value}: {exc.message}\n")
        except ProtocolError as exc:
            err.write(f"vpnctl: error: malformed reply from vpnd: {exc}\n")
        except ControlClientError as exc:
            err.write(f"vpnctl: error: {exc}\n")
        return 1

    handler.__name__ = run.__name__
    return handler


def _dump(doc: object, out: TextIO) -> None:
    out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# --- status --------------------------------------------------------------------------------


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    doc = _client(args).call("status")
    info = StatusInfo.from_json(doc)  # validated even for --json: a broken reply is an error
    if args.json:
        _dump(info.to_json(), out)
    else:
        out.write(status_text(info))
    return 0


def status_text(info: StatusInfo) -> str:
    if info.role == "client":
        # A laptop: where it connects, whether the tunnel is up; no CRL or policy.
        pairs = [
            ("role", info.role),
            ("version", info.version),
            ("pid", str(info.pid)),
            ("uptime", duration(info.uptime_s)),
            ("server", info.listen or "-"),
            ("tun", info.tun),
            ("tunnel", "up" if info.sessions else "down (reconnecting)"),
            ("drops", counts(info.drops)),
            ("certificate", cert_line(info.cert)),
            ("ca", cert_line(info.ca)),
        ]
        if info.renewal is not None:
            pairs.extend(renewal_lines(info.renewal))
        return render.fields(pairs, indent="")
    pairs = [
        ("role", info.role),
        ("version", info.version),
        ("pid", str(info.pid)),
        ("uptime", duration(info.uptime_s)),
        ("listen", info.listen or "-"),
        ("tun", info.tun),
        ("sessions", str(info.sessions)),
        ("handshakes", counts(info.handshakes)),
        ("drops", counts(info.drops)),
        ("certificate", cert_line(info.cert)),
        ("ca", cert_line(info.ca)),
        ("crl", crl_line(info.crl)),
        ("policy rules", str(info.policy_rules)),
    ]
    if info.issuer is not None:
        pairs.append(("issuer", cert_line(info.issuer)))
    if info.issuer_warning:
        pairs.append(("issuer warning", info.issuer_warning))
    if info.lifecycle is not None:
        pairs.append(("lifecycle", counts(info.lifecycle)))
    return render.fields(pairs, indent="")


def renewal_lines(r: RenewalStatus) -> list[tuple[str, str]]:
    """The client's own certificate lifecycle: age, generation, next renewal."""
    gen = f", generation {r.generation}" if r.generation is not None else ""
    lines = [
        ("cert age", f"{duration(max(0.0, r.cert_age_s))}{gen}, valid until {_moment(r.not_after)}")
    ]
    if not r.enabled:
        lines.append(("renewal", "off (renewal.enabled is false)"))
        return lines
    nxt = r.next_renewal if r.next_renewal in ("", "now") else _moment(r.next_renewal)
    state = r.state + (", quarantined: renewing only" if r.quarantined else "")
    lines.append(("next renewal", f"{nxt or '-'} ({state})"))
    done = f"{r.renewals} since start"
    if r.last_renewed:
        done += f", last {_moment(r.last_renewed)}"
    lines.append(("renewals", done))
    if r.last_error:
        lines.append(("renewal error", f"{r.last_error} ({r.failures} in a row)"))
    return lines


def counts(values: dict[str, int]) -> str:
    shown = [f"{k} {v}" for k, v in sorted(values.items()) if v]
    return ", ".join(shown) or "-"


def cert_line(cert: CertSummary) -> str:
    return (
        f"{cert.name} serial {cert.serial}, expires {_moment(cert.not_after)} "
        f"({render.days_phrase(cert.days_left)})"
    )


def crl_line(crl: CrlSummary | None) -> str:
    if crl is None:
        return "none loaded"
    line = f"number {crl.number}, next update {_moment(crl.next_update)}"
    if crl.stale:
        return f"{line} (STALE since {duration(-crl.seconds_left)})"
    return f"{line} (in {duration(crl.seconds_left)})"


def _moment(iso: str) -> str:
    try:
        return render.moment(dt.datetime.fromisoformat(iso))
    except ValueError:
        return iso


def duration(seconds: float) -> str:
    """``3d04h``, ``2h05m``, ``4m07s``, ``12s``: two units are enough to read."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


# --- peers ---------------------------------------------------------------------------------


def _peers(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    peers = peers_from_json(_client(args).call("peers"))
    if args.json:
        _dump([p.to_json() for p in peers], out)
    else:
        out.write(peers_table(peers))
    return 0


def peers_table(peers: list[PeerInfo]) -> str:
    rows = [
        (
            p.name,
            ",".join(p.addresses) or "-",
            ",".join(p.groups) or "-",
            p.remote,
            _moment(p.connected_since),
            human_bytes(p.bytes_in),
            human_bytes(p.bytes_out),
            str(sum(p.drops.values())),
            str(p.cert_days_left),
        )
        for p in sorted(peers, key=lambda p: (p.name, p.connected_since))
    ]
    return render.table(PEER_COLUMNS, rows)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


# --- kick and reload -----------------------------------------------------------------------


def _kick(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = _client(args).kick(args.name, args.reason)
    if args.json:
        _dump(result.to_json(), out)
    else:
        plural = "" if result.closed == 1 else "s"
        out.write(f"kicked {result.name}: {result.closed} session{plural} closed\n")
    return 0


def _reload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    report: ReloadReport = _client(args).reload()
    if args.json:
        _dump(report.to_json(), out)
    else:
        out.write("reloaded\n" if report.changed else "reloaded: nothing changed\n")
        out.writelines(f"  {line}\n" for line in report.changed)
        out.writelines(f"  closed {name} (no longer allowed)\n" for name in report.closed)
    for line in report.errors:
        err.write(f"vpnctl: error: reload: {line}\n")
    return 1 if report.errors else 0


cmd_status = _guarded(_status)
cmd_peers = _guarded(_peers)
cmd_kick = _guarded(_kick)
cmd_reload = _guarded(_reload)
