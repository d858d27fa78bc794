"""The gateway's decisions, without I/O: admission, the peer registry, trust and policy.

``GatewayCore`` takes events (a peer verified, its HELLO, packets from a peer or the
TUN, new trust or policy, a peer lost, a tick) with the caller's monotonic ``now`` and,
where certificate validity needs it, wall time; it returns effects (``effects.py``) for
its shell to carry out in order. The data path (``datapath.py``) shares its address
table and firewall, and stays batch-shaped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vpnd.config import PolicyConfig
from vpnd.gateway.admission import (
    IPInterface,
    bad_route,
    outside_overlay,
    reserved_address,
    tunnel_config,
)
from vpnd.gateway.audit import LogBudget, peer_fields, presented, who
from vpnd.gateway.datapath import DataPath
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
from vpnd.gateway.inventory_view import (
    InventoryView,
    Standing,
    effective_groups,
    possible_copy,
    refusal,
    to_supersede,
)
from vpnd.gateway.peer_state import PeerState
from vpnd.pki import TrustStore, check_revocation, verify_peer
from vpnd.pki.identity import IPAddress, IPNetwork, PeerIdentity, Reason, Role, VerifyError
from vpnd.pki.profile import describe_certificate, generation_of
from vpnd.policy.addresses import AddressConflict, AddressTable
from vpnd.policy.firewall import Firewall, PeerView
from vpnd.policy.takeover import CLONE_REASON, TakeoverGuard, Verdict
from vpnd.proto import CloseCode, TunnelConfig

INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR


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
    quarantine_grace: float = 0.0
    """Seconds after expiry a not-revoked, not-superseded peer may connect only to renew."""
    quarantine_seconds: float = 60.0
    """How long a quarantined session may stay to renew."""
    drain_seconds: float = 1.0
    """How long a renewed peer's old session is still read after the takeover."""


P = TypeVar("P", bound=PeerState)


class GatewayCore(Generic[P]):
    """The peer registry, the address table, the firewall and the counters.

    ``P`` is the shell's peer record (a ``PeerState`` with its connection attached), so
    the data path hands back the very objects the shell sends to.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        trust: TrustStore,
        policy: PolicyConfig | None = None,
        tun_vnet: bool = False,
        sources: bool = False,
    ) -> None:
        """``tun_vnet``: the TUN carries virtio headers. ``sources``: a kernel
        anti-spoofing set exists, so CONFIG waits for it (``AddSources.then``)."""
        self.settings = settings
        self.trust = trust
        self.trust_error: str | None = None
        """Set while the revocation data cannot be used: every new peer is refused."""
        self.policy = policy or PolicyConfig()
        self.firewall = Firewall(self.policy)
        self.tun_vnet = tun_vnet
        self.sources = sources
        self.stopping = False
        self.peers: dict[int, P] = {}
        self.table: AddressTable[P] = AddressTable()
        self.drops: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        """bytes/packets in/out of peers that have left (live peers hold their own), so
        that exported counters only ever grow; ``clone_holddowns`` counts hold-downs started."""
        self.notes: list[Log] = []
        """Log lines outside any event's effects (denied packets, log-budget summaries):
        the shell takes them after each batch and each event."""
        self._keys = itertools.count(1)
        self._by_cert: dict[tuple[str, int], P] = {}
        self._by_name: dict[tuple[str, str], P] = {}
        self._takeovers = TakeoverGuard(
            settings.holddown_takeovers, settings.holddown_window, settings.holddown_hold
        )
        self._refusal_log = LogBudget(10, self.notes)
        self._copy_log = LogBudget(10, self.notes)
        """Copies are audited apart from other refusals, and bounded per copy."""
        self.inventory: InventoryView | None = None
        """The CA inventory as last read (None: the gateway runs without one)."""
        self._quarantine_next: tuple[str, int] | None = None
        self.datapath: DataPath[P] = DataPath(
            self.table, self.firewall, self.drops, self.notes, tun_vnet=tun_vnet
        )
        # Bound once: the shell's per-batch calls go straight to the data path.
        self.from_peer = self.datapath.from_peer
        self.from_tun = self.datapath.from_tun
        self.outbound = self.datapath.outbound
        self.sent = self.datapath.sent
        self.configured = self.datapath.configured

    # ---- connections -----------------------------------------------------------------

    def next_key(self) -> int:
        return next(self._keys)

    def verify(
        self, chain: tuple[bytes, ...], remote: str, host: str, *, wall: float, now: float
    ) -> PeerIdentity | list[Effect]:
        """A TLS handshake completed: the verified identity, or the effects refusing it."""
        if len(self.peers) - len(self.table) >= self.settings.max_unadmitted:
            self.handshakes["refused_resource_limit"] += 1
            return [Refuse(CloseCode.RESOURCE_LIMIT, "too many sessions setting up")]
        if self.trust_error is not None:
            # Revocation data is missing or unusable: fail closed for new peers.
            err = VerifyError(Reason.CRL_MISSING, self.trust_error)
            return self._refuse_unverified(chain, remote, host, err, now)
        when = dt.datetime.fromtimestamp(wall, dt.UTC)
        self._quarantine_next = None
        try:
            identity = verify_peer(chain, now=when, role=Role.PEER, trust=self.trust)
        except VerifyError as err:
            quarantined = self._quarantine_identity(chain, err, when)
            if quarantined is None:
                return self._refuse_unverified(chain, remote, host, err, now)
            identity = quarantined
        if self.inventory is not None:
            refused = refusal(identity, self.inventory, when)
            if refused is not None:
                self._quarantine_next = None
                why = VerifyError(refused.reason, refused.detail)
                return self._refuse_unverified(chain, remote, host, why, now)
        return identity

    def _quarantine_identity(
        self, chain: tuple[bytes, ...], err: VerifyError, when: dt.datetime
    ) -> PeerIdentity | None:
        """An expired certificate within the grace window: verified as of just before
        its expiry, and against today's CRLs; None if it does not qualify."""
        grace = self.settings.quarantine_grace
        if err.reason is not Reason.EXPIRED or grace <= 0 or not chain:
            return None
        try:
            not_after = x509.load_der_x509_certificate(chain[0]).not_valid_after_utc
        except ValueError:
            return None
        if not not_after < when <= not_after + dt.timedelta(seconds=grace):
            return None
        try:
            ident = verify_peer(
                chain, now=not_after - dt.timedelta(seconds=1), role=Role.PEER, trust=self.trust
            )
            check_revocation(ident, self.trust, now=when)  # today's CRLs, fresh, or refused
        except VerifyError:
            return None
        if not self._cas_valid(chain, ident, when):
            return None  # only the leaf may have expired, never its issuer or the root
        self._quarantine_next = (ident.issuer, ident.serial)
        return ident

    def _cas_valid(self, chain: tuple[bytes, ...], ident: PeerIdentity, when: dt.datetime) -> bool:
        try:
            cas = [x509.load_der_x509_certificate(der) for der in chain[1:]]
        except ValueError:
            return False
        cas += [r for r in self.trust.roots if _is_root_of(r, ident)]
        return all(c.not_valid_before_utc <= when < c.not_valid_after_utc for c in cas)

    def _refuse_unverified(
        self, chain: tuple[bytes, ...], remote: str, host: str, err: VerifyError, now: float
    ) -> list[Effect]:
        self.handshakes[f"refused_{err.reason.value}"] += 1
        out: list[Effect] = []
        copy = err.reason is Reason.POSSIBLE_COPY
        if copy or self._refusal_log.allow(host, now):  # every copy is audited
            found = presented(chain[0] if chain else None)
            event = "possible_copy" if copy else "auth_refused"
            fields = {"event": event, "remote": remote, "reason": err.reason.value}
            out.append(Audit(WARNING, f"refused {remote}{who(found)}: {err}", {**fields, **found}))
        # The handshake already succeeded, so no TLS alert can carry our reason: a
        # CLOSE frame does, and the client prints it.
        expired = _expired_at(chain) if err.reason is Reason.EXPIRED else None
        if expired is not None:
            # (With a quarantine grace OpenSSL lets expired peers through; past the grace
            # they hear the same sentence as a session cut at notAfter.)
            out.append(Refuse(CloseCode.CERT_EXPIRED, expired))
        else:
            out.append(Refuse(CloseCode.AUTH_FAILED, err.reason.value))
        return out

    def tls_refused(
        self,
        remote: str,
        host: str,
        reason: str,
        text: str,
        der: bytes | None,
        *,
        by_peer: bool,
        now: float,
        wall: float | None = None,
    ) -> list[Effect]:
        """OpenSSL refused a handshake (and sent the alert): count and audit it."""
        self.handshakes[f"refused_{reason}"] += 1
        copy = self._copy_in_handshake(der, wall)
        if copy is not None and self._copy_log.allow(copy, now):
            # The issuer CRL lists superseded serials, so OpenSSL refuses them first:
            # still say what it is, a copy of a renewed certificate, every time.
            seen = presented(der)
            copied = {"event": "possible_copy", "remote": remote, "reason": "possible_copy"}
            msg = f"refused {remote}{who(seen)} in the TLS handshake: {copy}"
            return [Audit(WARNING, msg, {**copied, **seen})]
        if not self._refusal_log.allow(host, now):
            return []  # counted above; a flood from one address must not flood the log
        found = presented(der)
        fields: dict[str, object] = {
            "event": "auth_refused",
            "remote": remote,
            "reason": reason,
            "by_peer": by_peer,
        }
        msg = f"refused {remote}{who(found)} in the TLS handshake: {text}"
        return [Audit(WARNING, msg, {**fields, **found})]

    def _copy_in_handshake(self, der: bytes | None, wall: float | None) -> str | None:
        if der is None or self.inventory is None or wall is None:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
            info = describe_certificate(cert)
            generation = generation_of(cert)
        except Exception:  # a refused peer's certificate may be anything
            return None
        # Only a certificate the inventory itself superseded: a forged look-alike
        # (self-signed, same name) must not raise a false alarm about a real user.
        if info.fingerprint not in self.inventory.superseded_fingerprints:
            return None
        name = info.name
        when = dt.datetime.fromtimestamp(wall, dt.UTC)
        found = possible_copy(name, cert.serial_number, generation, self.inventory, when)
        return None if found is None else found.detail

    def add(self, peer: P) -> list[Effect]:
        """A verified peer's session started; it holds nothing until its HELLO."""
        ident = peer.identity
        self.peers[peer.key] = peer
        if self._quarantine_next == (ident.issuer, ident.serial):
            self._quarantine_next = None
            return self._quarantine(peer)
        peer.view = PeerView(ident.name, effective_groups(ident, self.inventory))
        addrs = ", ".join(str(a) for a in ident.addresses)
        return [Log(INFO, f"authenticated serial {ident.serial_hex}, addresses {addrs}", peer.key)]

    def _quarantine(self, peer: P) -> list[Effect]:
        ident = peer.identity
        peer.quarantined = True
        peer.view = PeerView(ident.name, frozenset())
        self.totals["quarantines"] += 1
        expired = ident.not_after.isoformat()
        fields = {"event": "quarantine_admitted", "expired": expired, **self._fields(peer)}
        return [
            Audit(
                WARNING,
                f"quarantined {ident.name}: certificate expired {expired}; admitted only to renew",
                fields,
            )
        ]

    # ---- admission -------------------------------------------------------------------

    def hello(self, peer: P, *, offload: bool, now: float) -> list[Effect]:
        """The peer's HELLO arrived: admit it (addresses, routes, CONFIG) or close it."""
        ident = peer.identity
        if peer.quarantined:
            # No CONFIG, no addresses, no routes: the session may only renew.
            return [
                Log(INFO, "quarantined: expired certificate, admitted only to renew", peer.key),
                Quarantine(peer.key, self.settings.quarantine_seconds),
            ]
        networks = [ipaddress.ip_network(a) for a in ident.addresses] + list(ident.routes)
        s = self.settings
        why = outside_overlay(networks[: len(ident.addresses)], s.overlay_networks)
        if why is not None:
            return [Close(peer.key, CloseCode.POLICY, why)]
        why = reserved_address(ident.addresses, s.overlay_networks, s.gateway_addresses)
        if why is not None:
            fields = {"event": "auth_refused", "reason": "reserved_address"}
            return [
                Audit(WARNING, f"refused {ident.name}: {why}", {**fields, **self._fields(peer)}),
                Close(peer.key, CloseCode.POLICY, why),
            ]
        why = bad_route(ident.routes, s.overlay_networks, s.push_routes)
        if why is not None:
            return [Close(peer.key, CloseCode.POLICY, why)]
        out: list[Effect] = []
        old = self._predecessor(peer, now, out)
        if out:
            return out
        if old is None and len(self.table) >= s.max_sessions:
            return [Close(peer.key, CloseCode.RESOURCE_LIMIT, "gateway is at its session limit")]
        try:
            self.table.conflicts(networks, ignore=old)
        except AddressConflict as err:
            return self._conflict(peer, err)
        if old is not None:
            self._take_over(peer, old, networks, now, out)
        else:
            self.table.add(peer, networks)
        self._accept(peer, networks, offload, out)
        return out

    def _predecessor(self, peer: P, now: float, out: list[Effect]) -> P | None:
        """The session ``peer`` replaces (same certificate, or an older one of the same
        peer), or None; a refusal goes into ``out``."""
        ident = peer.identity
        # O(1): admission cost must not grow with the number of connected peers.
        old = self._by_cert.get((ident.issuer, ident.serial))
        if old is None:
            # The same peer (name, CA) with another certificate: a renewal. The newer
            # certificate takes over without a gap; an older one (a stale copy, maybe a
            # leaked one) never evicts the newer.
            old = self._by_name.get((anchor_of(ident), ident.name))
            # Newer means a later generation, then issued later, not valid longer: a lost
            # laptop's long-lived certificate must not beat the one issued to replace it.
            if old is not None and _age(ident) < _age(old.identity):
                msg = "a newer certificate of this peer is already connected"
                out.append(Close(peer.key, CloseCode.ADDRESS_CONFLICT, msg))
            return old
        if self.settings.duplicate == "reject":
            out.append(Close(peer.key, CloseCode.REPLACED, "this certificate is already connected"))
            return old
        guard, s = self._takeovers, self.settings  # a reload may have changed them
        guard.takeovers, guard.window, guard.hold = (
            s.holddown_takeovers,
            s.holddown_window,
            s.holddown_hold,
        )
        verdict = guard.takeover((ident.issuer, ident.serial), now)
        if verdict is Verdict.ALLOW:
            return old
        self.handshakes["refused_clone_holddown"] += 1
        if verdict is Verdict.HOLD_START:
            self.totals["clone_holddowns"] += 1
            msg = (
                f"holding down {ident.name} from {peer.remote}: {CLONE_REASON} "
                f"(the session from {old.remote} stays)"
            )
            fields = {
                "event": "clone_holddown",
                "reason": "possible_copy",
                "holder_remote": old.remote,
            }
            out.append(Audit(WARNING, msg, {**fields, **self._fields(peer)}))
        out.append(Close(peer.key, CloseCode.POLICY, CLONE_REASON))
        return old

    def _conflict(self, peer: P, err: AddressConflict) -> list[Effect]:
        # Our own log may name both peers; the refused peer learns only the address
        # (its certificate claims it), never who holds it.
        holder = err.owner.identity if isinstance(err.owner, PeerState) else None
        held_by = f"{holder.name} (serial {holder.serial_hex})" if holder else "another peer"
        fields = {
            "event": "auth_refused",
            "reason": "address_conflict",
            "network": str(err.network),
            "holder": holder.name if holder else "?",
            "holder_serial": holder.serial_hex if holder else "?",
        }
        name = peer.identity.name
        return [
            Log(WARNING, f"refused: {err.network} is already owned by {held_by}", peer.key),
            Audit(
                WARNING,
                f"refused {name}: address conflict with {held_by}",
                {**fields, **self._fields(peer)},
            ),
            Close(peer.key, CloseCode.ADDRESS_CONFLICT, f"{err.network} is held by another peer"),
        ]

    def _take_over(
        self, peer: P, old: P, networks: list[IPNetwork], now: float, out: list[Effect]
    ) -> None:
        # Atomic takeover: the shell runs nothing between these lines, so no packet sees
        # a moment where two sessions (or none) own the addresses.
        ident = peer.identity
        stale = [n for n in self.table.networks_of(old) if n not in networks]
        self.table.remove(old)
        self.table.add(peer, networks)
        if self.sources and stale:
            out.append(RemoveSources(tuple(stale)))
        if stale or old.identity.groups != ident.groups:
            # Flows opened under the old certificate are judged again as the new one.
            self.apply_policy(self.policy, now=now)
        renewal = old.identity.serial != ident.serial or old.identity.issuer != ident.issuer
        why = "renewed certificate" if renewal else "newer connection"
        out.append(Log(INFO, f"replaced by a {why} from {peer.remote}", old.key))
        fields = {"event": "replaced", "old_serial": old.identity.serial_hex}
        out.append(
            Audit(INFO, f"{ident.name} replaced by a {why}", {**fields, **self._fields(peer)})
        )
        out.extend(RemoveRoute(n) for n in old.identity.routes if n not in ident.routes)
        if renewal:
            # Make-before-break: what the old session still carries is delivered.
            old.successor = peer
            msg = f"replaced by a {why}"
            out.append(Drain(old.key, self.settings.drain_seconds, CloseCode.REPLACED, msg))
        else:
            out.append(Close(old.key, CloseCode.REPLACED, f"replaced by a {why}"))

    def _accept(self, peer: P, networks: list[IPNetwork], offload: bool, out: list[Effect]) -> None:
        ident = peer.identity
        peer.admitted = True
        self._by_cert[(ident.issuer, ident.serial)] = peer
        self._by_name[(anchor_of(ident), ident.name)] = peer
        self._first_use(peer, out)
        peer.offload = self.tun_vnet and offload
        self.handshakes["accepted"] += 1
        out.extend(AddRoute(peer.key, n) for n in ident.routes)
        out.append(
            Audit(INFO, f"accepted {ident.name}", {"event": "auth_accepted", **self._fields(peer)})
        )
        config = SendConfig(peer.key, self.tunnel_config(peer))
        # CONFIG only once the kernel's anti-spoofing set admits the peer's sources,
        # else its first packets would die in nftables.
        out.append(AddSources(tuple(networks), then=config) if self.sources else config)

    def tunnel_config(self, peer: PeerState) -> TunnelConfig:
        s = self.settings
        return tunnel_config(
            peer.identity,
            overlays=s.overlay_networks,
            gateway=s.gateway_addresses,
            pushed=s.push_routes,
            mtu=s.mtu,
            keepalive_interval=s.keepalive_interval,
            keepalive_timeout=s.keepalive_timeout,
            offload=peer.offload,
        )

    def lost(self, peer: P, message: str) -> list[Effect]:
        """The peer's session ended: free what it held, keep its counters in the totals."""
        self.peers.pop(peer.key, None)
        ident = peer.identity
        cert_key = (ident.issuer, ident.serial)
        if self._by_cert.get(cert_key) is peer:
            del self._by_cert[cert_key]
        name_key = (anchor_of(ident), ident.name)
        if self._by_name.get(name_key) is peer:
            del self._by_name[name_key]
        if not peer.admitted:
            return []
        self.drops.update(peer.drops)
        self.totals.update(
            bytes_in=peer.bytes_in,
            bytes_out=peer.bytes_out,
            packets_in=peer.packets_in,
            packets_out=peer.packets_out,
        )
        peer.admitted = False
        owned = self.table.networks_of(peer)
        self.table.remove(peer)
        if owned:  # not when a newer session took the addresses over
            for addr in ident.addresses:
                self.firewall.forget_address(addr.packed)
            self.firewall.forget_peer(ident.name)
        out: list[Effect] = [RemoveRoute(n) for n in owned if n in ident.routes]
        if self.sources and owned and not self.stopping:
            out.append(RemoveSources(tuple(owned)))
        freed = ", ".join(str(n) for n in owned)
        out.append(Log(INFO, f"disconnected ({message}), freed {freed}", peer.key))
        return out

    # ---- operations ------------------------------------------------------------------

    def kick(self, name: str, reason: str) -> list[Effect]:
        """Close every session of the named peer."""
        out: list[Effect] = []
        for peer in [p for p in self.peers.values() if p.identity.name == name]:
            fields = {"event": "kick", "reason_text": reason, **self._fields(peer)}
            out.append(Audit(WARNING, f"kicked {name}: {reason}", fields))
            out.append(Close(peer.key, CloseCode.KICKED, reason))
        return out

    def apply_trust(self, trust: TrustStore, *, wall: float) -> tuple[list[str], list[Effect]]:
        """Adopt new CA/CRL data; the names of the live sessions it ends, and the effects.

        Only revocation ends a live session here: a stale CRL refuses *new* peers (the
        verifier does that) but does not cut peers verified while it was fresh.
        """
        cas_changed = _root_set(trust) != _root_set(self.trust)
        self.trust = trust
        self.trust_error = None
        now = dt.datetime.fromtimestamp(wall, dt.UTC)
        closed: list[str] = []
        out: list[Effect] = []
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
                why = "certificate revoked" if revoked else f"no longer trusted ({err.reason})"
                fields = {"event": "revoked_close", "detail": err.detail, **self._fields(peer)}
                out.append(Audit(WARNING, f"closing {peer.identity.name}: {why}", fields))
                code = CloseCode.REVOKED if revoked else CloseCode.AUTH_FAILED
                out.append(Close(peer.key, code, err.detail))
        return closed, out

    def _first_use(self, peer: P, out: list[Effect]) -> None:
        """A renewed certificate's first admission supersedes the name's older ones, here
        at once and (through the effect) in the inventory and the issuer's CRL."""
        ident = peer.identity
        older = to_supersede(ident, self.inventory)
        if not older or self.inventory is None:
            return
        view = self.inventory
        standing = view.names[ident.name]
        names = {**view.names, ident.name: _without_older(standing)}
        self.inventory = dataclasses.replace(view, names=names, superseded=view.superseded | older)
        out.append(Supersede(ident.name, ident.serial, older))

    def apply_inventory(self, view: InventoryView, *, now: float) -> list[Effect]:
        """Adopt a fresh read of the inventory: cut revoked and superseded sessions, and
        cap every live peer's groups by its record, re-judging tracked flows at once."""
        self.inventory = view
        out: list[Effect] = []
        regroup = False
        for peer in list(self.peers.values()):
            ident = peer.identity
            if peer.successor is not None:
                continue  # draining after its own renewal
            cut = ident.serial in view.revoked or ident.serial in view.superseded
            if cut:
                revoked = ident.serial in view.revoked
                why = "certificate revoked" if revoked else "certificate superseded by a renewal"
                fields = {"event": "inventory_close", "detail": why, **self._fields(peer)}
                out.append(Audit(WARNING, f"closing {ident.name}: {why}", fields))
                code = CloseCode.REVOKED if revoked else CloseCode.REPLACED
                out.append(Close(peer.key, code, why))
                continue
            if peer.quarantined:
                continue
            if peer.admitted:
                # The renewal may have been admitted before this view listed it as
                # current: supersede now (idempotent; a failed write is retried here).
                self._first_use(peer, out)
            groups = effective_groups(ident, view)
            if groups != peer.view.groups:
                before = sorted(peer.view.groups)
                peer.view = PeerView(ident.name, groups)
                regroup = True
                fields = {"event": "groups_changed", "before": before, "after": sorted(groups)}
                msg = f"{ident.name}: groups now {', '.join(sorted(groups)) or '(none)'}"
                out.append(Audit(INFO, msg, {**fields, **self._fields(peer)}))
        if regroup:
            cut_flows = self.apply_policy(self.policy, now=now)
            if cut_flows:
                out.append(Log(INFO, f"group change: {cut_flows} tracked flows cut"))
        return out

    def sessions_of(self, name: str) -> list[P]:
        """The live (not draining) sessions of ``name``."""
        return [p for p in self.peers.values() if p.identity.name == name and p.successor is None]

    def refuse_new_peers(self, reason: str) -> list[Effect]:
        """Revocation data became unusable: fail closed for new peers until fixed."""
        changed = self.trust_error != reason
        self.trust_error = reason
        return [Log(ERROR, f"REFUSING ALL NEW PEERS: {reason}")] if changed else []

    def apply_policy(self, policy: PolicyConfig, *, now: float) -> int:
        """Adopt new rules; tracked flows they no longer allow are cut at once."""
        self.policy = policy
        return self.firewall.replace_policy(policy, now=now, peers=self._view)

    def host_addresses(self, found: Sequence[IPAddress]) -> int:
        """This host's addresses as netlink reads them; returns how many flows were cut."""
        overlay = {a.ip for a in self.settings.gateway_addresses}
        local = frozenset(a.packed for a in found if a not in overlay)
        if local == self.firewall.local_addresses:
            return 0
        return self.firewall.set_local_addresses(local, peers=self._view)

    def tick(self, now: float) -> int:
        """Every few seconds: expire idle flows; returns how many."""
        return self.firewall.expire(now)

    def _view(self, addr: bytes) -> PeerView | None:
        owner = self.table.lookup_raw(addr)
        return owner.view if owner is not None else None

    def _fields(self, peer: PeerState) -> dict[str, object]:
        return peer_fields(peer.identity, peer.remote)


def _expired_at(chain: tuple[bytes, ...]) -> str | None:
    try:
        return x509.load_der_x509_certificate(chain[0]).not_valid_after_utc.isoformat()
    except (ValueError, IndexError):
        return None


def anchor_of(ident: PeerIdentity) -> str:
    """The CA a peer's chain ends at, as a lineage: a renewal signed by the online issuer
    is the same peer as the root-signed certificate it replaces, and a certificate under
    a rotated root (the next generation of the same CA) the same as one under the old."""
    if ident.lineage:
        return ident.lineage
    if ident.chain_serials:
        return ident.chain_serials[-1][0]
    return ident.issuer


def _is_root_of(root: x509.Certificate, ident: PeerIdentity) -> bool:
    if ident.root_fingerprint:
        return root.fingerprint(hashes.SHA256()).hex() == ident.root_fingerprint
    return root.subject.rfc4514_string() == anchor_of(ident)


def _age(ident: PeerIdentity) -> tuple[int, dt.datetime, int]:
    return (ident.generation, ident.not_before, ident.serial)


def _without_older(standing: Standing) -> Standing:
    return Standing(
        groups=standing.groups,
        generation=standing.generation,
        current_serial=standing.current_serial,
        current_not_after=standing.current_not_after,
    )


def _root_set(trust: TrustStore) -> set[bytes]:
    return {r.fingerprint(hashes.SHA256()) for r in trust.roots}
