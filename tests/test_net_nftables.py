"""nftables rendering, name sanitising, and the nft runner's error mapping (via a stand-in nft)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import stat
from pathlib import Path

import pytest

from vpnd.config.schema import (
    AnyMatch,
    GroupMatch,
    NetworkMatch,
    PolicyConfig,
    Proto,
    RuleConfig,
    Target,
)
from vpnd.net.errors import NetError
from vpnd.net.nftables import (
    NftablesRuleset,
    parse_counters,
    policy_hosts,
    poll_counters,
    render_anti_spoof,
    render_forward_filter,
    render_input_filter,
    render_masquerade,
    render_sets,
    table_name,
)

N = ipaddress.ip_network
A = ipaddress.ip_address


@pytest.mark.parametrize(
    ("ifname", "expected"),
    [("vpn0", "vpnd_vpn0"), ("tun_a", "vpnd_tun_a"), ("VPN9", "vpnd_VPN9")],
)
def test_table_name_plain(ifname: str, expected: str) -> None:
    assert table_name(ifname) == expected


def test_table_name_sanitised_without_collisions() -> None:
    a, b, c = table_name("vpn-0"), table_name("vpn.0"), table_name("vpn_0")
    assert a.startswith("vpnd_vpn_0_") and b.startswith("vpnd_vpn_0_")
    assert len({a, b, c}) == 3
    for name in (a, b):
        assert name.replace("_", "").isalnum()


@pytest.mark.parametrize("bad", ["", "a" * 16, "vpn 0", 'x"; flush ruleset', "..", "a/b"])
def test_bad_interface_names_refused(bad: str) -> None:
    with pytest.raises(NetError, match="interface name invalid"):
        table_name(bad)
    with pytest.raises(NetError, match="interface name invalid"):
        NftablesRuleset(bad)
    with pytest.raises(NetError, match="interface name invalid"):
        render_anti_spoof(bad)


def test_render_pieces() -> None:
    sets = render_sets([ipaddress.ip_address("10.8.0.2"), N("10.9.0.0/24"), N("fd00::2/128")])
    assert (
        "set allowed4 { type ipv4_addr; flags interval; elements = { 10.8.0.2/32, 10.9.0.0/24 }; }"
        in sets
    )
    assert "set allowed6 { type ipv6_addr; flags interval; elements = { fd00::2/128 }; }" in sets
    assert "elements" not in render_sets()
    spoof = render_anti_spoof("vpn0")
    assert 'iifname "vpn0" ip saddr != @allowed4 counter drop' in spoof
    assert 'iifname "vpn0" ip6 saddr != @allowed6 counter drop' in spoof
    assert "priority raw" in spoof
    masq = render_masquerade("vpn0", [N("10.8.0.0/24"), N("fd00::/64")])
    assert 'ip saddr 10.8.0.0/24 oifname != "vpn0" masquerade' in masq
    assert 'ip6 saddr fd00::/64 oifname != "vpn0" masquerade' in masq


def test_render_and_transaction() -> None:
    fw = NftablesRuleset("vpn0")
    body = fw.render(overlays=[N("10.8.0.0/24")], masquerade=False)
    assert "masquerade" not in body and "antispoof" in body
    assert "antispoof" not in fw.render(overlays=[N("10.8.0.0/24")], anti_spoof=False)
    tx = fw.transaction(body)
    lines = tx.splitlines()
    assert lines[:3] == [
        "table inet vpnd_vpn0",
        "delete table inet vpnd_vpn0",
        "table inet vpnd_vpn0 {",
    ]
    assert lines[-1] == "}"


def fake_nft(tmp_path: Path, script: str) -> str:
    """A stand-in `nft` that logs its stdin, then runs ``script`` (sh) with it in ``$in``."""
    path = tmp_path / "nft"
    log = tmp_path / "stdin.log"
    path.write_text(f'#!/bin/sh\nin=$(cat)\nprintf "%s\\n--\\n" "$in" >> "{log}"\n{script}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_install_remove_and_elements_feed_nft(tmp_path: Path) -> None:
    fw = NftablesRuleset("vpn0", nft=fake_nft(tmp_path, "exit 0"))

    await fw.install(fw.render(overlays=[N("10.8.0.0/24")]))
    await fw.add_sources([ipaddress.ip_address("10.8.0.2"), N("fd00::/64")])
    await fw.delete_sources([ipaddress.ip_address("10.8.0.2")])
    await fw.add_sources([])  # nothing to do: nft not run
    await fw.remove()
    runs = (tmp_path / "stdin.log").read_text().split("--\n")[:-1]
    assert len(runs) == 4
    assert runs[0].startswith("table inet vpnd_vpn0\ndelete table inet vpnd_vpn0\n")
    assert runs[1] == (
        "add element inet vpnd_vpn0 allowed4 { 10.8.0.2/32 }\n"
        "add element inet vpnd_vpn0 allowed6 { fd00::/64 }\n"
    )
    assert runs[2] == "delete element inet vpnd_vpn0 allowed4 { 10.8.0.2/32 }\n"
    assert runs[3] == "table inet vpnd_vpn0\ndelete table inet vpnd_vpn0\n"


async def test_nft_failure_becomes_one_line_net_error(tmp_path: Path) -> None:
    nft = fake_nft(
        tmp_path,
        "echo '/dev/stdin:4:17-17: Error: syntax error, unexpected }' >&2\n"
        "echo 'chain x { bogus }' >&2\nexit 1",
    )
    fw = NftablesRuleset("vpn0", nft=nft)
    with pytest.raises(NetError) as info:
        await fw.install("chain x { bogus }\n")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        "install table vpnd_vpn0: nft failed: /dev/stdin:4:17-17: Error: syntax error, unexpected }"
    )


async def test_deleting_missing_elements_is_fine(tmp_path: Path) -> None:
    # Fails any batch naming 10.8.0.7, the way nft does; others succeed.
    nft = fake_nft(
        tmp_path,
        'case "$in" in *10.8.0.7*) echo "Error: element does not exist" >&2; exit 1;; esac',
    )
    fw = NftablesRuleset("vpn0", nft=nft)
    await fw.delete_sources([ipaddress.ip_address("10.8.0.7"), ipaddress.ip_address("10.8.0.2")])
    runs = (tmp_path / "stdin.log").read_text().split("--\n")[:-1]
    # One failed batch, then each element alone; the missing one is tolerated.
    assert len(runs) == 3
    assert "10.8.0.2" in runs[2]


async def test_other_delete_failures_still_raise(tmp_path: Path) -> None:
    fw = NftablesRuleset(
        "vpn0",
        nft=fake_nft(
            tmp_path, "echo 'Error: Could not process rule: Permission denied' >&2; exit 1"
        ),
    )
    with pytest.raises(NetError, match="Permission denied"):
        await fw.delete_sources([ipaddress.ip_address("10.8.0.2")])


async def test_missing_nft_binary(tmp_path: Path) -> None:
    fw = NftablesRuleset("vpn0", nft=str(tmp_path / "no-such-nft"))
    with pytest.raises(NetError, match=r"not found \(apt-get install nftables\)"):
        await fw.remove()


async def test_hung_nft_is_bounded(tmp_path: Path) -> None:
    fw = NftablesRuleset("vpn0", nft=fake_nft(tmp_path, "exec sleep 30"), timeout=0.2)
    with pytest.raises(NetError, match=r"did not finish within 0\.2s"):
        await fw.remove()


def _chain(text: str) -> list[str]:
    """A chain's rule lines, in order, without the hook line and braces."""
    return [ln.strip() for ln in text.splitlines()[2:-1]]


def test_forward_filter_only_tun_traffic_and_tracked_replies() -> None:
    rules = _chain(
        render_forward_filter(
            "vpn0", [N("10.8.0.0/24"), N("fd00:8::/64")], [N("192.168.50.0/24"), N("fd00:50::/64")]
        )
    )
    drop = 'counter name "forward_dropped" drop'
    # Order is the spec: the TUN's traffic first (userspace anti-spoofing + policy judged
    # it), then only tracked replies into the TUN, then the drops.
    assert rules == [
        'iifname "vpn0" accept',
        'oifname "vpn0" ct state established,related accept',
        f'oifname "vpn0" {drop}',
        f"ip saddr {{ 10.8.0.0/24 }} {drop}",
        f"ip6 saddr {{ fd00:8::/64 }} {drop}",
        "ip daddr { 192.168.50.0/24 } ct state established,related accept",
        f"ip daddr {{ 192.168.50.0/24 }} {drop}",
        "ip6 daddr { fd00:50::/64 } ct state established,related accept",
        f"ip6 daddr {{ fd00:50::/64 }} {drop}",
    ]
    head = render_forward_filter("vpn0", [], [])
    # A base chain of our own with policy accept: other forwarding is not ours to judge.
    assert "type filter hook forward priority filter; policy accept;" in head
    assert _chain(head) == rules[:3]


def test_input_filter_reaches_only_overlay_and_exact_hosts() -> None:
    rules = _chain(render_input_filter("vpn0", [A("10.8.0.1"), A("fd00:8::1")]))
    assert rules == [
        'iifname != "vpn0" accept',  # the underlay (TLS, keepalives, ssh) is untouched
        "ct state established,related accept",
        "ip daddr { 10.8.0.1 } accept",
        "ip6 daddr { fd00:8::1 } accept",
        "ip daddr @hosts4 accept",
        "ip6 daddr @hosts6 accept",
        'counter name "input_dropped" drop',
    ]
    with pytest.raises(NetError, match="interface name invalid"):
        render_input_filter('x"; flush ruleset', [])
    with pytest.raises(NetError, match="interface name invalid"):
        render_forward_filter('x"; flush ruleset', [], [])


def _rule(to: Target) -> RuleConfig:
    return RuleConfig(from_=AnyMatch(), to=to, proto=Proto.TCP)


def test_policy_hosts_are_only_exact_host_rules() -> None:
    policy = PolicyConfig(
        rules=(
            _rule(NetworkMatch(N("192.168.50.0/24"))),  # a subnet grants no gateway address
            _rule(NetworkMatch(N("192.168.50.1/32"))),
            _rule(NetworkMatch(N("192.168.50.1/32"))),  # listed once
            _rule(NetworkMatch(N("fd00:50::1/128"))),
            _rule(NetworkMatch(N("fd00:50::/64"))),
            _rule(AnyMatch()),
            _rule(GroupMatch(frozenset({"eng"}))),
        )
    )
    assert policy_hosts(policy) == [A("192.168.50.1"), A("fd00:50::1")]
    assert policy_hosts(PolicyConfig()) == []


def test_render_gateway_filter_and_host_sets() -> None:
    fw = NftablesRuleset("vpn0")
    plain = fw.render(overlays=[N("10.8.0.0/24")])
    assert "chain forward" not in plain and "chain input" not in plain
    body = fw.render(
        overlays=[N("10.8.0.0/24")],
        forward_filter=True,
        input_filter=True,
        pushed=[N("192.168.50.0/24")],
        gateway_addresses=[A("10.8.0.1")],
        hosts=[A("192.168.50.1"), A("fd00::1")],
    )
    assert "set hosts4 { type ipv4_addr; elements = { 192.168.50.1 }; }" in body
    assert "set hosts6 { type ipv6_addr; elements = { fd00::1 }; }" in body
    assert "counter forward_dropped { }" in body and "counter input_dropped { }" in body
    assert "chain forward {" in body and "chain input {" in body
    # Input filter without forwarding (forwarding: false still guards the host itself).
    only_input = fw.render(overlays=[N("10.8.0.0/24")], input_filter=True)
    assert "chain input {" in only_input and "chain forward" not in only_input
    assert fw.hosts_transaction([A("192.168.50.2"), N("fd00::2/128")]) == (
        "flush set inet vpnd_vpn0 hosts4\n"
        "flush set inet vpnd_vpn0 hosts6\n"
        "add element inet vpnd_vpn0 hosts4 { 192.168.50.2 }\n"
        "add element inet vpnd_vpn0 hosts6 { fd00::2 }\n"
    )


async def test_counters_parsed_from_nft_json(tmp_path: Path) -> None:
    doc = (
        '{"nftables": [{"metainfo": {"version": "1.0.6"}}, '
        '{"counter": {"family": "inet", "name": "forward_dropped", "table": "vpnd_vpn0", '
        '"handle": 5, "packets": 17, "bytes": 680}}, '
        '{"counter": {"name": "input_dropped", "packets": 2, "bytes": 80}}]}'
    )
    assert parse_counters(doc) == {"forward_dropped": 17, "input_dropped": 2}
    assert parse_counters("not json") == {}
    assert parse_counters('{"nftables": 3}') == {}
    assert parse_counters("[1]") == {}
    out = tmp_path / "out.json"
    out.write_text(doc)
    fw = NftablesRuleset("vpn0", nft=fake_nft(tmp_path, f'cat "{out}"'))
    assert await fw.counters() == {"forward_dropped": 17, "input_dropped": 2}


async def test_poll_counters_feeds_sink_and_survives_a_failed_read(tmp_path: Path) -> None:
    # First read fails (nft not there for a moment), the next ones succeed.
    flag = tmp_path / "failed-once"
    nft = fake_nft(
        tmp_path,
        f'if [ ! -e "{flag}" ]; then touch "{flag}"; echo "Error: boom" >&2; exit 1; fi\n'
        'echo \'{"nftables": [{"counter": {"name": "forward_dropped", "packets": 4}}]}\'',
    )
    fw = NftablesRuleset("vpn0", nft=nft)
    seen: list[dict[str, int]] = []

    done = asyncio.Event()

    def sink(c: dict[str, int]) -> None:
        seen.append(c)
        if len(seen) == 2:
            done.set()

    task = asyncio.create_task(poll_counters(fw, sink, interval=0))
    await asyncio.wait_for(done.wait(), 20)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert seen == [{"forward_dropped": 4}, {"forward_dropped": 4}]
