"""The gateway: admits verified peers, routes packets between the TUN and sessions.

All kernel and network objects are injected (TUN, netlink, TLS server), so the whole
gateway runs in unit tests over fakes; ``vpnd.daemon`` builds the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vpnd.config import PolicyConfig
from vpnd.net.errors import NetError, TunError
from vpnd.net.gso import GsoError, to_plain
from vpnd.net.netlink import NetConfigurator
from vpnd.net.nftables import Firewall as KernelFirewall
from vpnd.net.tun import TunDevice
from vpnd.net.vnet import (
    VNET_HDR_LEN,
    ip_src_dst,
    plain_vnet_header,
    validate_vnet_packet,
    vnet_segments,
)
from vpnd.pki import TrustStore, check_revocation, verify_peer
from vpnd.pki.identity import IPNetwork, PeerIdentity, Reason, Role, VerifyError
from vpnd.pki.profile import describe_certificate
from vpnd.policy.addresses import AddressConflict, AddressTable
from vpnd.policy.firewall import Firewall, PeerView
from vpnd.policy.takeover import CLONE_REASON, TakeoverGuard, Verdict
from vpnd.proto import (
    CloseCode,
    ConfigReceived,
    Event,
    HelloReceived,
    PacketsReceived,
    Session,
    SessionClosed,
    SessionConfig,
    TunnelConfig,
)
from vpnd.telemetry.logsetup import PeerLogger
from vpnd.transport.alerts import describe_client_abort
from vpnd.transport.driver import SessionDriver
from vpnd.transport.stream import Stream
from vpnd.transport.tlsengine import TlsHandshakeError

log = logging.getLogger("vpnd.gateway")
PLAIN_VNET = plain_vnet_header()
audit = logging.getLogger("vpnd.audit")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway needs from the config, already validated."""

    tun_name: str
    mtu: int
    overlay_networks: tuple[IPNetwork, ...]
    gateway_addresses: tuple[IPInterface, ...]
    push_routes: tuple[IPNetwork, ...] = ()
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_frame: int = 262144
    max_sessions: int = 10000
    peer_queue_bytes: int = 4 * 1024 * 1024
    max_unadmitted: int = 256
    """Verified TLS sessions that have not yet sent HELLO: bounded like handshakes."""
    duplicate: str = "replace"
    peer_turn_packets: int = 32
    """Packets (GSO segments counted one by one) from one peer per event-loop turn; then
    its connection yields so other peers and the TUN are served (fair sharing)."""
    holddown_takeovers: int = 5
    """Takeovers of one certificate within ``holddown_window`` before newcomers are held
    down (0: never); see ``vpnd.policy.takeover``."""
    holddown_window: float = 60.0
    holddown_hold: float = 600.0


@dataclass(eq=False)
class Peer:
    """One connected peer: its verified identity and the session carrying it."""

    key: int
    identity: PeerIdentity
    driver: SessionDriver
    remote: str
    log: PeerLogger
    connected_at: float
    chain: tuple[bytes, ...] = field(default=(), repr=False)
    """The DER chain the peer presented, to re-verify when the trusted CAs change."""
    view: PeerView = field(default_factory=lambda: PeerView("", frozenset()))
    """What the firewall sees of this peer: its name and groups."""
    admitted: bool = False
    offload: bool = False
    """DATA to and from this peer carries virtio headers (both ends offload)."""
    drops: Counter[str] = field(default_factory=Counter)
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    turn_packets: int = 0
    """Packets charged to this peer since it last ran out of budget (``Gateway._from_peer``)."""
    turn_yields: int = 0
    """How often this peer's budget ran out and the other peers were served first."""
    waiting: bool = False
    """Over budget: delivery paused until the next loop turn."""
    backlog: deque[tuple[Sequence[bytes | memoryview], bool]] = field(default_factory=deque)
    """Decoded packets held over to the next turn, oldest first (bounded by one read slice)."""

    def __hash__(self) -> int:
        return self.key


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
        ``mono`` drives every timer: sessions, conntrack, log budgets."""
        self.settings = settings
        self.tun = tun
        self.on_fatal = on_fatal
        """Called once if the gateway cannot go on (its TUN vanished): the daemon exits."""
        self.fatal: str | None = None
        self.tun_writer: TunWriter = tun_writer or tun
        self.net = net
        self.trust = trust
        self.nft = nft
        self.policy = policy or PolicyConfig()
        self.firewall = Firewall(self.policy)
        self._host_addr_error = False
        self._denied_log = _LogBudget(per_minute=20)
        self._refusal_log = _LogBudget(per_minute=10)
        self.trust_error: str | None = None
        """Set while the revocation data cannot be used: every new peer is refused."""
        self._clock = clock
        self._mono = mono
        self._keys = itertools.count(1)
        self.peers: dict[int, Peer] = {}
        self.table: AddressTable[Peer] = AddressTable()
        self.drops: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()
        self._kernel_lock = asyncio.Lock()
        self._kernel_tasks: set[asyncio.Task[None]] = set()
        self._by_cert: dict[tuple[str, int], Peer] = {}
        self._by_name: dict[tuple[str, str], Peer] = {}
        self._takeovers = TakeoverGuard(
            settings.holddown_takeovers, settings.holddown_window, settings.holddown_hold
        )
        self._monotonic: Callable[[], float] = time.monotonic
        self.totals: Counter[str] = Counter()
        """bytes/packets in/out of peers that have left (live peers hold their own), so
        that exported counters only ever grow; ``clone_holddowns`` counts hold-downs started."""
        self._routes_added: list[IPNetwork] = []
        self._reader_installed = False
        self._stopping = False
        self._expiry: asyncio.Task[None] | None = None

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
        self._expiry = loop.create_task(self._expire_flows())
        log.info(
            "gateway up on %s: %s, overlay %s",
            s.tun_name,
            ", ".join(str(a) for a in s.gateway_addresses),
            ", ".join(str(n) for n in s.overlay_networks),
        )

    async def stop(self, reason: str = "gateway shutting down") -> None:
        """Tell every peer, then remove everything we added to the kernel."""
        self._stopping = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for peer in list(self.peers.values()):
            peer.driver.close(CloseCode.SHUTDOWN, reason)
        if self._reader_installed:
            asyncio.get_running_loop().remove_reader(self.tun.fileno())
            self._reader_installed = False
        for net in self._routes_added:
            await self.net.del_route(net, self.settings.tun_name)
        self._routes_added.clear()

    # ---- admission -------------------------------------------------------------------

    def on_connection(self, conn: Stream) -> None:
        """A TLS handshake completed (OpenSSL checked chain, EKU and CRL): verify fully."""
        remote = _fmt_remote(conn.peername)
        if self._stopping:
            conn.close()
            return
        if len(self.peers) - len(self.table) >= self.settings.max_unadmitted:
            self.handshakes["refused_resource_limit"] += 1
            _close_now(conn, CloseCode.RESOURCE_LIMIT, "too many sessions setting up", self._mono())
            return
        if self.trust_error is not None:
            # Revocation data is missing or unusable: fail closed for new peers.
            self._refuse_unverified(conn, remote, VerifyError(Reason.CRL_MISSING, self.trust_error))
            return
        chain = conn.peer_chain()
        try:
            identity = verify_peer(
                chain,
                now=dt.datetime.fromtimestamp(self._clock(), dt.UTC),
                role=Role.PEER,
                trust=self.trust,
            )
        except VerifyError as err:
            self._refuse_unverified(conn, remote, err)
            return
        key = next(self._keys)
        plog = PeerLogger(
            log, {"peer": identity.name, "fingerprint": identity.fingerprint, "remote": remote}
        )
        session = Session(
            SessionConfig(
                role="gateway",
                keepalive_interval=self.settings.keepalive_interval,
                keepalive_timeout=self.settings.keepalive_timeout,
                max_frame=self.settings.max_frame,
                config_timeout=self.settings.handshake_timeout,
            ),
            self._mono(),
        )
        peer: Peer | None = None

        def on_event(event: Event) -> None:
            assert peer is not None
            self._on_event(peer, event)

        def on_lost(code: int, message: str, exc: BaseException | None) -> None:
            assert peer is not None
            self._on_lost(peer, code, message)

        driver = SessionDriver(
            conn, session, on_event=on_event, on_lost=on_lost, mono=self._mono, wall=self._clock
        )
        peer = Peer(key, identity, driver, remote, plog, self._clock())
        peer.view = PeerView(identity.name, identity.groups)
        peer.chain = chain
        self.peers[key] = peer
        # A certificate that expires while connected is cut at notAfter (wall time,
        # re-anchored on the monotonic timer at every tick): a timer, not polling.
        driver.set_expiry(
            identity.not_after.timestamp(),
            CloseCode.CERT_EXPIRED,
            identity.not_after.isoformat(),
        )
        plog.info("authenticated serial %s, addresses %s", identity.serial_hex, _addrs(identity))
        driver.start()

    def on_refused(self, peername: tuple[str, int] | None, err: TlsHandshakeError) -> None:
        """OpenSSL refused the handshake (and sent the alert): count and audit it."""
        remote = _fmt_remote(peername)
        self.handshakes[f"refused_{err.reason}"] += 1
        if not self._refusal_log.allow(_host(peername), self._mono()):
            return  # counted above; a flood from one address must not flood the log
        presented = _presented_der(err.presented)
        who = f" ({presented['peer']}, serial {presented['serial']})" if presented else ""
        # The client judged *us*: say so, instead of the advice meant for a client.
        text = describe_client_abort(err.reason) if err.by_peer else f"{err.reason} ({err.detail})"
        audit.warning(
            "refused %s%s in the TLS handshake: %s",
            remote,
            who,
            text,
            extra={
                "event": "auth_refused",
                "remote": remote,
                "reason": err.reason,
                "by_peer": err.by_peer,
                **presented,
            },
        )

    def _refuse_unverified(self, conn: Stream, remote: str, err: VerifyError) -> None:
        self.handshakes[f"refused_{err.reason.value}"] += 1
        if self._refusal_log.allow(_host(conn.peername), self._mono()):
            presented = _presented(conn)
            audit.warning(
                "refused %s%s: %s",
                remote,
                f" ({presented['peer']}, serial {presented['serial']})" if presented else "",
                err,
                extra={
                    "event": "auth_refused",
                    "remote": remote,
                    "reason": err.reason.value,
                    **presented,
                },
            )
        # The handshake already succeeded, so no TLS alert can carry our reason: a
        # CLOSE frame does, and the client prints it.
        _close_now(conn, CloseCode.AUTH_FAILED, err.reason.value, self._mono())

    def _admit(self, peer: Peer) -> None:
        ident = peer.identity
        networks = [ipaddress.ip_network(a) for a in ident.addresses] + list(ident.routes)
        outside = [n for n in networks[: len(ident.addresses)] if not self._in_overlay(n)]
        if outside:
            peer.driver.close(CloseCode.POLICY, f"address {outside[0]} is outside the overlay")
            return
        reserved = self._reserved_address(ident.addresses)
        if reserved is not None:
            audit.warning(
                "refused %s: %s",
                ident.name,
                reserved,
                extra={"event": "auth_refused", "reason": "reserved_address", **_audit(peer)},
            )
            peer.driver.close(CloseCode.POLICY, reserved)
            return
        bad_route = self._bad_route(ident.routes)
        if bad_route is not None:
            peer.driver.close(CloseCode.POLICY, bad_route)
            return
        # O(1): admission cost must not grow with the number of connected peers.
        old = self._by_cert.get((ident.issuer, ident.serial))
        renewal = False
        if old is None:
            # The same peer (name, CA) with another certificate: a renewal. The newer
            # certificate takes over without a gap; an older one (a stale copy, maybe a
            # leaked one) never evicts the newer.
            old = self._by_name.get((ident.issuer, ident.name))
            if old is not None:
                # Newer means issued later, not valid longer: a lost laptop's long-lived
                # certificate must not beat the fresh one issued to replace it.
                mine = (ident.not_before, ident.serial)
                if mine < (old.identity.not_before, old.identity.serial):
                    peer.driver.close(
                        CloseCode.ADDRESS_CONFLICT,
                        "a newer certificate of this peer is already connected",
                    )
                    return
                renewal = True
        elif self.settings.duplicate == "reject":
            peer.driver.close(CloseCode.REPLACED, "this certificate is already connected")
            return
        else:
            guard, s = self._takeovers, self.settings  # a reload may have changed them
            guard.takeovers, guard.window, guard.hold = (
                s.holddown_takeovers,
                s.holddown_window,
                s.holddown_hold,
            )
            verdict = guard.takeover((ident.issuer, ident.serial), self._monotonic())
            if verdict is not Verdict.ALLOW:
                self.handshakes["refused_clone_holddown"] += 1
                if verdict is Verdict.HOLD_START:
                    self.totals["clone_holddowns"] += 1
                    audit.warning(
                        "holding down %s from %s: %s (the session from %s stays)",
                        ident.name,
                        peer.remote,
                        CLONE_REASON,
                        old.remote,
                        extra={
                            "event": "clone_holddown",
                            "reason": "possible_copy",
                            "holder_remote": old.remote,
                            **_audit(peer),
                        },
                    )
                peer.driver.close(CloseCode.POLICY, CLONE_REASON)
                return
        if old is None and len(self.table) >= self.settings.max_sessions:
            peer.driver.close(CloseCode.RESOURCE_LIMIT, "gateway is at its session limit")
            return
        try:
            self.table.conflicts(networks, ignore=old)
        except AddressConflict as err:
            # Our own log may name both peers; the refused peer learns only the address
            # (its certificate claims it), never who holds it.
            holder = err.owner.identity if isinstance(err.owner, Peer) else None
            held_by = f"{holder.name} (serial {holder.serial_hex})" if holder else "another peer"
            peer.log.warning("refused: %s is already owned by %s", err.network, held_by)
            audit.warning(
                "refused %s: address conflict with %s",
                ident.name,
                held_by,
                extra={
                    "event": "auth_refused",
                    "reason": "address_conflict",
                    "network": str(err.network),
                    "holder": holder.name if holder else "?",
                    "holder_serial": holder.serial_hex if holder else "?",
                    **_audit(peer),
                },
            )
            peer.driver.close(CloseCode.ADDRESS_CONFLICT, f"{err.network} is held by another peer")
            return
        if old is not None:
            # Atomic takeover: nothing awaits between these lines, so no packet sees a
            # moment where two sessions (or none) own the addresses.
            stale = [n for n in self.table.networks_of(old) if n not in networks]
            self.table.remove(old)
            self.table.add(peer, networks)
            if self.nft is not None and stale:
                self._kernel(self._nft_sources(stale, add=False))
            if stale or old.identity.groups != ident.groups:
                # Flows opened under the old certificate are judged again as the new one.
                self.apply_policy(self.policy)
            why = "renewed certificate" if renewal else "newer connection"
            old.log.info("replaced by a %s from %s", why, peer.remote)
            audit.info(
                "%s replaced by a %s",
                ident.name,
                why,
                extra={"event": "replaced", "old_serial": old.identity.serial_hex, **_audit(peer)},
            )
            for net in old.identity.routes:
                if net not in ident.routes:
                    self._kernel(self._route_del(net))
            old.driver.close(CloseCode.REPLACED, f"replaced by a {why}")
        else:
            self.table.add(peer, networks)
        peer.admitted = True
        self._by_cert[(ident.issuer, ident.serial)] = peer
        self._by_name[(ident.issuer, ident.name)] = peer
        hello = peer.driver.session.peer_hello
        peer.offload = bool(self.tun.vnet_hdr and hello is not None and hello.offload)
        self.handshakes["accepted"] += 1
        for net in ident.routes:
            self._kernel(self._route_add(peer, net))
        audit.info(
            "accepted %s",
            ident.name,
            extra={"event": "auth_accepted", **_audit(peer)},
        )
        if self.nft is not None:
            # CONFIG only once the kernel's anti-spoofing set admits the peer's sources,
            # else its first packets would die in nftables.
            task = self._kernel(self._nft_sources(networks, add=True))
            task.add_done_callback(lambda _t: self._send_config(peer, later=True))
        else:
            self._send_config(peer, later=False)

    def _send_config(self, peer: Peer, *, later: bool) -> None:
        """Send CONFIG; ``later``: outside the driver's own event loop, so flush it."""
        if not peer.admitted or peer.driver.session.closed:
            return
        ident = peer.identity
        primary = ident.addresses[0]
        prefix = next(n.prefixlen for n in self.settings.overlay_networks if primary in n)
        extra = tuple(
            ipaddress.ip_interface(f"{a}/{self._prefix_of(a)}") for a in ident.addresses[1:]
        )
        gw = next(
            (a.ip for a in self.settings.gateway_addresses if a.version == primary.version),
            self.settings.gateway_addresses[0].ip,
        )
        routes = tuple(
            n
            for n in (*self.settings.overlay_networks, *self.settings.push_routes)
            if not any(a in n for a in ident.addresses)
        )
        peer.driver.session.send_config(
            TunnelConfig(
                address=ipaddress.ip_interface(f"{primary}/{prefix}"),
                gateway=gw,
                routes=routes,
                mtu=self.settings.mtu,
                keepalive_interval=self.settings.keepalive_interval,
                keepalive_timeout=self.settings.keepalive_timeout,
                offload=peer.offload,
                extra_addresses=extra,
            ),
            self._mono(),
        )
        if later:
            peer.driver.pump()

    def _bad_route(self, routes: Sequence[IPNetwork]) -> str | None:
        """Why a site peer's routed subnet is refused, or None.

        It may not overlap the overlay (it would shadow other peers or the gateway) nor
        contain a pushed route (it would capture the LAN traffic of every client); a
        subnet equal to a pushed route is the normal site-to-site case.
        """
        for net in routes:
            if net.prefixlen == 0:
                return (
                    f"routed subnet {net} is a default route: full tunnel is a client "
                    "mode, not a certificate route"
                )
            for o in self.settings.overlay_networks:
                if net.version == o.version and net.overlaps(o):
                    return f"routed subnet {net} overlaps the overlay {o}"
            for p in self.settings.push_routes:
                if p.version == net.version and p != net and p.subnet_of(net):  # type: ignore[arg-type]
                    return f"routed subnet {net} would capture the pushed route {p}"
        return None

    def _reserved_address(
        self, addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ) -> str | None:
        """Why a peer may not hold one of ``addresses`` (the gateway's own, or an
        overlay's network or broadcast address), or None."""
        own = {a.ip for a in self.settings.gateway_addresses}
        for addr in addresses:
            if addr in own:
                return f"address {addr} is the gateway's own"
            for o in self.settings.overlay_networks:
                if addr not in o or o.num_addresses <= 2:
                    continue
                if addr == o.network_address:
                    return f"address {addr} is the network address of {o}"
                if o.version == 4 and addr == o.broadcast_address:
                    return f"address {addr} is the broadcast address of {o}"
        return None

    def _in_overlay(self, net: IPNetwork) -> bool:
        return any(
            net.version == o.version and net.subnet_of(o)  # type: ignore[arg-type]
            for o in self.settings.overlay_networks
        )

    def _prefix_of(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        for n in self.settings.overlay_networks:
            if addr in n:
                return n.prefixlen
        return addr.max_prefixlen

    async def _route_add(self, peer: Peer, net: IPNetwork) -> None:
        try:
            await self.net.add_route(net, self.settings.tun_name)
        except Exception as err:  # a bad route must not take the gateway down
            peer.log.error("could not add route %s: %s", net, err)

    def _kernel(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a kernel update (route, nft set) in order with the others, keeping a
        reference so it is neither collected nor overtaken by a later update."""

        async def serialized() -> None:
            async with self._kernel_lock:
                await work

        task = asyncio.get_running_loop().create_task(serialized())
        self._kernel_tasks.add(task)
        task.add_done_callback(self._kernel_tasks.discard)
        return task

    async def _nft_sources(self, nets: list[IPNetwork], *, add: bool) -> None:
        assert self.nft is not None
        try:
            if add:
                await self.nft.add_sources(nets)
            else:
                await self.nft.delete_sources(nets)
        except Exception as err:  # defence in depth: the in-process check still holds
            log.error("nftables anti-spoofing set update failed: %s", err)

    async def _route_del(self, net: IPNetwork) -> None:
        try:
            await self.net.del_route(net, self.settings.tun_name)
        except Exception as err:
            log.error("could not remove route %s: %s", net, err)

    # ---- operations ------------------------------------------------------------------

    def kick(self, name: str, reason: str = "kicked by an administrator") -> int:
        """Close every session of the named peer; returns how many were closed."""
        victims = [p for p in self.peers.values() if p.identity.name == name]
        for peer in victims:
            audit.warning(
                "kicked %s: %s",
                name,
                reason,
                extra={"event": "kick", "reason_text": reason, **_audit(peer)},
            )
            peer.driver.close(CloseCode.KICKED, reason)
        return len(victims)

    def apply_trust(self, trust: TrustStore) -> list[str]:
        """Adopt new CA/CRL data and close every live session it revokes, at once.

        Only revocation ends a live session here: a stale CRL refuses *new* peers (the
        verifier does that) but does not cut peers verified while it was fresh.
        """
        cas_changed = _root_set(trust) != _root_set(self.trust)
        self.trust = trust
        self.trust_error = None
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        closed: list[str] = []
        for peer in list(self.peers.values()):
            try:
                if cas_changed:
                    # A CA taken out of the bundle (say, compromised) ends its peers'
                    # sessions too: re-verify the chain each presented.
                    verify_peer(peer.chain, now=now, role=Role.PEER, trust=trust)
                check_revocation(peer.identity, trust, now=now)
            except VerifyError as err:
                if err.reason in (Reason.CRL_STALE, Reason.CRL_MISSING):
                    continue  # fail closed for new peers; verified sessions stay
                closed.append(peer.identity.name)
                revoked = err.reason is Reason.REVOKED
                audit.warning(
                    "closing %s: %s",
                    peer.identity.name,
                    "certificate revoked" if revoked else f"no longer trusted ({err.reason})",
                    extra={"event": "revoked_close", "detail": err.detail, **_audit(peer)},
                )
                peer.driver.close(
                    CloseCode.REVOKED if revoked else CloseCode.AUTH_FAILED, err.detail
                )
        return closed

    def apply_policy(self, policy: PolicyConfig) -> int:
        """Adopt new rules; tracked flows they no longer allow are cut at once."""
        self.policy = policy
        lookup = self.table.lookup_raw

        def view(addr: bytes) -> PeerView | None:
            owner = lookup(addr)
            return owner.view if owner is not None else None

        return self.firewall.replace_policy(policy, now=self._mono(), peers=view)

    async def refresh_host_addresses(self) -> int:
        """Tell the firewall this host's own non-overlay addresses; returns flows cut.

        Read at start, at each reload and every 5 s (``_expire_flows``), so an address
        added to the host later is protected within seconds. A netlink failure keeps the
        last set and is logged once.
        """
        try:
            found = await self.net.host_addresses()
        except NetError as err:
            if not self._host_addr_error:
                log.warning("cannot read this host's addresses (keeping the last set): %s", err)
            self._host_addr_error = True
            return 0
        self._host_addr_error = False
        overlay = {a.ip for a in self.settings.gateway_addresses}
        local = frozenset(a.packed for a in found if a not in overlay)
        if local == self.firewall.local_addresses:
            return 0
        lookup = self.table.lookup_raw

        def view(addr: bytes) -> PeerView | None:
            owner = lookup(addr)
            return owner.view if owner is not None else None

        return self.firewall.set_local_addresses(local, peers=view)

    async def _expire_flows(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.firewall.expire(self._mono())
            await self.refresh_host_addresses()

    def refuse_new_peers(self, reason: str) -> None:
        """Revocation data became unusable: fail closed for new peers until fixed."""
        if self.trust_error != reason:
            log.error("REFUSING ALL NEW PEERS: %s", reason)
        self.trust_error = reason

    # ---- events ----------------------------------------------------------------------

    def _on_event(self, peer: Peer, event: Event) -> None:
        match event:
            case PacketsReceived(packets=packets, vnet=vnet):
                self._from_peer(peer, packets, vnet)
            case HelloReceived():
                self._admit(peer)
            case ConfigReceived():
                pass  # the session rejects CONFIG sent to a gateway
            case SessionClosed(code=code, message=message, by_peer=by_peer):
                who = "peer" if by_peer else "gateway"
                peer.log.info("session closed by %s: %s %s", who, _code_name(code), message)

    def _on_lost(self, peer: Peer, code: int, message: str) -> None:
        self.peers.pop(peer.key, None)
        cert_key = (peer.identity.issuer, peer.identity.serial)
        if self._by_cert.get(cert_key) is peer:
            del self._by_cert[cert_key]
        name_key = (peer.identity.issuer, peer.identity.name)
        if self._by_name.get(name_key) is peer:
            del self._by_name[name_key]
        if peer.admitted:
            self.drops.update(peer.drops)
            self.totals.update(
                bytes_in=peer.bytes_in,
                bytes_out=peer.bytes_out,
                packets_in=peer.packets_in,
                packets_out=peer.packets_out,
            )
        if not peer.admitted:
            return
        peer.admitted = False
        owned = self.table.networks_of(peer)
        self.table.remove(peer)
        if owned:  # not when a newer session took the addresses over
            for addr in peer.identity.addresses:
                self.firewall.forget_address(addr.packed)
            self.firewall.forget_peer(peer.identity.name)
        routed = [n for n in owned if n in peer.identity.routes]
        for net in routed:
            self._kernel(self._route_del(net))
        if self.nft is not None and owned and not self._stopping:
            self._kernel(self._nft_sources(owned, add=False))
        peer.log.info("disconnected (%s), freed %s", message, ", ".join(str(n) for n in owned))

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
        budget = self.settings.peer_turn_packets
        used = peer.turn_packets
        if vnet:
            n = len(packets)
            for i, pkt in enumerate(packets):
                used += vnet_segments(pkt)
                if used >= budget:
                    n = i + 1
                    break
        else:
            n = min(len(packets), max(0, budget - used))
            used += n
        if used < budget:
            peer.turn_packets = used
        else:
            peer.turn_packets = 0
            peer.turn_yields += 1
            peer.waiting = True
            if n < len(packets):
                peer.backlog.appendleft((packets[n:], vnet))
                packets = packets[:n]
            peer.driver.conn.pause_delivery()
            asyncio.get_running_loop().call_soon(self._next_turn, peer)
        self._forward(peer, packets, vnet)

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

    def _forward(self, peer: Peer, packets: Sequence[bytes | memoryview], vnet: bool) -> None:
        to_tun: list[bytes | memoryview] = []
        to_peers: dict[Peer, list[bytes | memoryview]] = {}
        lookup = self.table.lookup_raw
        off = VNET_HDR_LEN if vnet else 0
        # Internally every packet has the TUN's form: header-prefixed on an offload TUN.
        prefix = self.tun.vnet_hdr and not vnet
        drops = peer.drops
        check = self.firewall.check_packet
        now = self._mono()
        for pkt in packets:
            if vnet and (bad := validate_vnet_packet(pkt)) is not None:
                drops[bad] += 1
                continue
            addrs = ip_src_dst(pkt, off)
            if addrs is None:
                drops["not_ip"] += 1
                continue
            src, dst = addrs
            if lookup(src) is not peer:
                drops["spoofed_source"] += 1
                continue
            other = lookup(dst)
            denied = check(
                pkt, offset=off, src=peer.view, dst=other.view if other else None, now=now
            )
            if denied is not None:
                drops[denied] += 1
                self._log_denied(peer, pkt, off, denied)
                continue
            peer.packets_in += 1
            peer.bytes_in += len(pkt) - off
            item = PLAIN_VNET + pkt if prefix else pkt
            if other is None:
                to_tun.append(item)
            elif other is peer:
                drops["hairpin"] += 1
            else:
                to_peers.setdefault(other, []).append(item)
        if to_tun:
            self.tun_writer.write_batch(to_tun)
        for other, batch in to_peers.items():
            self._to_peer(other, batch)

    def _to_peer(self, peer: Peer, packets: list[bytes | memoryview]) -> None:
        """Queue packets (in the TUN's form) to one peer, in the form that peer takes."""
        if not peer.admitted:
            return
        if peer.driver.conn.backlog_bytes > self.settings.peer_queue_bytes:
            # One slow peer must not stall the others or grow memory: drop, like a router.
            peer.drops["queue_full"] += len(packets)
            return
        if self.tun.vnet_hdr and not peer.offload:
            plain: list[bytes | memoryview] = []
            for pkt in packets:
                try:
                    plain.extend(to_plain(pkt))
                except GsoError as err:
                    peer.drops[str(err)] += 1
            packets = plain
        dropped = peer.driver.session.send_packets(packets, self._mono(), vnet=peer.offload)
        if dropped:
            peer.drops["oversize"] += dropped
        peer.packets_out += len(packets) - dropped
        peer.bytes_out += sum(len(p) for p in packets)
        peer.driver.flush()

    def _log_denied(self, peer: Peer, pkt: bytes | memoryview, off: int, reason: str) -> None:
        # Rate-limited: a peer scanning the LAN must not flood the log.
        if self._denied_log.allow(peer.identity.name, self._mono()):
            peer.log.info("denied %s (%s)", self.firewall.describe(pkt, off), reason)

    def _on_tun_readable(self) -> None:
        lookup = self.table.lookup_raw
        check = self.firewall.check_packet
        off = VNET_HDR_LEN if self.tun.vnet_hdr else 0
        for _ in range(16):  # bounded: let the loop serve sockets between bursts
            try:
                packets = self.tun.read_batch(64)
            except TunError as err:
                self._tun_lost(str(err))
                return
            if not packets:
                return
            batches: dict[Peer, list[bytes | memoryview]] = {}
            now = self._mono()
            for pkt in packets:
                addrs = ip_src_dst(pkt, off)
                if addrs is None:
                    self.drops["tun_not_ip"] += 1
                    continue
                owner = lookup(addrs[1])
                if owner is None:
                    self.drops["no_route"] += 1
                    continue
                # From the gateway/LAN side only replies to tracked flows get through.
                denied = check(pkt, offset=off, src=None, dst=owner.view, now=now)
                if denied is not None:
                    self.drops[f"tun_{denied}"] += 1
                    continue
                batches.setdefault(owner, []).append(pkt)
            for owner, batch in batches.items():
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


class _LogBudget:
    """At most ``per_minute`` lines per key per minute; the rest are counted, then summed up."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now: float) -> bool:
        start, used = self._windows.get(key, (now, 0))
        if now - start >= 60:
            if used > self.per_minute:
                log.info("%s: %d more similar lines suppressed", key, used - self.per_minute)
            start, used = now, 0
        self._windows[key] = (start, used + 1)
        if len(self._windows) > 10000:  # bounded: forget the oldest windows
            for old in list(self._windows)[:5000]:
                del self._windows[old]
        return used < self.per_minute


def _root_set(trust: TrustStore) -> set[bytes]:
    return {r.fingerprint(hashes.SHA256()) for r in trust.roots}


def _close_now(conn: Stream, code: CloseCode, message: str, now: float) -> None:
    """Refuse a connection that never became a session: one CLOSE frame, then close."""
    session = Session(SessionConfig(role="gateway"), now)
    session.close(code, message, now)
    conn.write(session.data_to_send())
    conn.close()


def _host(peername: tuple[str, int] | None) -> str:
    return peername[0] if peername else "?"


def _presented(conn: Stream) -> dict[str, str]:
    """Name, serial and fingerprint of the certificate a refused peer presented."""
    try:
        chain = conn.peer_chain()
        if not chain:
            return {}
        info = describe_certificate(x509.load_der_x509_certificate(chain[0]))
    except Exception:  # a refused peer's certificate may be anything
        return {}
    return {
        "peer": info.name or "?",
        "serial": f"{info.serial:x}",
        "fingerprint": info.fingerprint,
    }


def _fmt_remote(peername: tuple[str, int] | None) -> str:
    if peername is None:
        return "?"
    host, port = peername[0], peername[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addrs(identity: PeerIdentity) -> str:
    return ", ".join(str(a) for a in identity.addresses)


def _presented_der(der: bytes | None) -> dict[str, str]:
    """Name, serial and fingerprint of a certificate a peer presented in a refused
    handshake (never the certificate itself)."""
    if not der:
        return {}
    try:
        info = describe_certificate(x509.load_der_x509_certificate(der))
    except Exception:  # a refused peer's certificate may be anything
        return {}
    return {"peer": info.name or "?", "serial": f"{info.serial:x}", "fingerprint": info.fingerprint}


def _audit(peer: Peer) -> dict[str, object]:
    return {
        "peer": peer.identity.name,
        "serial": peer.identity.serial_hex,
        "fingerprint": peer.identity.fingerprint,
        "remote": peer.remote,
    }


def _code_name(code: int) -> str:
    try:
        return CloseCode(code).name
    except ValueError:
        return str(code)
