"""Hypothesis profiles for the unit suite, chosen by ``HYPOTHESIS_PROFILE``.

- ``ci`` (the default): bounded and reproducible, so ``make test`` stays fast and never
  flakes. Tests that set their own ``max_examples`` keep it.
- ``fuzz`` (``make fuzz``): ``FUZZ_EXAMPLES`` examples (default 20,000) for *every*
  property test, including those that pin a small ``max_examples`` for ci, with the
  example database on so a finding replays on the next run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import (
    run_vpnctl,
    vpnctl_clean_env,  # noqa: F401  (a fixture: importing registers it)
)
from hypothesis import HealthCheck, Phase, settings

from vpnctl import cli

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20000"))

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,  # CI machines stall; speed is for benchmarks
    derandomize=True,
    database=None,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in {"ci", "fuzz"}:
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE must be ci or fuzz, not {PROFILE!r}")
settings.load_profile(PROFILE)


def _fuzz_shard() -> tuple[int, int]:
    text = os.environ.get("FUZZ_SHARD", "0/1")
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"FUZZ_SHARD must look like 0/2, not {text!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"FUZZ_SHARD {text!r}: the index must be below the count")
    return index, count


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if PROFILE != "fuzz":
        return
    # A fuzz run is only the property tests, optionally one round-robin shard of them
    # (FUZZ_SHARD=i/n) so `make fuzz` can use every core.
    index, count = _fuzz_shard()
    props = [i for i in items if getattr(getattr(i, "obj", None), "is_hypothesis_test", False)]
    keep = props[index::count]
    dropped = [i for i in items if i not in keep]
    items[:] = keep
    config.hook.pytest_deselected(items=dropped)
    # An explicit @settings(max_examples=...) outranks any profile, so the fuzz run
    # raises it per test; the attribute is the one hypothesis itself reads at run time.
    for item in items:
        test = getattr(item, "obj", None)
        if not getattr(test, "is_hypothesis_test", False):
            continue
        current = test._hypothesis_internal_use_settings  # type: ignore[union-attr]
        if current.max_examples < FUZZ_EXAMPLES:
            test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
                current,
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                suppress_health_check=[
                    *current.suppress_health_check,
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                ],
            )


# ---- vpnctl CLI tests ----


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CA (10.8.0.0/24) in tmp_path/pki, also set as $VPNCTL_PKI."""
    path = tmp_path / "pki"
    code, _, err = run_vpnctl(
        "--pki", str(path), "ca", "init", "--name", "test-ca", "--network", "10.8.0.0/24"
    )
    assert code == 0, err
    monkeypatch.setenv(cli.ENV_PKI, str(path))
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path
