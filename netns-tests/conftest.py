"""netns suite gate: needs root; without it, skip loudly (but fail under CI=true)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from nslib import NetnsFactory
from vpnlab import Lab


def _is_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    msg = (
        "\n" + "!" * 78 + "\n"
        "!! netns-tests NEED ROOT: they create network namespaces, TUN devices and routes.\n"
        "!! Not running as root, so every netns test is SKIPPED. Run `sudo make test`.\n" + "!" * 78
    )
    if _is_ci():
        pytest.exit(msg + "\n!! CI=true: a skip for lack of root is a FAILURE.", returncode=1)
    print(msg, file=sys.stderr)
    skip = pytest.mark.skip(reason="netns tests need root (see the notice above)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    """Makes throwaway ``vpnt-`` namespaces; deletes them (and their processes) even when
    the test fails, then verifies nothing survived."""
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        problems = factory.cleanup()
    assert not problems, f"netns teardown problems: {problems}"
    factory.assert_clean()


@pytest.fixture
def lab(netns_factory: NetnsFactory) -> Iterator[Lab]:
    """The standard topology (gateway + LAN host, laptops alice, bob, mallory), with a
    CA and the gateway's certificate; every daemon and namespace removed afterwards."""
    lab = Lab(netns_factory)
    lab.build()
    lab.make_pki()
    try:
        yield lab
    finally:
        problems = lab.cleanup()
        assert not problems, problems
