"""The rules of the house from ARCHITECTURE.md, checked on the source (imports only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IO_MODULES = {"asyncio", "socket", "pyroute2", "asyncssh", "scapy", "ssl", "selectors"}
PURE = ["vpnd/pki", "vpnd/proto", "vpnd/policy", "vpnd/config"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(rel: str) -> list[Path]:
    return sorted((ROOT / rel).rglob("*.py"))


@pytest.mark.parametrize("package", PURE)
def test_pure_layers_do_no_io(package: str) -> None:
    files = _files(package)
    assert files, f"{package} has no modules"
    for path in files:
        bad = {m for m in _imports(path) if m.split(".")[0] in IO_MODULES}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_control_messages_are_pure() -> None:
    for path in _files("vpnd/control"):
        if path.name in {"server.py", "client.py"}:
            continue  # the socket edges themselves
        bad = {m for m in _imports(path) if m.split(".")[0] in IO_MODULES}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_proto_does_not_import_pki() -> None:
    for path in _files("vpnd/proto"):
        bad = {m for m in _imports(path) if m.startswith("vpnd.pki")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_vpnctl_needs_no_kernel_libraries() -> None:
    allowed = (
        "vpnd.pki",
        "vpnd.control",
        "vpnd.config",
        "vpnd.files.atomic",
        "vpnd.files.passphrase",
        "vpnd",
    )
    for path in _files("vpnctl"):
        for mod in _imports(path):
            if mod.startswith("vpnd"):
                assert mod in allowed or mod.startswith(allowed[:3]), (
                    f"{path.relative_to(ROOT)} imports {mod}"
                )
            assert mod.split(".")[0] not in {"pyroute2", "scapy"}, (
                f"{path.relative_to(ROOT)} imports {mod}"
            )
