"""vpnctl deploy: bounded concurrency, dry run, idempotency, per-host failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_vpnctl
from provision_fixtures import FakeHost, Setup, provisioning, tree

pytestmark = pytest.mark.usefixtures("vpnctl_clean_env")


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    with provisioning(tmp_path) as setup:
        yield setup


def hosts_file(
    s: Setup, host: FakeHost, names: list[str], file: str = "hosts.yaml", **extra: object
) -> Path:
    data: dict[str, object] = {
        "gateway_address": "10.0.0.1:4443",
        "server_name": "gw.test",
        "identity": str(s.identity),
        "known_hosts": str(s.known_hosts),
        "hosts": [
            {
                "name": n,
                "ssh": host.target,
                "groups": ["web"],
                "remote_dir": str(s.remote / n),
            }
            for n in names
        ],
        **extra,
    }
    path = s.tmp / file
    path.write_text(yaml.safe_dump(data))
    return path


def deploy(s: Setup, path: Path, *extra: str) -> tuple[int, str, str]:
    return run_vpnctl("--pki", str(s.pki.path), "deploy", str(path), *extra)


def results(out: str) -> dict[str, str]:
    """NAME -> RESULT cell of the final table."""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TARGET", "RESULT"], out
    rows = {}
    for line in lines[1:]:
        if line.startswith("dry run:"):
            continue
        name, _target, cell = line.split(None, 2)
        rows[name] = cell
    return rows


def test_concurrency_bound_is_reached_and_respected(s: Setup) -> None:
    host = s.new_host()
    host.rendezvous = 2
    names = [f"web{i}" for i in range(5)]
    code, out, err = deploy(s, hosts_file(s, host, names), "--concurrency", "2")
    assert code == 0, err
    assert host.stats.max_active == 2
    assert host.stats.connections == 5
    assert {n: r.split(":")[0] for n, r in results(out).items()} == dict.fromkeys(names, "enrolled")
    assert len(s.pki.list_certificates()) == 5
    assert all(c.record.delivered for c in s.pki.list_certificates())


def test_dry_run_changes_nothing(s: Setup) -> None:
    host = s.new_host()
    path = hosts_file(s, host, ["web1", "web2"])
    code, out, err = deploy(s, path, "--dry-run")
    assert code == 0, err
    assert set(results(out).values()) == {
        "would enroll: no web1.pem on the host",
        "would enroll: no web2.pem on the host",
    }
    assert tree(s.remote) == {} and s.pki.list_certificates() == []
    # Now one host really enrolled, so the next dry run has a "keep" and a "would enroll".
    code, _, err = deploy(s, hosts_file(s, host, ["web1"], file="one.yaml"))
    assert code == 0, err
    remote_before = tree(s.remote)
    inventory_before = s.pki.inventory_path.read_bytes()
    # Records, not days_left: that is derived from the wall clock and may tick over.
    records_before = [c.record for c in s.pki.list_certificates()]
    commands_before = len(host.stats.commands)

    code, out, err = deploy(s, path, "--dry-run", "--renew-within", "0")
    assert code == 0, err
    rows = results(out)
    assert rows["web1"].startswith("unchanged")
    assert rows["web2"].startswith("would enroll")
    code, out, err = deploy(s, path, "--dry-run", "--renew-within", "365")
    assert code == 0, err
    assert results(out)["web1"].startswith("would renew: expires in")
    assert "dry run: nothing was changed" in out

    assert tree(s.remote) == remote_before
    assert s.pki.inventory_path.read_bytes() == inventory_before
    assert [c.record for c in s.pki.list_certificates()] == records_before
    # Inspection reads public files over SFTP; a dry run runs no command at all.
    assert host.stats.commands[commands_before:] == []


def test_deploy_is_idempotent_and_renews_inside_the_window(s: Setup) -> None:
    host = s.new_host()
    path = hosts_file(s, host, ["web1", "web2"])
    code, out, err = deploy(s, path)
    assert code == 0, err
    assert {r.split(":")[0] for r in results(out).values()} == {"enrolled"}
    key1 = (s.remote / "web1" / "web1.key").read_bytes()
    serials1 = {c.record.serial for c in s.pki.list_certificates()}

    code, out, err = deploy(s, path)
    assert code == 0, err
    assert {r.split(":")[0] for r in results(out).values()} == {"unchanged"}
    assert (s.remote / "web1" / "web1.key").read_bytes() == key1
    assert {c.record.serial for c in s.pki.list_certificates()} == serials1

    code, out, err = deploy(s, path, "--renew-within", "100")  # certificates live 90 days
    assert code == 0, err
    rows = results(out)
    assert all(r.startswith("renewed: serial") and "expires in" in r for r in rows.values())
    assert (s.remote / "web1" / "web1.key").read_bytes() != key1  # a new key
    listed = s.pki.list_certificates()
    assert len(listed) == 4 and all(c.record.delivered for c in listed)
    # Renewal kept each host's address.
    by_name: dict[str, set[str]] = {}
    for c in listed:
        by_name.setdefault(c.record.name, set()).update(str(a) for a in c.record.addresses)
    assert all(len(addrs) == 1 for addrs in by_name.values())


def test_changed_groups_renew(s: Setup) -> None:
    host = s.new_host()
    code, _, err = deploy(s, hosts_file(s, host, ["web1"]))
    assert code == 0, err
    data = yaml.safe_load((s.tmp / "hosts.yaml").read_text())
    data["hosts"][0]["groups"] = ["db"]
    (s.tmp / "hosts.yaml").write_text(yaml.safe_dump(data))
    code, out, err = deploy(s, s.tmp / "hosts.yaml")
    assert code == 0, err
    assert "groups differ" in results(out)["web1"]


def test_one_failing_host_fails_the_run_but_not_the_others(s: Setup) -> None:
    good = s.new_host()
    stranger = s.new_host(trusted=False)
    path = hosts_file(s, good, ["web1"])
    data = yaml.safe_load(path.read_text())
    data["hosts"].append(
        {"name": "web2", "ssh": stranger.target, "remote_dir": str(s.remote / "web2")}
    )
    path.write_text(yaml.safe_dump(data))
    code, out, err = deploy(s, path)
    assert code == 1
    rows = results(out)
    assert rows["web1"].startswith("enrolled")
    assert rows["web2"].startswith("failed: host key of") and "unknown" in rows["web2"]
    assert err.splitlines() == ["vpnctl: error: 1 of 2 hosts failed"]


def test_revoked_host_is_not_silently_reenrolled(s: Setup) -> None:
    host = s.new_host()
    path = hosts_file(s, host, ["web1"])
    assert deploy(s, path)[0] == 0
    s.pki.revoke(name="web1")
    code, out, _ = deploy(s, path)
    assert code == 1
    assert "is revoked" in results(out)["web1"]
    assert len(s.pki.list_certificates()) == 1


def test_bad_hosts_file_is_a_usage_error(s: Setup) -> None:
    path = s.tmp / "hosts.yaml"
    path.write_text("hosts:\n  - name: web1\n    ssh: root@h:0\n")
    code, _, err = deploy(s, path)
    assert code == 2
    assert err.splitlines() == [
        f"vpnctl: error: {path}: hosts[0] (web1).ssh: 'root@h:0': port '0' is not a number 1..65535"
    ]
