"""vpnd.config policy section: typed rules, and every error's exact YAML path."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from vpnd.config import (
    AnyMatch,
    ConfigError,
    ConntrackConfig,
    GatewayConfig,
    GroupMatch,
    NetworkMatch,
    PeerMatch,
    PolicyConfig,
    Proto,
    RuleConfig,
    load_policy,
    parse_config,
)

SOURCE = "gw.yaml"


def gateway_with(policy: object) -> dict[str, Any]:
    return {
        "mode": "gateway",
        "pki": {"ca": "ca.pem", "cert": "gw.pem", "key": "gw.key", "crl": "crl.pem"},
        "policy": policy,
    }


def policy_of(policy: object, base_dir: Path = Path("/etc/vpnd")) -> PolicyConfig:
    cfg = parse_config(gateway_with(policy), source=SOURCE, base_dir=base_dir, check_files=False)
    assert isinstance(cfg, GatewayConfig)
    return cfg.policy


def rule_of(rule: dict[str, Any]) -> RuleConfig:
    (parsed,) = policy_of({"rules": [rule]}).rules
    return parsed


def policy_error(policy: object, base_dir: Path = Path("/etc/vpnd")) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        policy_of(policy, base_dir)
    assert "\n" not in str(info.value)
    return info.value


def test_no_policy_is_no_rules() -> None:
    cfg = parse_config(
        {k: v for k, v in gateway_with(None).items() if k != "policy"},
        source=SOURCE,
        base_dir=Path("/etc"),
        check_files=False,
    )
    assert isinstance(cfg, GatewayConfig)
    assert cfg.policy == PolicyConfig()
    assert cfg.policy.rules == ()


@pytest.mark.parametrize("policy", [None, {}, {"rules": []}])
def test_empty_policies(policy: object) -> None:
    assert policy_of(policy).rules == ()


def test_conntrack_defaults_and_values() -> None:
    assert policy_of({}).conntrack == ConntrackConfig(3600.0, 180.0, 30.0)
    ct = policy_of({"conntrack": {"tcp_timeout": 60, "icmp_timeout": 1.5}}).conntrack
    assert ct == ConntrackConfig(tcp_timeout=60.0, udp_timeout=180.0, icmp_timeout=1.5)
    assert policy_of({}).conntrack.max_flows_per_peer == 4096
    assert policy_of({"conntrack": {"max_flows_per_peer": 100}}).conntrack.max_flows_per_peer == 100


VALID_RULES: list[tuple[dict[str, Any], RuleConfig]] = [
    (
        {"from": "any", "to": {"group": "servers"}, "proto": "icmp"},
        RuleConfig(AnyMatch(), GroupMatch(frozenset({"servers"})), Proto.ICMP),
    ),
    (
        {
            "from": {"groups": ["eng", "oncall"]},
            "to": "192.168.50.0/24",
            "proto": "tcp",
            "ports": [22, 443, "8000-8100"],
        },
        RuleConfig(
            GroupMatch(frozenset({"eng", "oncall"})),
            NetworkMatch(ipaddress.IPv4Network("192.168.50.0/24")),
            Proto.TCP,
            ((22, 22), (443, 443), (8000, 8100)),
        ),
    ),
    (
        {"from": {"peer": "alice"}, "to": {"peer": "bob"}, "proto": "udp", "ports": ["53-53"]},
        RuleConfig(PeerMatch("alice"), PeerMatch("bob"), Proto.UDP, ((53, 53),)),
    ),
    (
        {"from": {"group": "a_b-1"}, "to": "any", "proto": "any"},
        RuleConfig(GroupMatch(frozenset({"a_b-1"})), AnyMatch(), Proto.ANY),
    ),
    (
        {"from": "any", "to": {"groups": ["x", "y"]}, "proto": "tcp", "ports": [1, 65535]},
        RuleConfig(
            AnyMatch(), GroupMatch(frozenset({"x", "y"})), Proto.TCP, ((1, 1), (65535, 65535))
        ),
    ),
    (
        {"from": "any", "to": "10.1.2.3", "proto": "tcp"},
        RuleConfig(AnyMatch(), NetworkMatch(ipaddress.IPv4Network("10.1.2.3/32")), Proto.TCP),
    ),
    (
        {"from": "any", "to": "fd00::/8", "proto": "any"},
        RuleConfig(AnyMatch(), NetworkMatch(ipaddress.IPv6Network("fd00::/8")), Proto.ANY),
    ),
    (
        {"from": {"peer": "a" * 63}, "to": "any", "proto": "udp", "ports": ["1-65535"]},
        RuleConfig(PeerMatch("a" * 63), AnyMatch(), Proto.UDP, ((1, 65535),)),
    ),
]


@pytest.mark.parametrize(("rule", "expected"), VALID_RULES)
def test_valid_rule(rule: dict[str, Any], expected: RuleConfig) -> None:
    assert rule_of(rule) == expected


def test_rule_order_is_kept() -> None:
    rules = [{"from": {"peer": f"p{i}"}, "to": "any", "proto": "any"} for i in range(5)]
    parsed = policy_of({"rules": rules}).rules
    assert [r.from_ for r in parsed] == [PeerMatch(f"p{i}") for i in range(5)]


GOOD = {"from": "any", "to": "any", "proto": "tcp"}

INVALID_RULES: list[tuple[object, str, str]] = [
    # policy value, exact error path, fragment of the detail
    ([], "policy", "expected a mapping"),
    (5, "policy", "got 5"),
    ({"rule": []}, "policy.rule", "did you mean 'rules'?"),
    ({"rules": {}}, "policy.rules", "expected a list, got a mapping"),
    ({"rules": None}, "policy.rules", "expected a list, got null"),
    ({"rules": ["allow all"]}, "policy.rules[0]", "expected a mapping"),
    ({"rules": [GOOD, {"to": "any", "proto": "tcp"}]}, "policy.rules[1].from", "required key"),
    ({"rules": [{"from": "any", "proto": "tcp"}]}, "policy.rules[0].to", "required key missing"),
    ({"rules": [{"from": "any", "to": "any"}]}, "policy.rules[0].proto", "required key missing"),
    ({"rules": [{**GOOD, "port": [22]}]}, "policy.rules[0].port", "did you mean 'ports'?"),
    ({"rules": [{**GOOD, "action": "allow"}]}, "policy.rules[0].action", "unknown key"),
    ({"rules": [{**GOOD, "proto": "sctp"}]}, "policy.rules[0].proto", "any | icmp | tcp | udp"),
    ({"rules": [{**GOOD, "proto": "TCP"}]}, "policy.rules[0].proto", "got 'TCP'"),
    ({"rules": [{**GOOD, "proto": 6}]}, "policy.rules[0].proto", "got 6"),
    ({"rules": [GOOD, GOOD, {**GOOD, "ports": "22"}]}, "policy.rules[2].ports", "expected a list"),
    ({"rules": [{**GOOD, "ports": []}]}, "policy.rules[0].ports", "non-empty list"),
    ({"rules": [{**GOOD, "ports": [0]}]}, "policy.rules[0].ports[0]", "got 0"),
    ({"rules": [{**GOOD, "ports": [22, 65536]}]}, "policy.rules[0].ports[1]", "got 65536"),
    ({"rules": [{**GOOD, "ports": ["22"]}]}, "policy.rules[0].ports[0]", "got '22' (a quoted"),
    ({"rules": [{**GOOD, "ports": [True]}]}, "policy.rules[0].ports[0]", "got true (a boolean)"),
    ({"rules": [{**GOOD, "ports": [22.0]}]}, "policy.rules[0].ports[0]", "got 22.0"),
    ({"rules": [{**GOOD, "ports": ["100-10"]}]}, "policy.rules[0].ports[0]", "lo <= hi"),
    ({"rules": [{**GOOD, "ports": ["0-10"]}]}, "policy.rules[0].ports[0]", "1..65535"),
    ({"rules": [{**GOOD, "ports": ["1-99999"]}]}, "policy.rules[0].ports[0]", "1..65535"),
    ({"rules": [{**GOOD, "ports": ["1 - 9"]}]}, "policy.rules[0].ports[0]", '"lo-hi"'),
    ({"rules": [{**GOOD, "ports": ["1-2-3"]}]}, "policy.rules[0].ports[0]", '"lo-hi"'),
    ({"rules": [{**GOOD, "ports": [[1, 2]]}]}, "policy.rules[0].ports[0]", "got a list"),
    (
        {"rules": [{**GOOD, "proto": "icmp", "ports": [1]}]},
        "policy.rules[0].ports",
        "ports apply only to proto tcp or udp, not icmp",
    ),
    (
        {"rules": [{**GOOD, "proto": "any", "ports": [1]}]},
        "policy.rules[0].ports",
        "ports apply only to proto tcp or udp, not any",
    ),
    ({"rules": [{**GOOD, "from": "all"}]}, "policy.rules[0].from", "got 'all'"),
    ({"rules": [{**GOOD, "from": None}]}, "policy.rules[0].from", "got null"),
    # `from` is always a peer: a CIDR source is not a peer selector.
    ({"rules": [{**GOOD, "from": "10.0.0.0/8"}]}, "policy.rules[0].from", "got '10.0.0.0/8'"),
    ({"rules": [{**GOOD, "from": {}}]}, "policy.rules[0].from", "exactly one of"),
    (
        {"rules": [{**GOOD, "from": {"peer": "a", "group": "b"}}]},
        "policy.rules[0].from",
        "exactly one of groups, group or peer",
    ),
    ({"rules": [{**GOOD, "from": {"host": "a"}}]}, "policy.rules[0].from.host", "unknown key"),
    (
        {"rules": [{**GOOD, "from": {"groups": "eng"}}]},
        "policy.rules[0].from.groups",
        "expected a list",
    ),
    ({"rules": [{**GOOD, "from": {"groups": []}}]}, "policy.rules[0].from.groups", "non-empty"),
    (
        {"rules": [{**GOOD, "from": {"groups": ["eng", "Ops"]}}]},
        "policy.rules[0].from.groups[1]",
        "got 'Ops'; did you mean 'ops'?",
    ),
    (
        {"rules": [{**GOOD, "from": {"groups": ["-eng"]}}]},
        "policy.rules[0].from.groups[0]",
        "expected a group name",
    ),
    (
        {"rules": [{**GOOD, "from": {"group": "g" * 64}}]},
        "policy.rules[0].from.group",
        "1-63",
    ),
    (
        {"rules": [{**GOOD, "from": {"peer": "a_b"}}]},
        "policy.rules[0].from.peer",
        "expected a peer name",
    ),
    (
        {"rules": [{**GOOD, "from": {"peer": "Alice "}}]},
        "policy.rules[0].from.peer",
        "did you mean 'alice'?",
    ),
    ({"rules": [{**GOOD, "from": {"peer": "a.b"}}]}, "policy.rules[0].from.peer", "got 'a.b'"),
    ({"rules": [{**GOOD, "from": {"peer": 7}}]}, "policy.rules[0].from.peer", "got 7"),
    ({"rules": [{**GOOD, "to": "10.0.0.1/8"}]}, "policy.rules[0].to", "did you mean '10.0.0.0/8'"),
    ({"rules": [{**GOOD, "to": "lan"}]}, "policy.rules[0].to", "expected a network"),
    ({"rules": [{**GOOD, "to": ["10.0.0.0/8"]}]}, "policy.rules[0].to", "got a list"),
    ({"rules": [{**GOOD, "to": {"peer": "B"}}]}, "policy.rules[0].to.peer", "did you mean 'b'?"),
    ({"conntrack": {"tcp": 1}}, "policy.conntrack.tcp", "did you mean 'tcp_timeout'?"),
    ({"conntrack": {"tcp_timeout": 0}}, "policy.conntrack.tcp_timeout", "> 0"),
    ({"conntrack": {"udp_timeout": "3m"}}, "policy.conntrack.udp_timeout", "got '3m'"),
    ({"conntrack": {"icmp_timeout": 10**9}}, "policy.conntrack.icmp_timeout", "<= 604800"),
    ({"conntrack": []}, "policy.conntrack", "expected a mapping"),
    (
        {"conntrack": {"max_flows_per_peer": 0}},
        "policy.conntrack.max_flows_per_peer",
        "1..16777216",
    ),
    ({"conntrack": {"max_flows_per_peer": "lots"}}, "policy.conntrack.max_flows_per_peer", "lots"),
]


@pytest.mark.parametrize(("policy", "path", "fragment"), INVALID_RULES)
def test_invalid_policy(policy: object, path: str, fragment: str) -> None:
    err = policy_error(policy)
    assert err.path == path
    assert fragment in err.detail
    assert str(err) == f"{SOURCE}: {path}: {err.detail}"


# --- policy in its own file ------------------------------------------------------------

POLICY_YAML = """\
conntrack: {udp_timeout: 60}
rules:
  - from: {groups: [eng]}
    to: 10.0.0.0/8
    proto: tcp
    ports: [22]
"""


def test_policy_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "fw.yaml").write_text(POLICY_YAML)
    policy = policy_of("rules/fw.yaml", tmp_path)
    assert policy.source == str(tmp_path / "rules" / "fw.yaml")
    assert policy.conntrack.udp_timeout == 60.0
    assert policy.rules == (
        RuleConfig(
            GroupMatch(frozenset({"eng"})),
            NetworkMatch(ipaddress.IPv4Network("10.0.0.0/8")),
            Proto.TCP,
            ((22, 22),),
        ),
    )


def test_policy_file_errors_name_the_file_and_the_path_inside_it(tmp_path: Path) -> None:
    (tmp_path / "fw.yaml").write_text(POLICY_YAML.replace("[22]", "[22, 0]"))
    err = policy_error("fw.yaml", tmp_path)
    assert err.source == str(tmp_path / "fw.yaml")
    assert err.path == "rules[0].ports[1]"
    assert str(err).startswith(f"{tmp_path / 'fw.yaml'}: rules[0].ports[1]: expected a port")


def test_missing_policy_file_is_named_by_the_policy_key(tmp_path: Path) -> None:
    err = policy_error("nope.yaml", tmp_path)
    assert err.source == SOURCE
    assert err.path == "policy"
    assert f"{tmp_path / 'nope.yaml'}: No such file or directory" in err.detail


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("", "", "the file is empty"),
        ("- a\n", "", "expected a mapping"),
        ("rules: []\nrules: []\n", "rules", "duplicate key 'rules' at line 2 (first at line 1)"),
        ("rules: [\n", "", "invalid YAML"),
        ("rules: []\nextra: 1\n", "extra", "unknown key"),
    ],
)
def test_bad_policy_file(tmp_path: Path, text: str, path: str, fragment: str) -> None:
    (tmp_path / "fw.yaml").write_text(text)
    err = policy_error("fw.yaml", tmp_path)
    assert err.source == str(tmp_path / "fw.yaml")
    assert err.path == path
    assert fragment in err.detail


def test_policy_file_cannot_chain_to_another_file(tmp_path: Path) -> None:
    (tmp_path / "fw.yaml").write_text('"other.yaml"\n')
    err = policy_error("fw.yaml", tmp_path)
    assert err.path == ""
    assert "expected a mapping" in err.detail


def test_policy_path_to_a_device_is_refused(tmp_path: Path) -> None:
    err = policy_error("/dev/zero", tmp_path)
    assert err.path == "policy"
    assert "is not a regular file" in err.detail


def test_load_policy_standalone(tmp_path: Path) -> None:
    (tmp_path / "fw.yaml").write_text(POLICY_YAML)
    assert len(load_policy(tmp_path / "fw.yaml").rules) == 1
    with pytest.raises(ConfigError, match="cannot load the policy"):
        load_policy(tmp_path / "missing.yaml")


def test_example_policy_loads() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "policy.yaml"
    policy = load_policy(example)
    assert len(policy.rules) >= 3
    protos = {rule.proto for rule in policy.rules}
    assert {Proto.TCP, Proto.UDP, Proto.ICMP} <= protos
