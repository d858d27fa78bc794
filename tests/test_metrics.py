"""The Prometheus endpoint: scrape over loopback HTTP and parse the exposition text."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vpnd.telemetry.metrics import CertExpiry, MetricsError, MetricsExporter, MetricsSnapshot

SNAP = MetricsSnapshot(
    sessions=3,
    handshakes={"accepted": 7, "refused_revoked": 2, "refused_crl_stale": 1},
    bytes_in=1000,
    bytes_out=2000,
    packets_in=10,
    packets_out=20,
    drops={"spoofed_source": 4, "no_route": 1},
    cert_expiry=(
        CertExpiry("own", "gw1", 86400.0 * 90),
        CertExpiry("ca", "test-ca", 86400.0 * 365),
        CertExpiry("peer", "alice", -5.0),
    ),
    crl_next_update_seconds=3600.0,
    firewall={
        "allowed_new": 5,
        "allowed_tracked": 40,
        "dropped_policy_denied": 3,
        "entries": 2,
        "evicted": 1,
        "evicted_peer_limit": 6,
        "expired": 9,
    },
    enrollments={"issued": 3, "refused_used": 1},
    renewals={"issued": 20, "refused": 2},
    quarantines=1,
    supersedes=19,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


async def scrape(
    snapshot: Callable[[], MetricsSnapshot], *paths: str
) -> list[tuple[int, str, str]]:
    exporter = MetricsExporter("127.0.0.1", 0, snapshot)
    await exporter.start()
    try:
        assert exporter.port > 0
        return [await asyncio.to_thread(get, f"http://127.0.0.1:{exporter.port}{p}") for p in paths]
    finally:
        await exporter.close()


async def test_scrape_exposes_every_metric() -> None:
    calls: list[int] = []

    def snapshot() -> MetricsSnapshot:
        calls.append(1)
        return SNAP

    [(status, ctype, body)] = await scrape(snapshot, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert len(calls) == 1  # read at scrape time, once
    got = samples(body)
    expected: Samples = {
        ("vpnd_up", frozenset()): 1,
        ("vpnd_sessions", frozenset()): 3,
        ("vpnd_handshakes_total", frozenset({("result", "accepted"), ("reason", "")})): 7,
        ("vpnd_handshakes_total", frozenset({("result", "refused"), ("reason", "revoked")})): 2,
        ("vpnd_handshakes_total", frozenset({("result", "refused"), ("reason", "crl_stale")})): 1,
        ("vpnd_bytes_total", frozenset({("direction", "in")})): 1000,
        ("vpnd_bytes_total", frozenset({("direction", "out")})): 2000,
        ("vpnd_packets_total", frozenset({("direction", "in")})): 10,
        ("vpnd_packets_total", frozenset({("direction", "out")})): 20,
        ("vpnd_drops_total", frozenset({("reason", "spoofed_source")})): 4,
        ("vpnd_drops_total", frozenset({("reason", "no_route")})): 1,
        ("vpnd_certificate_expiry_seconds", frozenset({("kind", "own"), ("name", "gw1")})): 7776000,
        (
            "vpnd_certificate_expiry_seconds",
            frozenset({("kind", "ca"), ("name", "test-ca")}),
        ): 31536000,
        ("vpnd_certificate_expiry_seconds", frozenset({("kind", "peer"), ("name", "alice")})): -5,
        ("vpnd_crl_next_update_seconds", frozenset()): 3600,
        ("vpnd_clone_holddowns_total", frozenset()): 0,
        # The firewall's own counters; its drops are already in vpnd_drops_total.
        ("vpnd_firewall_allowed_total", frozenset({("how", "new")})): 5,
        ("vpnd_firewall_allowed_total", frozenset({("how", "tracked")})): 40,
        ("vpnd_conntrack_entries", frozenset()): 2,
        ("vpnd_conntrack_evicted_total", frozenset({("why", "table_full")})): 1,
        ("vpnd_conntrack_evicted_total", frozenset({("why", "peer_limit")})): 6,
        ("vpnd_conntrack_expired_total", frozenset()): 9,
        ("vpnd_enrollments_total", frozenset({("result", "issued")})): 3,
        ("vpnd_enrollments_total", frozenset({("result", "refused_used")})): 1,
        ("vpnd_renewals_total", frozenset({("result", "issued")})): 20,
        ("vpnd_renewals_total", frozenset({("result", "refused")})): 2,
        ("vpnd_renewals_total", frozenset({("result", "failed")})): 0,
        ("vpnd_quarantines_total", frozenset()): 1,
        ("vpnd_supersedes_total", frozenset()): 19,
    }
    assert got == expected


async def test_each_scrape_reads_a_fresh_snapshot() -> None:
    sessions = iter([1, 2])
    results = await scrape(lambda: MetricsSnapshot(sessions=next(sessions)), "/metrics", "/")
    values = [samples(body)[("vpnd_sessions", frozenset())] for _, _, body in results]
    assert values == [1, 2]
    # No CRL: the gauge is absent rather than a made-up number.
    assert "vpnd_crl_next_update_seconds" not in results[0][2]


async def test_failing_snapshot_reports_down() -> None:
    def broken() -> MetricsSnapshot:
        raise RuntimeError("gateway gone")

    [(status, _, body)] = await scrape(broken, "/metrics")
    assert status == 200
    assert samples(body) == {("vpnd_up", frozenset()): 0}


async def test_other_paths_and_methods() -> None:
    [(status, _, _)] = await scrape(lambda: SNAP, "/admin")
    assert status == 404

    exporter = MetricsExporter("127.0.0.1", 0, lambda: SNAP)
    await exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        post = await asyncio.to_thread(get, url, "POST")
        head = await asyncio.to_thread(get, url, "HEAD")
        garbage = await asyncio.to_thread(_raw, exporter.port, b"\x00\x01junk\r\n\r\n")
        huge = await asyncio.to_thread(_raw, exporter.port, b"GET /" + b"a" * 20000)
    finally:
        await exporter.close()
    assert (post[0], head[0]) == (405, 200)
    assert garbage.startswith(b"HTTP/1.1 405 ")
    assert huge.startswith(b"HTTP/1.1 400 ")  # a request head over 8 KiB


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_port_in_use_is_a_one_line_error() -> None:
    first = MetricsExporter("127.0.0.1", 0, lambda: SNAP)
    await first.start()
    try:
        second = MetricsExporter("127.0.0.1", first.port, lambda: SNAP)
        with pytest.raises(MetricsError, match=r"metrics\.listen: cannot listen on 127\.0"):
            await second.start()
    finally:
        await first.close()
