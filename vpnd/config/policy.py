"""The ``policy`` section: typed allow rules for the gateway firewall (default deny).

The mapping may sit inline in the gateway config or in its own file named by
``policy: "policy.yaml"``. Rules are only parsed here; ``vpnd.policy`` evaluates them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vpnd.config.files import FileProblem, read_limited
from vpnd.config.schema import (
    AnyMatch,
    ConntrackConfig,
    GroupMatch,
    NetworkMatch,
    PeerMatch,
    PolicyConfig,
    Proto,
    RuleConfig,
    Selector,
    Target,
)
from vpnd.config.strict_yaml import parse_yaml
from vpnd.config.validate import (
    Context,
    Section,
    choice,
    describe,
    file_path,
    integer,
    list_of,
    network,
    seconds,
)

POLICY_KEYS = ("rules", "conntrack")
RULE_KEYS = ("from", "to", "proto", "ports")
CONNTRACK_KEYS = ("tcp_timeout", "udp_timeout", "icmp_timeout", "max_flows_per_peer")

# The same canonical forms vpnd.pki puts into certificates; a rule naming a
# non-canonical group could never match, so it is refused rather than normalised.
_GROUP_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PEER_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RANGE_RE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")

_WEEK = 7 * 86400.0


def read_policy(ctx: Context, path: str, value: object) -> PolicyConfig:
    """``policy:`` is either the mapping itself or the path of a YAML file holding it."""
    if isinstance(value, str):
        policy_file = file_path(ctx, path, value)
        try:
            raw = read_limited(policy_file)
        except FileProblem as err:
            raise ctx.error(path, f"cannot use the policy file: {err}") from None
        return load_policy_bytes(raw, policy_file, ctx)
    return _policy_mapping(ctx, path, value, source=None)


def load_policy_bytes(raw: bytes, policy_file: Path, parent: Context) -> PolicyConfig:
    """Parse a policy file's content; errors name that file, warnings go to ``parent``."""
    ctx = Context(
        source=str(policy_file),
        base_dir=policy_file.parent,
        check_files=parent.check_files,
        warnings=parent.warnings,
    )
    data = parse_yaml(decode_utf8(ctx, raw), source=ctx.source)
    return _policy_mapping(ctx, "", data, source=str(policy_file))


def decode_utf8(ctx: Context, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ctx.error("", f"not valid UTF-8 (at byte {err.start})") from None


def _policy_mapping(ctx: Context, path: str, value: object, *, source: str | None) -> PolicyConfig:
    s = Section(
        ctx, path, value, POLICY_KEYS, what="'rules' and optional 'conntrack', or a file path"
    )
    return PolicyConfig(
        rules=s.get("rules", list_of(_rule), ()),
        conntrack=s.section("conntrack", _conntrack, ConntrackConfig()),
        source=source,
    )


def _conntrack(ctx: Context, path: str, value: object) -> ConntrackConfig:
    s = Section(
        ctx,
        path,
        value,
        CONNTRACK_KEYS,
        what="conntrack idle timeouts in seconds and max_flows_per_peer",
    )
    timeout = seconds(0, _WEEK)
    d = ConntrackConfig()
    return ConntrackConfig(
        tcp_timeout=s.get("tcp_timeout", timeout, d.tcp_timeout),
        udp_timeout=s.get("udp_timeout", timeout, d.udp_timeout),
        icmp_timeout=s.get("icmp_timeout", timeout, d.icmp_timeout),
        max_flows_per_peer=s.get("max_flows_per_peer", integer(1, 1 << 24), d.max_flows_per_peer),
    )


def _rule(ctx: Context, path: str, value: object) -> RuleConfig:
    s = Section(ctx, path, value, RULE_KEYS, what="a rule with from, to, proto and optional ports")
    from_ = s.require("from", _selector, "any, {groups: [...]} or {peer: name}")
    to = s.require("to", _target, "any, a CIDR, {group: name} or {peer: name}")
    proto = s.require("proto", choice(Proto), "one of any | icmp | tcp | udp")
    ports: tuple[tuple[int, int], ...] = ()
    if "ports" in s:
        if proto not in (Proto.TCP, Proto.UDP):
            raise ctx.error(
                s.at("ports"), f"ports apply only to proto tcp or udp, not {proto.value}"
            )
        ports = list_of(_port_range, allow_empty=False)(ctx, s.at("ports"), s.data["ports"])
    return RuleConfig(from_=from_, to=to, proto=proto, ports=ports)


_SELECTOR_HELP = "any, {groups: [a, b]} (all must match), {group: a} or {peer: name}"


def _selector(ctx: Context, path: str, value: object) -> Selector:
    if value == "any":
        return AnyMatch()
    if isinstance(value, dict):
        return _named_match(ctx, path, value, _SELECTOR_HELP)
    raise ctx.error(path, f"expected {_SELECTOR_HELP}, got {describe(value)}")


_TARGET_HELP = "any, a CIDR such as 192.168.50.0/24, {group: a}, {groups: [a, b]} or {peer: name}"


def _target(ctx: Context, path: str, value: object) -> Target:
    if value == "any":
        return AnyMatch()
    if isinstance(value, str):
        return NetworkMatch(network(ctx, path, value))
    if isinstance(value, dict):
        return _named_match(ctx, path, value, _TARGET_HELP)
    raise ctx.error(path, f"expected {_TARGET_HELP}, got {describe(value)}")


def _named_match(
    ctx: Context, path: str, value: dict[object, object], expected: str
) -> GroupMatch | PeerMatch:
    s = Section(ctx, path, value, ("groups", "group", "peer"), what=expected)
    if len(s.data) != 1:
        raise ctx.error(
            path, f"expected exactly one of groups, group or peer, got {describe(value)}"
        )
    if "peer" in s:
        return PeerMatch(s.get("peer", _peer_name, ""))
    if "group" in s:
        return GroupMatch(frozenset({s.get("group", _group_name, "")}))
    groups = list_of(_group_name, allow_empty=False)(ctx, s.at("groups"), s.data["groups"])
    return GroupMatch(frozenset(groups))


def _canonical(ctx: Context, path: str, value: object, pattern: re.Pattern[str], what: str) -> str:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    hint = ""
    if isinstance(value, str) and pattern.fullmatch(value.strip().lower()):
        hint = f"; did you mean {value.strip().lower()!r}?"
    raise ctx.error(path, f"expected {what}, got {describe(value)}{hint}")


def _group_name(ctx: Context, path: str, value: object) -> str:
    what = "a group name (1-63 of a-z, 0-9, '_', '-'; starting with a letter or digit)"
    return _canonical(ctx, path, value, _GROUP_RE, what)


def _peer_name(ctx: Context, path: str, value: object) -> str:
    what = "a peer name (1-63 of a-z, 0-9, '-'; starting with a letter or digit)"
    return _canonical(ctx, path, value, _PEER_RE, what)


def _port_range(ctx: Context, path: str, value: object) -> tuple[int, int]:
    expected = 'a port 1..65535 or a range string "lo-hi"'
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= 65535:
            return value, value
        raise ctx.error(path, f"expected {expected}, got {describe(value)}")
    if isinstance(value, str) and (m := _RANGE_RE.fullmatch(value)):
        lo, hi = int(m.group(1)), int(m.group(2))
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            raise ctx.error(path, f"expected ports 1..65535 in the range, got {value!r}")
        if lo > hi:
            raise ctx.error(path, f"expected lo <= hi in the range, got {value!r}")
        return lo, hi
    raise ctx.error(path, f"expected {expected}, got {describe(value)}")


def load_policy(path: str | os.PathLike[str]) -> PolicyConfig:
    """Load a standalone policy file (the mapping ``policy:`` can point at)."""
    policy_file = Path(os.path.abspath(path))
    ctx = Context(source=str(path), base_dir=policy_file.parent)
    try:
        raw = read_limited(policy_file)
    except FileProblem as err:
        raise ctx.error("", f"cannot load the policy: {err}") from None
    return load_policy_bytes(raw, policy_file, ctx)
