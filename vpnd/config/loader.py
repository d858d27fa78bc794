"""Load a vpnd YAML config into a frozen ``Config``, validated once, with errors that
name the YAML path and say what was expected and what was found."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TypedDict

from vpnd.config.errors import ConfigError
from vpnd.config.files import FileProblem, read_limited
from vpnd.config.policy import decode_utf8, read_policy
from vpnd.config.schema import (
    DEFAULT_RENEWED_LIFETIME,
    MIN_MAX_FRAME,
    ClientConfig,
    ClientRenewalConfig,
    Config,
    CrlRollback,
    CrlStale,
    DuplicateHolddownConfig,
    DuplicatePolicy,
    EnrollmentConfig,
    GatewayConfig,
    GatewayRenewalConfig,
    IPNetwork,
    IssuerConfig,
    KeepaliveConfig,
    LimitsConfig,
    LogConfig,
    LogFormat,
    LogLevel,
    MetricsConfig,
    Mode,
    NatMode,
    NftablesConfig,
    PkiConfig,
    PolicyConfig,
    ReconnectConfig,
    TunConfig,
)
from vpnd.config.strict_yaml import parse_yaml
from vpnd.config.validate import (
    Context,
    Reader,
    Section,
    boolean,
    choice,
    describe,
    dns_name,
    duration,
    existing_file,
    file_path,
    host_port,
    integer,
    list_of,
    network,
    nullable,
    seconds,
)

COMMON_KEYS = (
    "mode",
    "pki",
    "tun",
    "keepalive",
    "handshake_timeout",
    "control_socket",
    "metrics",
    "log",
    "limits",
    "renewal",
)
GATEWAY_KEYS = (
    "listen",
    "push_routes",
    "nat",
    "forwarding",
    "duplicate",
    "duplicate_holddown",
    "state_dir",
    "policy",
    "nftables",
    "enrollment",
)
CLIENT_KEYS = ("server", "server_name", "reconnect")
PKI_KEYS = (
    "ca",
    "cert",
    "key",
    "key_passphrase_file",
    "crl",
    "crl_stale",
    "crl_rollback",
    "expiry_warning_days",
    "issuer",
    "inventory",
    "inventory_poll",
)
GATEWAY_PKI_KEYS = ("issuer", "inventory", "inventory_poll")
ISSUER_KEYS = ("cert", "key", "crl", "key_passphrase_file")

_TUN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_DAY = 86400.0


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> Config:
    """Read, parse and validate the config file at ``path``.

    ``check_files=False`` skips checking that the PKI files exist (for the shipped
    examples); a policy file named by ``policy:`` is always read.
    """
    config_path = Path(path)
    source = str(path)
    try:
        raw = read_limited(config_path)
    except FileProblem as err:
        raise ConfigError(source, "", f"cannot load the config: {err}") from None
    ctx = Context(source=source, base_dir=config_path.parent)
    data = parse_yaml(decode_utf8(ctx, raw), source=source)
    return parse_config(data, source=source, base_dir=config_path.parent, check_files=check_files)


def parse_config(data: object, *, source: str, base_dir: Path, check_files: bool = True) -> Config:
    """Validate already-parsed YAML ``data``; relative paths resolve against ``base_dir``.

    ``source`` names the data in error messages (normally the config file's path).
    """
    ctx = Context(source=source, base_dir=Path(os.path.abspath(base_dir)), check_files=check_files)
    top = Section(
        ctx, "", data, (*COMMON_KEYS, *GATEWAY_KEYS, *CLIENT_KEYS), what="the vpnd settings"
    )
    mode = top.require("mode", choice(Mode), "gateway or client")
    foreign = CLIENT_KEYS if mode is Mode.GATEWAY else GATEWAY_KEYS
    for key in top.data:
        if key in foreign:
            other = Mode.CLIENT if mode is Mode.GATEWAY else Mode.GATEWAY
            raise ctx.error(key, f"valid only in {other} mode, but mode is {mode}; remove it")

    pki = top.require(
        "pki", lambda c, p, v: _pki(c, p, v, mode), "a mapping with ca, cert, key and crl"
    )
    tun = top.section("tun", _tun, TunConfig())
    limits = top.section("limits", _limits, LimitsConfig())
    common: _Common = {
        "source": source,
        "pki": pki,
        "tun": tun,
        "keepalive": top.section("keepalive", _keepalive, KeepaliveConfig()),
        "handshake_timeout": top.get("handshake_timeout", seconds(0, 300), 10.0),
        "control_socket": top.get("control_socket", _socket_path, Path("/run/vpnd/vpnd.sock")),
        "metrics": top.section("metrics", _metrics, MetricsConfig()),
        "log": top.section("log", _log, LogConfig()),
        "limits": limits,
    }
    if mode is Mode.GATEWAY:
        defaults = GatewayConfig(source=source, pki=pki)
        gateway = GatewayConfig(
            **common,
            listen=top.get("listen", host_port(ip_only=True), defaults.listen),
            push_routes=top.get("push_routes", _push_routes, ()),
            nat=top.get("nat", choice(NatMode), defaults.nat),
            forwarding=top.get("forwarding", boolean, defaults.forwarding),
            duplicate=top.get("duplicate", choice(DuplicatePolicy), defaults.duplicate),
            duplicate_holddown=top.section(
                "duplicate_holddown", _duplicate_holddown, DuplicateHolddownConfig()
            ),
            state_dir=top.get("state_dir", file_path, defaults.state_dir),
            policy=top.section("policy", read_policy, PolicyConfig()),
            nftables=top.section("nftables", _nftables, NftablesConfig()),
            renewal=top.section("renewal", _gateway_renewal, GatewayRenewalConfig()),
            enrollment=top.section("enrollment", _enrollment, EnrollmentConfig()),
        )
        _check_online_signing(ctx, gateway)
        return dataclasses.replace(gateway, warnings=tuple(ctx.warnings))
    client = ClientConfig(
        **common,
        server=top.require(
            "server", host_port(ip_only=False), 'the gateway, e.g. "gw.example.net:4443"'
        ),
        server_name=top.require(
            "server_name", dns_name, "the DNS name in the gateway certificate to pin"
        ),
        reconnect=top.section("reconnect", _reconnect, ReconnectConfig()),
        renewal=top.section("renewal", _client_renewal, ClientRenewalConfig()),
    )
    return dataclasses.replace(client, warnings=tuple(ctx.warnings))


class _Common(TypedDict):
    source: str
    pki: PkiConfig
    tun: TunConfig
    keepalive: KeepaliveConfig
    handshake_timeout: float
    control_socket: Path
    metrics: MetricsConfig
    log: LogConfig
    limits: LimitsConfig


def _pki(ctx: Context, path: str, value: object, mode: Mode) -> PkiConfig:
    s = Section(ctx, path, value, PKI_KEYS, what="ca, cert, key and crl file paths")
    public, secret = existing_file(), existing_file(secret=True)
    if mode is Mode.GATEWAY:
        crl: Path | None = s.require(
            "crl", public, "the CRL file (a gateway must check revocation)"
        )
    else:
        crl = s.get("crl", nullable(public), None)
    pki = PkiConfig(
        ca=s.require("ca", public, "the CA bundle (PEM) to trust"),
        cert=s.require("cert", public, "this node's certificate (PEM)"),
        key=s.require("key", secret, "this node's private key (PEM)"),
        key_passphrase_file=s.get("key_passphrase_file", nullable(secret), None),
        crl=crl,
        crl_stale=s.get("crl_stale", choice(CrlStale), CrlStale.DENY),
        crl_rollback=s.get("crl_rollback", choice(CrlRollback), CrlRollback.DENY),
        expiry_warning_days=s.get("expiry_warning_days", integer(0, 3650), 14),
        issuer=s.get("issuer", nullable(_issuer), None),
        inventory=s.get("inventory", nullable(existing_file()), None),
        inventory_poll=s.get("inventory_poll", duration(0, 60), 1.0),
    )
    if mode is Mode.CLIENT:
        for key in GATEWAY_PKI_KEYS:
            if key in s.data:
                raise ctx.error(s.at(key), "valid only in gateway mode; remove it")
    if pki.crl_rollback is CrlRollback.ALLOW:
        ctx.warn(
            s.at("crl_rollback"),
            "allow: a CRL older than one already seen will be used at start",
        )
    if pki.crl_stale is CrlStale.ALLOW:
        ctx.warn(s.at("crl_stale"), "allow: a CRL past its nextUpdate will still be trusted")
    return pki


def _issuer(ctx: Context, path: str, value: object) -> IssuerConfig:
    s = Section(ctx, path, value, ISSUER_KEYS, what="the issuing CA's cert, key and crl")
    cert = s.require("cert", existing_file(), "the issuing CA certificate (vpnctl ca issuer)")
    crl = s.get("crl", file_path, cert.with_name("issuer-crl.pem"))
    return IssuerConfig(
        cert=cert,
        key=s.require("key", existing_file(secret=True), "the issuing CA's key, mode 0600"),
        crl=crl,
        key_passphrase_file=s.get(
            "key_passphrase_file", nullable(existing_file(secret=True)), None
        ),
    )


def _gateway_renewal(ctx: Context, path: str, value: object) -> GatewayRenewalConfig:
    keys = ("enabled", "lifetime", "quarantine_grace")
    s = Section(ctx, path, value, keys, what="in-tunnel renewal settings")
    lifetime = s.get(
        "lifetime", duration(10, 397 * _DAY, lo_inclusive=True), DEFAULT_RENEWED_LIFETIME
    )
    grace = s.get("quarantine_grace", duration(0, 90 * _DAY, lo_inclusive=True), 0.0)
    if lifetime < 3600:
        ctx.warn(s.at("lifetime"), f"{lifetime:g} s is very short: every peer renews that often")
    return GatewayRenewalConfig(
        enabled=s.get("enabled", boolean, False), lifetime=lifetime, quarantine_grace=grace
    )


def _enrollment(ctx: Context, path: str, value: object) -> EnrollmentConfig:
    s = Section(ctx, path, value, ("enabled", "rate", "burst"), what="invite enrollment settings")
    d = EnrollmentConfig()
    return EnrollmentConfig(
        enabled=s.get("enabled", boolean, d.enabled),
        rate=s.get("rate", seconds(0, 10_000), d.rate),
        burst=s.get("burst", integer(1, 10_000), d.burst),
    )


def _client_renewal(ctx: Context, path: str, value: object) -> ClientRenewalConfig:
    s = Section(ctx, path, value, ("enabled", "at"), what="certificate renewal settings")
    return ClientRenewalConfig(
        enabled=s.get("enabled", boolean, True), at=s.get("at", _lifetime_fraction, 0.67)
    )


def _lifetime_fraction(ctx: Context, path: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.1 <= value <= 0.95:
        raise ctx.error(
            path, f"expected a fraction of the lifetime from 0.1 to 0.95, got {describe(value)}"
        )
    return float(value)


def _check_online_signing(ctx: Context, cfg: GatewayConfig) -> None:
    """Renewal and enrollment sign online: they need the issuer and the inventory."""
    for section, on in (("renewal", cfg.renewal.enabled), ("enrollment", cfg.enrollment.enabled)):
        if not on:
            continue
        if cfg.pki.issuer is None:
            raise ctx.error(
                f"{section}.enabled", "needs pki.issuer (create one with: vpnctl ca issuer)"
            )
        if cfg.pki.inventory is None:
            raise ctx.error(f"{section}.enabled", "needs pki.inventory (the CA's inventory.sqlite)")
    if cfg.pki.issuer is not None and cfg.pki.inventory is None:
        raise ctx.error(
            "pki.issuer",
            "needs pki.inventory: the gateway writes the issuer's CRL from it (revoked and "
            "superseded serials)",
        )
    if cfg.renewal.quarantine_grace > 0 and not cfg.renewal.enabled:
        raise ctx.error(
            "renewal.quarantine_grace", "quarantine only admits peers to renew: set renewal.enabled"
        )


def _tun(ctx: Context, path: str, value: object) -> TunConfig:
    s = Section(ctx, path, value, ("name", "mtu", "offload"), what="TUN device settings")
    d = TunConfig()
    return TunConfig(
        name=s.get("name", _tun_name, d.name),
        mtu=s.get("mtu", integer(576, 65535), d.mtu),
        offload=s.get("offload", boolean, d.offload),
    )


def _tun_name(ctx: Context, path: str, value: object) -> str:
    if (
        isinstance(value, str)
        and 1 <= len(value) <= 15
        and set(value) <= _TUN_NAME_CHARS
        and value not in {".", ".."}
    ):
        return value
    raise ctx.error(
        path,
        f"expected an interface name of 1-15 characters from A-Z a-z 0-9 _ . -, "
        f"got {describe(value)}",
    )


def _keepalive(ctx: Context, path: str, value: object) -> KeepaliveConfig:
    s = Section(ctx, path, value, ("interval", "timeout"), what="keepalive interval and timeout")
    d = KeepaliveConfig()
    interval = s.get("interval", seconds(0, _DAY), d.interval)
    timeout = s.get("timeout", seconds(0, _DAY), d.timeout)
    if timeout <= interval:
        raise ctx.error(
            s.at("timeout"),
            f"must be greater than keepalive.interval ({interval:g}), got {timeout:g}",
        )
    return KeepaliveConfig(interval=interval, timeout=timeout)


def _socket_path(ctx: Context, path: str, value: object) -> Path:
    resolved = file_path(ctx, path, value)
    if len(os.fsencode(resolved)) > _SUN_PATH_MAX:
        raise ctx.error(
            path, f"{resolved} is longer than the {_SUN_PATH_MAX} bytes a unix socket path allows"
        )
    return resolved


def _metrics(ctx: Context, path: str, value: object) -> MetricsConfig:
    s = Section(ctx, path, value, ("listen",), what="metrics settings")
    listen = s.get("listen", nullable(host_port(ip_only=True)), None)
    if listen is not None and listen.ip is not None and not listen.ip.is_loopback:
        ctx.warn(s.at("listen"), f"{listen} is not a loopback address: metrics are unauthenticated")
    return MetricsConfig(listen=listen)


def _log(ctx: Context, path: str, value: object) -> LogConfig:
    s = Section(ctx, path, value, ("level", "format"), what="log level and format")
    return LogConfig(
        level=s.get("level", choice(LogLevel), LogLevel.INFO),
        format=s.get("format", choice(LogFormat), LogFormat.TEXT),
    )


def _limits(ctx: Context, path: str, value: object) -> LimitsConfig:
    keys = tuple(f.name for f in dataclasses.fields(LimitsConfig))
    s = Section(ctx, path, value, keys, what="resource limits")
    d = LimitsConfig()
    pending = s.get("max_pending_handshakes", integer(1, 100_000), d.max_pending_handshakes)
    max_frame = s.get("max_frame", integer(MIN_MAX_FRAME, 1 << 24), d.max_frame)
    return LimitsConfig(
        max_sessions=s.get("max_sessions", integer(1, 1_000_000), d.max_sessions),
        max_pending_handshakes=pending,
        max_pending_per_source=s.get(
            "max_pending_per_source",
            _at_most(pending, "max_pending_handshakes"),
            d.max_pending_per_source,
        ),
        max_pending_per_subnet=s.get(
            "max_pending_per_subnet",
            _at_most(pending, "max_pending_handshakes"),
            min(d.max_pending_per_subnet, pending),
        ),
        max_frame=max_frame,
        peer_queue_bytes=s.get("peer_queue_bytes", integer(max_frame, 1 << 30), d.peer_queue_bytes),
        peer_turn_packets=s.get("peer_turn_packets", integer(8, 1_000_000), d.peer_turn_packets),
    )


def _at_most(limit: int, name: str) -> Reader[int]:
    def read(ctx: Context, path: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ctx.error(
                path, f"expected an integer 1..{limit} (at most {name}), got {describe(value)}"
            )
        return value

    return read


def _push_routes(ctx: Context, path: str, value: object) -> tuple[IPNetwork, ...]:
    routes = list_of(network)(ctx, path, value)
    for i, route in enumerate(routes):
        if route in routes[:i]:
            raise ctx.error(f"{path}[{i}]", f"{route} is listed twice")
    return routes


def _duplicate_holddown(ctx: Context, path: str, value: object) -> DuplicateHolddownConfig:
    s = Section(ctx, path, value, ("takeovers", "window", "hold"), what="clone hold-down settings")
    d = DuplicateHolddownConfig()
    return DuplicateHolddownConfig(
        takeovers=s.get("takeovers", integer(0, 1000), d.takeovers),
        window=s.get("window", seconds(0, _DAY), d.window),
        hold=s.get("hold", seconds(0, 7 * _DAY), d.hold),
    )


def _nftables(ctx: Context, path: str, value: object) -> NftablesConfig:
    s = Section(ctx, path, value, ("anti_spoofing", "forward_filter"), what="nftables settings")
    return NftablesConfig(
        anti_spoofing=s.get("anti_spoofing", boolean, False),
        forward_filter=s.get("forward_filter", boolean, True),
    )


def _reconnect(ctx: Context, path: str, value: object) -> ReconnectConfig:
    s = Section(ctx, path, value, ("initial_delay", "max_delay"), what="reconnect backoff")
    d = ReconnectConfig()
    initial = s.get("initial_delay", seconds(0, 3600), d.initial_delay)
    maximum = s.get("max_delay", seconds(0, _DAY), d.max_delay)
    if maximum < initial:
        raise ctx.error(
            s.at("max_delay"),
            f"must be at least reconnect.initial_delay ({initial:g}), got {maximum:g}",
        )
    return ReconnectConfig(initial_delay=initial, max_delay=maximum)
