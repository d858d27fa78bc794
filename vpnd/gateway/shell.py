"""The gateway's asyncio shell: connections, drivers, the TUN reader, kernel updates.

Every decision is ``GatewayCore``'s (``vpnd.gateway.core``): this module turns I/O into
core calls and the effects they return into I/O. All kernel and network objects are
injected (TUN, netlink, streams), so the whole gateway runs in unit tests over fakes;
``vpnd.service.daemon`` builds the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vpnd.config import PolicyConfig
from vpnd.gateway.admission import IPInterface
from vpnd.gateway.audit import fmt_remote, host_of
from vpnd.gateway.core import GatewayCore, GatewaySettings
from vpnd.gateway.datapath import charge_turn
from vpnd.gateway.effects import (
    AddRoute,
    AddSources,
    Audit,
    Close,
    Drain,
    Effect,
    Log,
    Quarantine,
    Refuse,
    RemoveRoute,
    RemoveSources,
    SendConfig,
    Supersede,
)
from vpnd.gateway.enrollment import EnrollmentHandler
from vpnd.gateway.inventory_view import InventoryView
from vpnd.gateway.kernel_sync import KernelQueue
from vpnd.gateway.peer_state import PeerState
from vpnd.net.errors import NetError, TunError
from vpnd.net.netlink import NetConfigurator
from vpnd.net.nftables import Firewall as KernelFirewall
from vpnd.net.tun import TunDevice
from vpnd.pki import TrustStore
from vpnd.pki.identity import IPNetwork
from vpnd.policy.addresses import AddressTable
from vpnd.policy.firewall import Firewall
from vpnd.proto import (
    CloseCode,
    ConfigReceived,
    Event,
    HelloReceived,
    LocalProtocolError,
    PacketsReceived,
    RenewalRequested,
    Session,
    SessionClosed,
    SessionConfig,
)
from vpnd.proto.renewal_frames import RefusalCode
from vpnd.telemetry.logsetup import PeerLogger
from vpnd.transport.alerts import describe_client_abort
from vpnd.transport.driver import SessionDriver
from vpnd.transport.stream import Peername, Stream
from vpnd.transport.tlsengine import TlsHandshakeError

log = logging.getLogger("vpnd.gateway")
audit = logging.getLogger("vpnd.audit")
TICK = 5.0
"""Seconds between ticks: idle flows expire and the host's addresses are read again."""

__all__ = ["Gateway", "GatewaySettings", "IPInterface", "Peer", "TunWriter"]


@dataclass(eq=False, kw_only=True)
class Peer(PeerState):
    """One connected peer: the core's view of it, plus the session carrying it."""

    driver: SessionDriver
    log: PeerLogger
    waiting: bool = False
    """Over budget: delivery paused until the next loop turn."""
    backlog: deque[tuple[Sequence[bytes | memoryview], bool]] = field(default_factory=deque)
    """Decoded packets held over to the next turn, oldest first (bounded by one read slice)."""


class Lifecycle(Protocol):
    """What the shell hands certificate-lifecycle work to (blocking work, off the loop)."""

    renewal: bool

    def supersede(self, effect: Supersede) -> None: ...

    def renew(self, peer: Peer, request_id: int, csr_der: bytes) -> None: ...


class TunWriter(Protocol):
    def write_batch(self, packets: Sequence[bytes | memoryview]) -> int: ...


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tun: TunDevice,
        net: NetConfigurator,
        trust: TrustStore,
        nft: KernelFirewall | None = None,
        policy: PolicyConfig | None = None,
        tun_writer: TunWriter | None = None,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """``clock`` is wall time: certificate validity and timestamps shown to people.
        ``mono`` drives every timer: sessions, conntrack, hold-downs, log budgets."""
        self.core: GatewayCore[Peer] = GatewayCore(
            settings, trust=trust, policy=policy, tun_vnet=tun.vnet_hdr, sources=nft is not None
        )
        self.tun = tun
        self.on_fatal = on_fatal
        """Called once if the gateway cannot go on (its TUN vanished): the daemon exits."""
        self.fatal: str | None = None
        self.tun_writer: TunWriter = tun_writer or tun
        self.net = net
        self.nft = nft
        self._clock = clock
        self._mono = mono
        self._host_addr_error = False
        self._kernel = KernelQueue()
        self._routes_added: list[IPNetwork] = []
        self._reader_installed = False
        self._ticker: asyncio.Task[None] | None = None
        self.lifecycle: Lifecycle | None = None
        """Renewal signing and inventory writes (``vpnd.gateway.renewals``), if enabled."""
        self.enrollment: EnrollmentHandler | None = None
        """Set when ``enrollment.enabled``: connections without a client certificate go
        there (and only there); without it they are refused like any unverified peer."""

    # ---- what the core owns, as the daemon, control bridge and tests read it ----------

    @property
    def settings(self) -> GatewaySettings:
        return self.core.settings

    @settings.setter
    def settings(self, new: GatewaySettings) -> None:
        self.core.settings = new  # a reload: applies from the next admission

    @property
    def peers(self) -> Mapping[int, Peer]:
        return self.core.peers

    @property
    def table(self) -> AddressTable[Peer]:
        return self.core.table

    @property
    def drops(self) -> Counter[str]:
        return self.core.drops

    @property
    def handshakes(self) -> Counter[str]:
        return self.core.handshakes

    @property
    def totals(self) -> Counter[str]:
        return self.core.totals

    @property
    def trust(self) -> TrustStore:
        return self.core.trust

    @property
    def trust_error(self) -> str | None:
        return self.core.trust_error

    @property
    def policy(self) -> PolicyConfig:
        return self.core.policy

    @property
    def firewall(self) -> Firewall:
        return self.core.firewall

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.net.configure_link(s.tun_name, addresses=list(s.gateway_addresses), mtu=s.mtu)
        for net in s.overlay_networks:
            if not any(a.network == net for a in s.gateway_addresses):
                await self.net.add_route(net, s.tun_name)
                self._routes_added.append(net)
        # Before the first packet: the host's own addresses need exact-host rules.
        await self.refresh_host_addresses()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.tun.fileno(), self._on_tun_readable)
        self._reader_installed = True
        self._ticker = loop.create_task(self._tick())
        log.info(
            "gateway up on %s: %s, overlay %s",
            s.tun_name,
            ", ".join(str(a) for a in s.gateway_addresses),
            ", ".join(str(n) for n in s.overlay_networks),
        )

    async def stop(self, reason: str = "gateway shutting down") -> None:
        """Tell every peer, then remove everything we added to the kernel."""
        self.core.stopping = True
        if self.enrollment is not None:
            await self.enrollment.close()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for peer in list(self.peers.values()):
            peer.driver.close(CloseCode.SHUTDOWN, reason)
        if self._reader_installed:
            asyncio.get_running_loop().remove_reader(self.tun.fileno())
            self._reader_installed = False
        for net in self._routes_added:
            await self.net.del_route(net, self.settings.tun_name)
        self._routes_added.clear()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.core.tick(self._mono())
            await self.refresh_host_addresses()

    # ---- connections -----------------------------------------------------------------

    def on_connection(self, stream: Stream) -> None:
        """A TLS handshake completed (OpenSSL checked chain, EKU and CRL): verify fully."""
        if self.core.stopping:
            stream.close()
            return
        chain = tuple(stream.peer_chain())
        if not chain and self.enrollment is not None:
            # No client certificate (the context allows that only with enrollment on):
            # enrollment is all this connection can do, never a session.
            self.enrollment.accept(stream)
            return
        core = self.core
        remote = fmt_remote(stream.peername)
        now = self._mono()
        found = core.verify(chain, remote, host_of(stream.peername), wall=self._clock(), now=now)
        if isinstance(found, list):
            self._apply(found, stream=stream)
            return
        identity = found
        key = core.next_key()
        plog = PeerLogger(
            log, {"peer": identity.name, "fingerprint": identity.fingerprint, "remote": remote}
        )
        s = self.settings
        session = Session(
            SessionConfig(
                role="gateway",
                keepalive_interval=s.keepalive_interval,
                keepalive_timeout=s.keepalive_timeout,
                max_frame=s.max_frame,
                config_timeout=s.handshake_timeout,
            ),
            now,
        )
        peer: Peer | None = None

        def on_event(event: Event) -> None:
            assert peer is not None
            self._on_event(peer, event)

        def on_lost(code: int, message: str, exc: BaseException | None) -> None:
            assert peer is not None
            self._apply(self.core.lost(peer, message), lost=peer)

        driver = SessionDriver(
            stream, session, on_event=on_event, on_lost=on_lost, mono=self._mono, wall=self._clock
        )
        peer = Peer(
            key=key,
            identity=identity,
            remote=remote,
            connected_at=self._clock(),
            chain=chain,
            driver=driver,
            log=plog,
        )
        self._apply(core.add(peer))
        if not peer.quarantined:  # a quarantined session has its own, short deadline
            # A certificate that expires while connected is cut at notAfter (wall time,
            # re-anchored on the monotonic timer at every tick): a timer, not polling.
            driver.set_expiry(
                identity.not_after.timestamp(),
                CloseCode.CERT_EXPIRED,
                identity.not_after.isoformat(),
            )
        driver.start()

    def on_refused(self, peername: Peername | None, err: TlsHandshakeError) -> None:
        """OpenSSL refused the handshake (and sent the alert): count and audit it."""
        # The client judged *us*: say so, instead of the advice meant for a client.
        text = describe_client_abort(err.reason) if err.by_peer else f"{err.reason} ({err.detail})"
        self._apply(
            self.core.tls_refused(
                fmt_remote(peername),
                host_of(peername),
                err.reason,
                text,
                err.presented,
                by_peer=err.by_peer,
                now=self._mono(),
                wall=self._clock(),
            )
        )

    def _on_event(self, peer: Peer, event: Event) -> None:
        match event:
            case PacketsReceived(packets=packets, vnet=vnet):
                self._from_peer(peer, packets, vnet)
            case HelloReceived():
                hello = peer.driver.session.peer_hello
                offload = hello is not None and hello.offload
                self._apply(self.core.hello(peer, offload=offload, now=self._mono()))
            case RenewalRequested(request_id=request_id, csr_der=csr_der):
                self._renewal_requested(peer, request_id, csr_der)
            case ConfigReceived():
                pass  # the session rejects CONFIG sent to a gateway
            case SessionClosed(code=code, message=message, by_peer=by_peer):
                who = "peer" if by_peer else "gateway"
                peer.log.info("session closed by %s: %s %s", who, _code_name(code), message)

    def _renewal_requested(self, peer: Peer, request_id: int, csr_der: bytes) -> None:
        if self.lifecycle is None or not self.lifecycle.renewal:
            session = peer.driver.session
            msg = "renewal is not enabled on this gateway: ask your admin"
            session.refuse_renewal(request_id, RefusalCode.NOT_ENABLED, msg, self._mono())
            return
        self.lifecycle.renew(peer, request_id, csr_der)

    def renew_hint(self, name: str, reason: str) -> int:
        """Ask every live session of ``name`` to renew now; returns how many were asked."""
        asked = 0
        for peer in self.core.sessions_of(name):
            session = peer.driver.session
            if session.closed or not (peer.admitted or peer.quarantined):
                continue
            try:
                session.send_renew_hint(reason, self._mono())
            except LocalProtocolError:
                continue  # still setting up (CONFIG not sent yet): it renews on its own
            peer.driver.flush()
            asked += 1
        return asked

    def apply_inventory(self, view: InventoryView) -> None:
        self._apply(self.core.apply_inventory(view, now=self._mono()))

    # ---- operations ------------------------------------------------------------------

    def kick(self, name: str, reason: str = "kicked by an administrator") -> int:
        """Close every session of the named peer; returns how many were closed."""
        effects = self.core.kick(name, reason)
        self._apply(effects)
        return sum(isinstance(e, Close) for e in effects)

    def apply_trust(self, trust: TrustStore) -> list[str]:
        """Adopt new CA/CRL data and close every live session it revokes, at once."""
        closed, effects = self.core.apply_trust(trust, wall=self._clock())
        self._apply(effects)
        return closed

    def apply_policy(self, policy: PolicyConfig) -> int:
        """Adopt new rules; tracked flows they no longer allow are cut at once."""
        return self.core.apply_policy(policy, now=self._mono())

    def refuse_new_peers(self, reason: str) -> None:
        """Revocation data became unusable: fail closed for new peers until fixed."""
        self._apply(self.core.refuse_new_peers(reason))

    async def refresh_host_addresses(self) -> int:
        """Tell the firewall this host's own non-overlay addresses; returns flows cut.

        Read at start, at each reload and every tick, so an address added to the host
        later is protected within seconds. A netlink failure keeps the last set and is
        logged once.
        """
        try:
            found = await self.net.host_addresses()
        except NetError as err:
            if not self._host_addr_error:
                log.warning("cannot read this host's addresses (keeping the last set): %s", err)
            self._host_addr_error = True
            return 0
        self._host_addr_error = False
        return self.core.host_addresses(found)

    # ---- effects ---------------------------------------------------------------------

    def _apply(
        self, effects: Sequence[Effect], *, stream: Stream | None = None, lost: Peer | None = None
    ) -> None:
        """Carry out ``effects`` in order. ``stream``: the connection a ``Refuse`` ends;
        ``lost``: a peer already gone from the registry whose log lines these are."""
        peers = self.core.peers
        for effect in effects:
            match effect:
                case Log(level=level, message=message, key=key):
                    peer = peers.get(key) if key is not None else None
                    if peer is None and lost is not None and key == lost.key:
                        peer = lost
                    (peer.log if peer is not None else log).log(level, "%s", message)
                case Audit(level=level, message=message, fields=fields):
                    audit.log(level, "%s", message, extra=dict(fields))
                case Close(key=key, code=code, message=message):
                    if (peer := peers.get(key)) is not None:
                        peer.driver.close(code, message)
                case Refuse(code=code, message=message):
                    assert stream is not None
                    _close_now(stream, code, message, self._mono())
                case SendConfig():
                    self._send_config(effect, later=False)
                case Drain() | Quarantine() | Supersede():
                    self._lifecycle_effect(effect)
                case _:
                    self._kernel_effect(effect)
        if self.core.notes:  # a log budget's summary line, from any event
            self._take_notes()

    def _lifecycle_effect(self, effect: Drain | Quarantine | Supersede) -> None:
        peers = self.core.peers
        match effect:
            case Drain(key=key, seconds=seconds, code=code, message=message):
                if (peer := peers.get(key)) is not None:
                    loop = asyncio.get_running_loop()
                    loop.call_later(seconds, peer.driver.close, code, message)
            case Quarantine(key=key, seconds=seconds):
                if (peer := peers.get(key)) is not None:
                    now = self._mono()
                    peer.driver.session.quarantine(now, now + seconds)
            case Supersede():
                if self.lifecycle is not None:
                    self.lifecycle.supersede(effect)

    def _kernel_effect(self, effect: Effect) -> None:
        match effect:
            case AddRoute(key=key, network=network):
                self._kernel.run(self._route_add(key, network))
            case RemoveRoute(network=network):
                self._kernel.run(self._route_del(network))
            case AddSources(networks=networks, then=then):
                after = (lambda: self._send_config(then, later=True)) if then else None
                self._kernel.run(self._nft_sources(networks, add=True), then=after)
            case RemoveSources(networks=networks):
                self._kernel.run(self._nft_sources(networks, add=False))

    def _send_config(self, effect: SendConfig, *, later: bool) -> None:
        """Send CONFIG; ``later``: outside the driver's own event loop, so flush it."""
        peer = self.core.peers.get(effect.key)
        if peer is None or not peer.admitted or peer.driver.session.closed:
            return
        peer.driver.session.send_config(effect.config, self._mono())
        held = self.core.configured(peer)
        if held:
            self._send_out(peer, held)
        if later:
            peer.driver.pump()

    async def _route_add(self, key: int, net: IPNetwork) -> None:
        try:
            await self.net.add_route(net, self.settings.tun_name)
        except Exception as err:  # a bad route must not take the gateway down
            peer = self.core.peers.get(key)
            (peer.log if peer is not None else log).error("could not add route %s: %s", net, err)

    async def _route_del(self, net: IPNetwork) -> None:
        try:
            await self.net.del_route(net, self.settings.tun_name)
        except Exception as err:
            log.error("could not remove route %s: %s", net, err)

    async def _nft_sources(self, nets: tuple[IPNetwork, ...], *, add: bool) -> None:
        assert self.nft is not None
        try:
            if add:
                await self.nft.add_sources(list(nets))
            else:
                await self.nft.delete_sources(list(nets))
        except Exception as err:  # defence in depth: the in-process check still holds
            log.error("nftables anti-spoofing set update failed: %s", err)

    # ---- data path -------------------------------------------------------------------

    def _from_peer(self, peer: Peer, packets: Sequence[bytes | memoryview], vnet: bool) -> None:
        """Fair share: each peer gets ``peer_turn_packets`` packets per loop turn, a GSO
        super-packet costing its segments. Past that, the rest waits for the next turn
        and the peer's connection stops delivering, so other peers' reads run first."""
        if peer.waiting:
            peer.backlog.append((packets, vnet))
            return
        self._serve(peer, packets, vnet)

    def _serve(self, peer: Peer, packets: Sequence[bytes | memoryview], vnet: bool) -> None:
        n = charge_turn(peer, packets, vnet, self.settings.peer_turn_packets)
        if n is not None:  # the budget is spent: the rest waits for the next loop turn
            peer.waiting = True
            if n < len(packets):
                peer.backlog.appendleft((packets[n:], vnet))
                packets = packets[:n]
            peer.driver.conn.pause_delivery()
            asyncio.get_running_loop().call_soon(self._next_turn, peer)
        to_tun, to_peers = self.core.from_peer(peer, packets, vnet, self._mono())
        if to_tun:
            self.tun_writer.write_batch(to_tun)
        for other, batch in to_peers.items():
            self._to_peer(other, batch)
        if self.core.notes:
            self._take_notes()

    def _next_turn(self, peer: Peer) -> None:
        peer.waiting = False
        if self.peers.get(peer.key) is not peer:
            peer.backlog.clear()
            return
        while peer.backlog and not peer.waiting:
            packets, vnet = peer.backlog.popleft()
            self._serve(peer, packets, vnet)
        if not peer.waiting:
            peer.driver.conn.resume_delivery()

    def _to_peer(self, peer: Peer, packets: list[bytes | memoryview]) -> None:
        """Queue packets (in the TUN's form) to one peer, in the form that peer takes."""
        driver = peer.driver
        out = self.core.outbound(
            peer, packets, driver.conn.backlog_bytes, self.core.settings.peer_queue_bytes
        )
        if out is not None:
            self._send_out(peer, out)

    def _send_out(self, peer: Peer, packets: list[bytes | memoryview]) -> None:
        session = peer.driver.session
        counters = session.counters
        sent, nbytes = counters.packets_out, counters.packet_bytes_out
        refused = session.send_packets(packets, self._mono(), vnet=peer.offload)
        self.core.sent(
            peer,
            counters.packets_out - sent,
            counters.packet_bytes_out - nbytes,
            refused,
            closed=session.closed,
        )
        peer.driver.flush()

    def _take_notes(self) -> None:
        notes = self.core.notes[:]
        self.core.notes.clear()
        self._apply(notes)

    def _on_tun_readable(self) -> None:
        from_tun = self.core.from_tun
        for _ in range(16):  # bounded: let the loop serve sockets between bursts
            try:
                packets = self.tun.read_batch(64)
            except TunError as err:
                self._tun_lost(str(err))
                return
            if not packets:
                return
            for owner, batch in from_tun(packets, self._mono()).items():
                self._to_peer(owner, batch)

    def _tun_lost(self, why: str) -> None:
        """The TUN went away under us (``ip link del``): stop reading, say so once, and
        let the daemon exit non-zero so systemd restarts it; never spin on the fd."""
        if self._reader_installed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.tun.fileno())
            self._reader_installed = False
        if self.fatal is not None:
            return
        self.fatal = f"{why}; exiting non-zero so a supervisor restarts vpnd"
        log.error("%s", self.fatal)
        if self.on_fatal is not None:
            self.on_fatal(self.fatal)


def _close_now(stream: Stream, code: CloseCode, message: str, now: float) -> None:
    """Refuse a connection that never became a session: one CLOSE frame, then close."""
    session = Session(SessionConfig(role="gateway"), now)
    session.close(code, message, now)
    stream.write(session.data_to_send())
    stream.close()


def _code_name(code: int) -> str:
    try:
        return CloseCode(code).name
    except ValueError:
        return str(code)
