"""Canonical peer, group and DNS names."""

from __future__ import annotations

import pytest

from vpnd.pki import PkiError, canonical_dns_name, canonical_group, canonical_name


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("alice", "alice"),
        ("  Alice-01 \n", "alice-01"),
        ("0day", "0day"),
        ("a" * 63, "a" * 63),
        ("GW-PARIS", "gw-paris"),
    ],
)
def test_canonical_name_accepts(raw: str, want: str) -> None:
    assert canonical_name(raw) == want


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a/b", "invalid"),
        ("../etc", "invalid"),
        ("..", "invalid"),
        ("a.b", "invalid"),
        ("line\nbreak", "invalid"),
        ("a" * 64, "at most 63"),
        ("x" * 200, "at most 63"),
        ("zoë", "not ASCII"),
        ("-lead", "invalid"),
        ("under_score", "invalid"),
        ("with space", "invalid"),
        ("nul\x00", "invalid"),
    ],
)
def test_canonical_name_refuses(raw: str, fragment: str) -> None:
    with pytest.raises(PkiError) as err:
        canonical_name(raw)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
    assert len(message) < 200  # long input is shortened in the message


def test_canonical_name_refuses_non_string() -> None:
    with pytest.raises(PkiError, match="must be a string"):
        canonical_name(42)  # type: ignore[arg-type]


def test_canonical_group() -> None:
    assert canonical_group(" Ops_Team ") == "ops_team"
    assert canonical_group("db-admins") == "db-admins"
    for bad in ("", "_lead", "a.b", "a b", "g" * 64, "é", "a,b"):
        with pytest.raises(PkiError):
            canonical_group(bad)


def test_canonical_dns_name() -> None:
    assert canonical_dns_name("GW.Example.COM.") == "gw.example.com"
    assert canonical_dns_name("xn--bcher-kva.example") == "xn--bcher-kva.example"
    for bad in (
        "",
        "*.example.com",
        "a..b",
        "-a.example",
        "a-.example",
        "bücher.de",
        "a" * 64,
        "a_b.c",
    ):
        with pytest.raises(PkiError):
            canonical_dns_name(bad)
    with pytest.raises(PkiError, match="longer than 253"):
        canonical_dns_name(".".join(["a" * 60] * 5))
