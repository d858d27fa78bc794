"""The gateway core and the certificate lifecycle: the inventory as a ceiling and a
refusal list, supersede on first use, the drain of a renewed session, quarantine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress

from cryptography.hazmat.primitives.serialization import Encoding
from gateway_fixtures import World, closes, ident, of_type
from pki_fixtures import DAY, NOW, Leaf, make_ca
from policy_fixtures import ACK, SYN, TCP, ipv4, tcp

from vpnd.config import GroupMatch, NetworkMatch, PolicyConfig, Proto, RuleConfig
from vpnd.gateway.effects import Audit, Drain, Log, Quarantine, Refuse, Supersede
from vpnd.gateway.inventory_view import InventoryView, Standing, refusal
from vpnd.pki.identity import PeerIdentity, Reason
from vpnd.pki.keys import fingerprint
from vpnd.proto import CloseCode

LAN = "192.168.50.10"
ENG_TO_LAN = PolicyConfig(
    rules=(
        RuleConfig(
            GroupMatch(frozenset({"eng"})),
            NetworkMatch(ipaddress.ip_network("192.168.50.0/24")),
            Proto.ANY,
        ),
    )
)
FAR = NOW + 30 * DAY


def standing(
    *groups: str,
    generation: int = 1,
    current: int | None = 1,
    until: dt.datetime | None = FAR,
    older: frozenset[int] = frozenset(),
) -> Standing:
    return Standing(frozenset(groups), generation, current, until, older)


def view(
    stamp: int = 1, superseded: frozenset[int] = frozenset(), **names: Standing
) -> InventoryView:
    return InventoryView(names=names, superseded=superseded, stamp=stamp)


def gen(identity: PeerIdentity, generation: int) -> PeerIdentity:
    return dataclasses.replace(identity, generation=generation)


# ---- refusal: what the inventory says about a certificate -----------------------------


def test_refusal_rules() -> None:
    alice = ident("alice", "10.8.0.2", serial=5)
    assert refusal(alice, view(alice=standing(current=5)), NOW) is None
    revoked = InventoryView(revoked=frozenset({5}))
    found = refusal(alice, revoked, NOW)
    assert found is not None and found.reason is Reason.REVOKED
    sup = view(superseded=frozenset({5}), alice=standing(current=6, generation=1))
    found = refusal(alice, sup, NOW)
    assert found is not None and found.reason is Reason.SUPERSEDED
    # An older generation than the current, valid certificate: a copy.
    copy = view(superseded=frozenset({5}), alice=standing(current=6, generation=3))
    found = refusal(alice, copy, NOW)
    assert found is not None and found.reason is Reason.POSSIBLE_COPY
    assert "bob" not in found.detail  # never another peer's identity
    # ... unless the current one is no longer valid, or never used (its predecessor).
    assert refusal(alice, view(alice=standing(current=6, generation=3, until=None)), NOW) is None
    unused = view(alice=standing(current=6, generation=3, older=frozenset({5})))
    assert refusal(alice, unused, NOW) is None


# ---- the inventory as a ceiling on groups -----------------------------------------------


def test_a_group_removed_in_the_inventory_cuts_flows_at_once() -> None:
    w = World(policy=ENG_TO_LAN)
    w.core.inventory = view(alice=standing("eng", "ops"))
    alice, _ = w.join(ident("alice", "10.8.0.2", groups=["eng", "ops"]))
    assert alice.view.groups == {"eng", "ops"}
    syn = ipv4("10.8.0.2", LAN, TCP, tcp(40000, 22, SYN))
    reply = ipv4(LAN, "10.8.0.2", TCP, tcp(22, 40000, SYN | ACK))
    assert w.core.from_peer(alice, [syn], False, w.now)[0] == [syn]
    assert w.core.from_tun([reply], w.now) == {alice: [reply]}
    effects = w.core.apply_inventory(view(2, alice=standing("ops")), now=w.now)
    assert alice.view.groups == {"ops"}
    changed = [a for a in of_type(effects, Audit) if a.fields["event"] == "groups_changed"]
    assert changed and changed[0].fields["after"] == ["ops"]
    assert not closes(effects)  # the session stays; only what it may reach changes
    assert w.core.from_tun([reply], w.now) == {}  # the tracked flow is cut
    assert w.core.from_peer(alice, [syn], False, w.now)[0] == []
    # A group the certificate never had is never granted by the inventory.
    w.core.apply_inventory(view(3, alice=standing("ops", "admin")), now=w.now)
    assert alice.view.groups == {"ops"}


def test_inventory_closes_revoked_and_superseded_sessions() -> None:
    w = World()
    alice, _ = w.join(ident("alice", "10.8.0.2", serial=1))
    bob, _ = w.join(ident("bob", "10.8.0.3", serial=2))
    effects = w.core.apply_inventory(
        InventoryView(revoked=frozenset({1}), superseded=frozenset({2}), stamp=2), now=w.now
    )
    assert closes(effects) == [
        (alice.key, CloseCode.REVOKED, "certificate revoked"),
        (bob.key, CloseCode.REPLACED, "certificate superseded by a renewal"),
    ]


# ---- renewal: supersede on first use, drain of the old session ----------------------------


def test_first_use_of_a_renewal_supersedes_and_drains() -> None:
    w = World(policy=ENG_TO_LAN)
    w.core.inventory = view(alice=standing("eng", current=2, generation=2, older=frozenset({1})))
    old, _ = w.join(gen(ident("alice", "10.8.0.2", serial=1, groups=["eng"]), 1))
    new, effects = w.join(
        gen(ident("alice", "10.8.0.2", serial=2, groups=["eng"], not_before=NOW), 2)
    )
    assert of_type(effects, Supersede) == [Supersede("alice", 2, frozenset({1}))]
    assert of_type(effects, Drain) == [
        Drain(old.key, 1.0, CloseCode.REPLACED, "replaced by a renewed certificate")
    ]
    assert w.core.inventory is not None and 1 in w.core.inventory.superseded
    # In flight on the old session: still the same peer's, delivered, not "spoofed".
    syn = ipv4("10.8.0.2", LAN, TCP, tcp(40000, 22, SYN))
    assert w.core.from_peer(old, [syn], False, w.now)[0] == [syn]
    assert old.drops["spoofed_source"] == 0
    # Replies already go to the new session.
    reply = ipv4(LAN, "10.8.0.2", TCP, tcp(22, 40000, SYN | ACK))
    assert list(w.core.from_tun([reply], w.now)) == [new]
    # A draining session is not cut by the view that now lists it as superseded.
    assert not closes(w.core.apply_inventory(w.core.inventory, now=w.now))
    # A different peer's packets with alice's source stay spoofed.
    bob, _ = w.join(ident("bob", "10.8.0.3", serial=7))
    w.core.from_peer(bob, [syn], False, w.now)
    assert bob.drops["spoofed_source"] == 1


def test_an_older_generation_never_takes_over() -> None:
    w = World()
    w.join(gen(ident("alice", "10.8.0.2", serial=9, not_before=NOW - DAY), 3))
    late, effects = w.join(gen(ident("alice", "10.8.0.2", serial=4, not_before=NOW), 2))
    assert closes(effects) == [
        (
            late.key,
            CloseCode.ADDRESS_CONFLICT,
            "a newer certificate of this peer is already connected",
        )
    ]


def test_a_renewal_by_the_issuer_takes_over_a_root_signed_session() -> None:
    root = make_ca("corp", networks=["10.8.0.0/24"], path_length=1)
    issuer = root.intermediate("issuer")
    w = World(trust=issuer.trust())
    first = root.issue("alice", addresses=["10.8.0.2"])
    renewed = issuer.issue("alice", addresses=["10.8.0.2"], not_before=NOW, generation=2)
    a = w.connect(_verified(w, first))
    w.hello(a)
    b = w.connect(_verified(w, renewed))
    effects = w.hello(b)
    assert b.admitted and of_type(effects, Drain)


def _verified(w: World, leaf: Leaf) -> PeerIdentity:
    chain = tuple(c.public_bytes(Encoding.DER) for c in leaf.chain)
    found = w.core.verify(
        chain, "198.51.100.7:5000", "198.51.100.7", wall=NOW.timestamp(), now=w.now
    )
    assert not isinstance(found, list), found
    return found


# ---- quarantine ---------------------------------------------------------------------------


def test_quarantine_admits_an_expired_peer_only_to_renew() -> None:
    ca = make_ca("corp", networks=["10.8.0.0/24"])
    expired = ca.issue(
        "alice", addresses=["10.8.0.2"], not_before=NOW - 10 * DAY, not_after=NOW - DAY
    )
    w = World(trust=ca.trust(), quarantine_grace=2 * 86400.0)
    identity = _verified(w, expired)
    peer = w.connect(identity)
    assert peer.quarantined and peer.view.groups == frozenset()
    effects = w.hello(peer)
    assert of_type(effects, Quarantine) == [Quarantine(peer.key, 60.0)]
    assert not peer.admitted and of_type(effects, Log)
    assert w.core.table.lookup(ipaddress.ip_address("10.8.0.2")) is None
    assert w.core.totals["quarantines"] == 1


def test_quarantine_refuses_outside_the_grace_revoked_or_superseded() -> None:
    ca = make_ca("corp", networks=["10.8.0.0/24"])
    old = ca.issue(
        "alice", addresses=["10.8.0.2"], not_before=NOW - 10 * DAY, not_after=NOW - 3 * DAY
    )

    def try_(w: World, leaf: Leaf) -> object:
        chain = tuple(c.public_bytes(Encoding.DER) for c in leaf.chain)
        return w.core.verify(
            chain, "198.51.100.7:1", "198.51.100.7", wall=NOW.timestamp(), now=w.now
        )

    outside = try_(World(trust=ca.trust(), quarantine_grace=2 * 86400.0), old)
    assert isinstance(outside, list)  # expired 3 days ago, grace 2 days
    (told,) = of_type(outside, Refuse)  # the same plain sentence as a cut at notAfter
    assert told.code is CloseCode.CERT_EXPIRED
    assert told.message == old.cert.not_valid_after_utc.isoformat()
    recent = ca.issue(
        "alice", addresses=["10.8.0.2"], not_before=NOW - 10 * DAY, not_after=NOW - DAY
    )
    revoked = try_(World(trust=ca.trust(revoked=[recent]), quarantine_grace=2 * 86400.0), recent)
    assert isinstance(revoked, list)
    w = World(trust=ca.trust(), quarantine_grace=2 * 86400.0)
    w.core.inventory = view(superseded=frozenset({recent.cert.serial_number}))
    assert isinstance(try_(w, recent), list)
    assert isinstance(try_(World(trust=ca.trust()), recent), list)  # grace off: refused


def test_a_copy_refused_by_openssl_is_still_audited_as_a_possible_copy() -> None:
    ca = make_ca("corp", networks=["10.8.0.0/24"])
    copy = ca.issue("alice", addresses=["10.8.0.2"], generation=1)
    w = World(trust=ca.trust())
    forged = make_ca("corp", networks=["10.8.0.0/24"]).issue(
        "alice", serial=copy.cert.serial_number
    )
    w.core.inventory = dataclasses.replace(
        view(
            superseded=frozenset({copy.cert.serial_number}),
            alice=standing(current=99, generation=3),
        ),
        superseded_fingerprints=frozenset({fingerprint(copy.cert)}),
    )
    # A look-alike from another CA, same name and serial: no false alarm about alice.
    look_alike = (
        "198.51.100.9:4000",
        "198.51.100.9",
        "unknown_ca",
        "unknown ca",
        forged.cert.public_bytes(Encoding.DER),
    )
    (plain,) = w.core.tls_refused(*look_alike, by_peer=False, now=w.now, wall=NOW.timestamp())
    assert isinstance(plain, Audit) and plain.fields["event"] == "auth_refused"
    der = copy.cert.public_bytes(Encoding.DER)
    args = ("198.51.100.9:4000", "198.51.100.9", "certificate_revoked", "revoked", der)
    (audit,) = w.core.tls_refused(*args, by_peer=False, now=w.now, wall=NOW.timestamp())
    assert isinstance(audit, Audit) and audit.fields["event"] == "possible_copy"
    assert "possible copy" in audit.message and audit.fields["peer"] == "alice"
    # Not a copy: an unrelated refusal is audited as before (and rate-limited).
    w.core.inventory = view(alice=standing(current=copy.cert.serial_number))
    (plain,) = w.core.tls_refused(*args, by_peer=False, now=w.now, wall=NOW.timestamp())
    assert isinstance(plain, Audit) and plain.fields["event"] == "auth_refused"


def test_quarantine_needs_the_issuer_still_valid() -> None:
    root = make_ca("corp", networks=["10.8.0.0/24"], path_length=1)
    gone = root.intermediate("issuer", not_before=NOW - 10 * DAY, not_after=NOW - DAY // 2)
    leaf = gone.issue(
        "alice", addresses=["10.8.0.2"], not_before=NOW - 9 * DAY, not_after=NOW - DAY
    )
    w = World(trust=gone.trust(), quarantine_grace=2 * 86400.0)
    chain = tuple(c.public_bytes(Encoding.DER) for c in leaf.chain)
    found = w.core.verify(chain, "198.51.100.7:1", "198.51.100.7", wall=NOW.timestamp(), now=w.now)
    assert isinstance(found, list)  # refused: the issuer itself has expired since
