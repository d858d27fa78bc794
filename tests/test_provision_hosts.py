"""Hosts-file validation, SSH target parsing and the remote layout (pure, no SSH)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vpnctl.hosts_file import HostEntry, HostsFileError, load_hosts_file
from vpnctl.remote_layout import LayoutError, check_remote_dir
from vpnctl.ssh_target import SshTarget, TargetError, parse_ssh_target


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hosts.yaml"
    path.write_text(text)
    return path


def test_defaults_apply_and_paths_resolve(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
gateway_address: vpn.example.net:4443
server_name: vpn.example.net
identity: keys/id
jump: admin@bastion
hosts:
  - name: Web1
    ssh: root@10.0.0.5:2222
    groups: [web, Prod]
    ip: 10.8.0.10
  - name: db1
    ssh: db1.example.net
    ip: [10.8.0.11, 10.8.0.12]
    known_hosts: ~/kh
    jump: other@jump2:2200
    remote_dir: /opt/vpnd/
""",
    )
    web, db = load_hosts_file(path)
    assert web == HostEntry(
        name="web1",
        ssh=SshTarget("10.0.0.5", 2222, "root"),
        groups=("web", "prod"),
        addresses=(ipaddress.ip_address("10.8.0.10"),),
        identity=tmp_path / "keys" / "id",
        jump=SshTarget("bastion", 22, "admin"),
        gateway_address="vpn.example.net:4443",
        server_name="vpn.example.net",
    )
    assert db.remote_dir == "/opt/vpnd"
    assert db.known_hosts == Path("~/kh").expanduser()
    assert db.jump == SshTarget("jump2", 2200, "other")
    assert len(db.addresses) == 2 and db.groups == ()


HOST = "    ssh: root@h\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: a\n", ": expected a mapping with a 'hosts:' list (and optional defaults)"),
        ("gateway_address: g:1\n", ": no 'hosts:' list"),
        ("hosts: []\n", ": hosts: expected a non-empty list of hosts"),
        ("hosts:\n  - web1\n", ": hosts[0]: expected a mapping with at least name and ssh"),
        ("hosts:\n  - name: web1\n", ": hosts[0] (web1): 'ssh' is required"),
        ("hosts:\n  - ssh: root@h\n", ": hosts[0]: 'name' is required"),
        (
            "hosts:\n  - name: web1\n" + HOST + "    colour: red\n",
            ": hosts[0] (web1): unknown key 'colour'; allowed: name, ssh, groups, ip, "
            "gateway_address, server_name, known_hosts, identity, jump, remote_dir",
        ),
        (
            "hosts:\n  - name: web.1\n" + HOST,
            ": hosts[0] (web.1).name: peer name 'web.1' is invalid",
        ),
        (
            "hosts:\n  - name: web1\n    ssh: 'root@h x'\n",
            ": hosts[0] (web1).ssh: 'root@h x' is not an SSH target",
        ),
        (
            "hosts:\n  - name: web1\n" + HOST + "    ip: 10.8.0\n",
            ": hosts[0] (web1).ip: '10.8.0' is not an IP address",
        ),
        (
            "hosts:\n  - name: web1\n" + HOST + "    groups: {a: 1}\n",
            ": hosts[0] (web1).groups: expected text, got dict",
        ),
        (
            "hosts:\n  - name: web1\n" + HOST + "    remote_dir: vpnd\n",
            ": hosts[0] (web1).remote_dir: remote dir 'vpnd' must be an absolute path",
        ),
        (
            "server_name: gw\nhosts:\n  - name: web1\n" + HOST,
            ": hosts[0] (web1): the gateway address is missing",
        ),
        (
            "server_name: gw\ngateway_address: gw\nhosts:\n  - name: web1\n" + HOST,
            ": hosts[0] (web1): gateway address 'gw': expected \"host:port\"",
        ),
        (
            "jump: 'a b'\nhosts:\n  - name: web1\n" + HOST,
            ": jump: 'a b' is not an SSH target",
        ),
        (
            "hosts:\n  - name: web1\n" + HOST + "  - name: WEB1\n    ssh: root@g\n",
            ": hosts[1] (WEB1): name 'web1' is already used by hosts[0] (web1)",
        ),
        (
            "hosts:\n  - name: web1\n" + HOST + "  - name: web2\n    ssh: admin@h:22\n",
            ": hosts[1] (web2): h:22:/etc/vpnd is already provisioned by hosts[0] (web1)",
        ),
        ("hosts:\n  - name: a\n    name: b\n" + HOST, "duplicate"),
        ("hosts: [\n", "invalid YAML"),
    ],
)
def test_errors_name_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HostsFileError) as caught:
        load_hosts_file(path)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(str(path))
    assert message in line, line


def test_unreadable_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(HostsFileError, match="cannot read"):
        load_hosts_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"hosts: \xff\xfe\n")
    with pytest.raises(HostsFileError, match="not UTF-8"):
        load_hosts_file(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", SshTarget("host", 22, None)),
        ("Root@Host.Example:2222", SshTarget("host.example", 2222, "Root")),
        ("10.0.0.1", SshTarget("10.0.0.1", 22, None)),
        ("a@[2001:db8::1]:2200", SshTarget("2001:db8::1", 2200, "a")),
        ("[2001:db8::1]", SshTarget("2001:db8::1", 22, None)),
        ("2001:db8::1", SshTarget("2001:db8::1", 22, None)),
    ],
)
def test_ssh_targets(text: str, expected: SshTarget) -> None:
    assert parse_ssh_target(text) == expected


def test_ssh_target_spelling() -> None:
    assert str(parse_ssh_target("a@[2001:db8::1]:2200")) == "a@[2001:db8::1]:2200"
    assert str(parse_ssh_target("host")) == "host:22"


@pytest.mark.parametrize(
    "text", ["", "a b", "@host", "u@", "host:", "host:0", "host:x", "[::1", "ho_st", "u!@h"]
)
def test_bad_ssh_targets(text: str) -> None:
    with pytest.raises(TargetError):
        parse_ssh_target(text)


@pytest.mark.parametrize("text", ["etc/vpnd", "/", "/etc/../x", "/etc/vp\nnd"])
def test_bad_remote_dirs(text: str) -> None:
    with pytest.raises(LayoutError):
        check_remote_dir(text)
