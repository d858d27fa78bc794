"""Optional Prometheus endpoint: a collector that reads a snapshot at scrape time.

Nothing is updated per packet: the gateway keeps plain counters and the collector
reads them only when Prometheus asks. The HTTP server is a small asyncio one, so a
scrape runs on the event loop thread and never races the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("vpnd.metrics")

MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
MAX_SCRAPERS = 8


@dataclass(frozen=True, slots=True)
class CertExpiry:
    kind: str
    """``own``, ``ca`` or ``peer``."""
    name: str
    seconds_left: float


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The gateway's counters at one moment; filled by ``GatewayControl.metrics_snapshot``."""

    sessions: int = 0
    handshakes: Mapping[str, int] = field(default_factory=dict)
    """``accepted`` and ``refused_<reason>``."""
    bytes_in: int = 0
    """From peers into the tunnel."""
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    drops: Mapping[str, int] = field(default_factory=dict)
    cert_expiry: tuple[CertExpiry, ...] = ()
    crl_next_update_seconds: float | None = None
    """None: no CRL loaded."""
    clone_holddowns: int = 0
    """Hold-downs started: one certificate kept taking its own session over (a copy)."""
    firewall: Mapping[str, int] = field(default_factory=dict)
    """``Firewall.stats``: ``allowed_<how>`` verdicts, conntrack ``entries``, ``evicted``,
    ``evicted_peer_limit`` and ``expired`` (its ``dropped_*`` are already in ``drops``)."""
    enrollments: Mapping[str, int] = field(default_factory=dict)
    """``EnrollmentHandler.counts``: issued, refused_<code>, rate_limited, busy, timeout,
    bad_request (empty when enrollment is off)."""
    renewals: Mapping[str, int] = field(default_factory=dict)
    """In-tunnel renewals by result: issued, refused, failed (empty when renewal is off)."""
    quarantines: int = 0
    """Expired peers admitted only to renew."""
    supersedes: int = 0
    """Certificates marked superseded on the first use of their renewal."""


class SnapshotCollector:
    """A custom collector: every scrape reads one fresh snapshot."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("vpnd_up", "1 if vpnd could report its state")
        try:
            snap = self._snapshot()
        except Exception:  # a broken snapshot must still answer, with vpnd_up 0
            log.exception("metrics snapshot failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("vpnd_sessions", "admitted peer sessions", value=snap.sessions)

        hs = CounterMetricFamily(
            "vpnd_handshakes", "peer authentications by result", labels=["result", "reason"]
        )
        for key, count in sorted(snap.handshakes.items()):
            result, _, reason = key.partition("_")
            hs.add_metric([result, reason], count)
        yield hs

        nbytes = CounterMetricFamily(
            "vpnd_bytes", "tunnelled bytes by direction", labels=["direction"]
        )
        nbytes.add_metric(["in"], snap.bytes_in)
        nbytes.add_metric(["out"], snap.bytes_out)
        yield nbytes
        packets = CounterMetricFamily(
            "vpnd_packets", "tunnelled packets by direction", labels=["direction"]
        )
        packets.add_metric(["in"], snap.packets_in)
        packets.add_metric(["out"], snap.packets_out)
        yield packets

        drops = CounterMetricFamily("vpnd_drops", "dropped packets by reason", labels=["reason"])
        for reason, count in sorted(snap.drops.items()):
            drops.add_metric([reason], count)
        yield drops

        expiry = GaugeMetricFamily(
            "vpnd_certificate_expiry_seconds",
            "seconds until a certificate's notAfter (negative: expired)",
            labels=["kind", "name"],
        )
        for cert in snap.cert_expiry:
            expiry.add_metric([cert.kind, cert.name], cert.seconds_left)
        yield expiry

        yield CounterMetricFamily(
            "vpnd_clone_holddowns",
            "certificates held down for taking their own session over repeatedly (copies)",
            value=snap.clone_holddowns,
        )

        yield from _firewall_metrics(snap.firewall)
        yield from _enrollment_metrics(snap.enrollments)
        yield from _lifecycle_metrics(snap)

        if snap.crl_next_update_seconds is not None:
            yield GaugeMetricFamily(
                "vpnd_crl_next_update_seconds",
                "seconds until the CRL's nextUpdate (negative: stale)",
                value=snap.crl_next_update_seconds,
            )


def _lifecycle_metrics(snap: MetricsSnapshot) -> Iterator[Metric]:
    renewals = CounterMetricFamily(
        "vpnd_renewals", "in-tunnel certificate renewals by result", labels=["result"]
    )
    for result in ("issued", "refused", "failed"):
        renewals.add_metric([result], snap.renewals.get(result, 0))
    yield renewals
    yield CounterMetricFamily(
        "vpnd_quarantines",
        "peers with a recently expired certificate admitted only to renew",
        value=snap.quarantines,
    )
    yield CounterMetricFamily(
        "vpnd_supersedes",
        "certificates superseded by the first use of their renewal",
        value=snap.supersedes,
    )


def _enrollment_metrics(counts: Mapping[str, int]) -> Iterator[Metric]:
    family = CounterMetricFamily(
        "vpnd_enrollments",
        "invite enrollment attempts by result (issued, refused_<reason>, rate_limited, ...)",
        labels=["result"],
    )
    for result, count in sorted(counts.items()):
        family.add_metric([result], count)
    yield family


def _firewall_metrics(stats: Mapping[str, int]) -> Iterator[Metric]:
    allowed = CounterMetricFamily(
        "vpnd_firewall_allowed",
        "packets the firewall passed, by how: a new flow, a tracked one, a related ICMP "
        "error or a fragment",
        labels=["how"],
    )
    for key, count in sorted(stats.items()):
        if key.startswith("allowed_"):
            allowed.add_metric([key.removeprefix("allowed_")], count)
    yield allowed
    yield GaugeMetricFamily(
        "vpnd_conntrack_entries", "flows the firewall tracks now", value=stats.get("entries", 0)
    )
    evicted = CounterMetricFamily(
        "vpnd_conntrack_evicted",
        "tracked flows evicted to make room: the table was full (table_full) or one peer "
        "held its maximum (peer_limit)",
        labels=["why"],
    )
    evicted.add_metric(["table_full"], stats.get("evicted", 0))
    evicted.add_metric(["peer_limit"], stats.get("evicted_peer_limit", 0))
    yield evicted
    yield CounterMetricFamily(
        "vpnd_conntrack_expired", "tracked flows that timed out", value=stats.get("expired", 0)
    )


class MetricsError(Exception):
    """The metrics endpoint cannot be served; one line."""


class MetricsExporter:
    """Serves ``GET /metrics`` on ``host:port`` only (port 0: any free port)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self._server: asyncio.Server | None = None
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._on_client, self.host, self.port, limit=MAX_HEAD
            )
        except OSError as err:
            raise MetricsError(
                f"metrics.listen: cannot listen on {self.host}:{self.port}: {err.strerror or err}"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._tasks:  # let scrapes in flight finish, briefly
            _, late = await asyncio.wait(set(self._tasks), timeout=HEAD_TIMEOUT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await server.wait_closed()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._active += 1
        try:
            if self._active > MAX_SCRAPERS:
                await self._send(writer, 503, b"too many scrapers\n", "text/plain")
                return
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            method, _, rest = head.partition(b" ")
            target = rest.split(b" ", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await self._send(writer, 405, b"only GET\n", "text/plain")
            elif target.split(b"?", 1)[0] not in (b"/metrics", b"/"):
                await self._send(writer, 404, b"see /metrics\n", "text/plain")
            else:
                body = self.render()
                await self._send(
                    writer, 200, body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD"
                )
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            with contextlib.suppress(ConnectionError, TimeoutError):
                await self._send(writer, 400, b"bad request\n", "text/plain")
        except (ConnectionError, TimeoutError):
            pass  # the scraper went away or stalled
        except asyncio.CancelledError:
            pass  # shutting down; a cancelled handler task would only log noise
        finally:
            self._active -= 1
            self._tasks.discard(task)
            writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await writer.wait_closed()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        *,
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Service Unavailable')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if head_only else body))
        await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
