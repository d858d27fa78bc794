"""A gateway and clients in one process, over in-memory streams, kernel edges faked.

This is the whole admission and data path (verify -> HELLO -> CONFIG -> TUN/routes ->
packets between peers, the gateway and its LAN), with no root, no namespaces, no
sockets and no real time (see inprocess_fixtures); one test runs it over real TLS.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from attack_fixtures import der
from inprocess_fixtures import (
    BACKLOG_CAP,
    DAY,
    LAN,
    OVERLAY,
    REAL_NOW,
    World,
    ipv4_packet,
    ipv6_packet,
    issue_leaf,
    owners,
    tcp_open,
    tso_packet,
)
from pki_fixtures import make_ca

from vpnd.config import AnyMatch, NetworkMatch, PolicyConfig, Proto, RuleConfig
from vpnd.pki import load_trust_store
from vpnd.pki.identity import Role
from vpnd.transport.memory import MemoryStream, memory_pipe

pytestmark = pytest.mark.looptime


async def test_two_peers_get_addresses_routes_and_reach_each_other(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        cfg = alice.client.config
        assert cfg is not None
        assert cfg.address == ipaddress.ip_interface("10.8.0.2/24")
        assert LAN in cfg.routes
        assert LAN in alice.net.routes.get("tun0", {})
        # alice -> bob goes hub-and-spoke through the gateway
        pkt = ipv4_packet("10.8.0.2", "10.8.0.3", b"hello bob")
        alice.tun[0].inject(pkt)
        await w.until(lambda: bob.tun[0].written, "bob receives")
        assert bob.tun[0].written == [pkt]
        # alice -> LAN host goes to the gateway's TUN (the kernel forwards it)
        lan_pkt = ipv4_packet("10.8.0.2", "192.168.50.10")
        alice.tun[0].inject(lan_pkt)
        await w.until(lambda: w.gw_tun.written, "gateway TUN receives")
        assert w.gw_tun.written == [lan_pkt]
        # the LAN's reply, routed by the kernel into the gateway TUN, reaches alice
        reply = ipv4_packet("192.168.50.10", "10.8.0.2", b"pong", sport=7, dport=40000)
        w.gw_tun.inject(reply)
        await w.until(lambda: reply in alice.tun[0].written, "alice receives the reply")
        # a packet with a forged source, sent inside alice's session, is dropped
        assert w.gateway is not None
        driver = alice.client._driver
        assert driver is not None
        driver.session.send_packets([ipv4_packet("10.8.0.3", "192.168.50.10")], 0.0)
        driver.flush()
        peer = next(p for p in w.gateway.peers.values() if p.identity.name == "alice")
        await w.until(lambda: peer.drops["spoofed_source"] == 1, "spoof counted")
        assert w.gw_tun.written == [lan_pkt]
    finally:
        await w.close()
    # stop removed every route and TUN on both sides
    assert all(t.closed for n in w.nodes for t in n.tun)
    assert w.gw_net.routes.get("vpn0", {}) == {} or set(w.gw_net.routes["vpn0"]) <= {OVERLAY}


async def test_peer_from_other_ca_is_refused_and_gets_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        other = make_ca(
            "evil-ca",
            networks=[OVERLAY],
            not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 100 * DAY,
        )
        mallory = w.start_client("mallory", ca=other, addr="10.8.0.9")
        await w.until(lambda: mallory.client.last_outcome is not None, "refusal")
        outcome = mallory.client.last_outcome
        assert outcome is not None and not outcome.established and outcome.permanent
        assert "CA" in outcome.message or "trust" in outcome.message
        assert mallory.tun == []  # never got a TUN
        assert w.gateway is not None and not w.gateway.peers
        assert any(k.startswith("refused_") for k in w.gateway.handshakes)
    finally:
        await w.close()


async def test_revoked_peer_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path)
    leaf = w.ca.issue(
        "carol",
        addresses=["10.8.0.7"],
        not_before=REAL_NOW - DAY,
        not_after=REAL_NOW + 30 * DAY,
    )
    w.write_crl((leaf.cert.serial_number,))
    await w.start_gateway()
    try:
        client = w.start_client("carol", leaf=leaf).client
        await w.until(lambda: client.last_outcome is not None, "refusal")
        client.stop()
        assert client.last_outcome is not None
        assert "revoked" in client.last_outcome.message
        assert client.last_outcome.permanent
    finally:
        await w.close()


async def test_gateway_stop_sends_close_and_clients_tear_down(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    alice = w.start_client("alice")
    await asyncio.wait_for(alice.client.connected.wait(), 5)
    assert w.gateway is not None
    await w.gateway.stop("maintenance")
    await w.until(lambda: alice.tun[0].closed, "client TUN removed")
    assert alice.client.last_outcome is not None
    assert "maintenance" in alice.client.last_outcome.message
    await w.close()


async def test_second_connection_with_the_same_certificate_replaces_the_first(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        leaf = issue_leaf(w, "alice", "10.8.0.2")
        first = w.start_client("alice", leaf=leaf, label="alice1")
        await asyncio.wait_for(first.client.connected.wait(), 5)
        assert w.gateway is not None
        first_peer = next(iter(w.gateway.table.owners()))
        second = w.start_client("alice", leaf=leaf, label="alice2")
        await w.until(lambda: first.client.last_outcome is not None, "first replaced")
        assert first.client.last_outcome is not None
        assert "newer connection" in first.client.last_outcome.message
        await asyncio.wait_for(second.client.connected.wait(), 5)
        live = w.gateway.table.owners()
        assert len(live) == 1 and live[0] is not first_peer
        assert owners(w) == {"alice": ["10.8.0.2/32"]}
        # traffic to alice now reaches the second connection
        second.tun[-1].inject(ipv4_packet("10.8.0.2", "192.168.50.10"))
        await w.until(lambda: w.gw_tun.written, "the new session's packet is routed")
        pkt = ipv4_packet("192.168.50.10", "10.8.0.2", sport=7, dport=40000)
        w.gw_tun.inject(pkt)
        await w.until(lambda: pkt in second.tun[-1].written, "second session receives")
        first.client.stop()  # do not let it fight back in a loop
    finally:
        await w.close()


async def test_duplicate_reject_keeps_the_first_session(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway(duplicate="reject")
    try:
        leaf = issue_leaf(w, "alice", "10.8.0.2")
        first = w.start_client("alice", leaf=leaf, label="alice1")
        await asyncio.wait_for(first.client.connected.wait(), 5)
        second = w.start_client("alice", leaf=leaf, label="alice2")
        await w.until(lambda: second.client.last_outcome is not None, "second refused")
        assert second.client.last_outcome is not None
        assert not second.client.last_outcome.established
        assert first.client.connected.is_set() and first.client.last_outcome is None
        second.client.stop()
    finally:
        await w.close()


async def test_two_certificates_claiming_one_address_second_refused_first_unaffected(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        imposter = w.start_client("eve", addr="10.8.0.2")
        await w.until(lambda: imposter.client.last_outcome is not None, "eve refused")
        assert imposter.client.last_outcome is not None
        assert "already in use" in imposter.client.last_outcome.message
        assert owners(w) == {"alice": ["10.8.0.2/32"]}
        assert alice.client.connected.is_set()
        imposter.client.stop()
    finally:
        await w.close()


async def test_new_crl_closes_revoked_sessions_and_keeps_the_others(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice_leaf = issue_leaf(w, "alice", "10.8.0.2")
        alice = w.start_client("alice", leaf=alice_leaf)
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        w.write_crl((alice_leaf.cert.serial_number,))
        assert w.gateway is not None
        closed = w.gateway.apply_trust(load_trust_store(w.ca_path, w.crl_path))
        assert closed == ["alice"]
        await w.until(lambda: alice.client.last_outcome is not None, "alice told")
        assert alice.client.last_outcome is not None
        assert "revoked" in alice.client.last_outcome.message
        await w.until(lambda: "alice" not in owners(w), "address freed")
        assert owners(w) == {"bob": ["10.8.0.3/32"]}
        assert bob.client.connected.is_set()
    finally:
        await w.close()


async def test_kick_and_fail_closed_when_revocation_data_breaks(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        assert w.gateway is not None
        assert w.gateway.kick("nobody") == 0
        assert w.gateway.kick("alice", "maintenance window") == 1
        await w.until(lambda: alice.client.last_outcome is not None, "alice kicked")
        assert alice.client.last_outcome is not None
        assert "maintenance window" in alice.client.last_outcome.message
        alice.client.stop()
        w.gateway.refuse_new_peers("crl.pem: no such file")
        bob = w.start_client("bob", addr="10.8.0.3")
        await w.until(lambda: bob.client.last_outcome is not None, "bob refused")
        assert bob.client.last_outcome is not None
        assert "crl_missing" in bob.client.last_outcome.message
        assert bob.tun == []
        bob.client.stop()
    finally:
        await w.close()


async def test_offload_super_packets_cross_whole_or_are_segmented_for_plain_peers(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, offload=True)
    await w.start_gateway()
    try:
        fast = w.start_client("alice", addr="10.8.0.2", offload=True)
        plain = w.start_client("bob", addr="10.8.0.3", offload=False)
        await asyncio.wait_for(fast.client.connected.wait(), 5)
        await asyncio.wait_for(plain.client.connected.wait(), 5)
        assert fast.tun[0].vnet_hdr and not plain.tun[0].vnet_hdr
        payload = bytes(i % 251 for i in range(20000))
        # Each peer opens the flow first: the LAN side may only answer.
        for node, addr, hdr in ((fast, "10.8.0.2", bytes(10)), (plain, "10.8.0.3", b"")):
            node.tun[0].inject(hdr + tcp_open(addr, "192.168.50.10"))
        await w.until(lambda: len(w.gw_tun.written) == 2, "both flows open")
        w.gw_tun.written.clear()
        # gateway TUN -> offload peer: one 20 KB super-packet, header and all
        big = tso_packet("192.168.50.10", "10.8.0.2", payload)
        w.gw_tun.inject(big)
        await w.until(lambda: fast.tun[0].written, "alice gets the super-packet")
        assert fast.tun[0].written == [big]
        # gateway TUN -> plain peer: segmented in software, payload intact
        w.gw_tun.inject(tso_packet("192.168.50.10", "10.8.0.3", payload))
        await w.until(lambda: len(plain.tun[0].written) >= 15, "bob gets segments")
        segs = plain.tun[0].written
        assert all(len(p) <= 1400 for p in segs)
        assert b"".join(p[40:] for p in segs) == payload
        # plain peer -> offload gateway TUN: a zero virtio header is added
        up = ipv4_packet("10.8.0.3", "192.168.50.10")
        plain.tun[0].inject(up)
        await w.until(lambda: w.gw_tun.written, "gateway TUN receives")
        assert w.gw_tun.written == [bytes(10) + up]
        # a malformed virtio header from a peer is dropped and counted
        assert w.gateway is not None and fast.client._driver is not None
        bad = bytearray(tso_packet("10.8.0.2", "192.168.50.10", payload))
        bad[1] = 4  # gso_type TCPV6 on an IPv4 packet
        fast.client._driver.session.send_packets([bytes(bad)], 0.0, vnet=True)
        fast.client._driver.flush()
        peer = next(p for p in w.gateway.peers.values() if p.identity.name == "alice")
        await w.until(lambda: sum(peer.drops.values()) == 1, "bad header counted")
        assert peer.drops["vnet_gso_ip_version"] == 1
        assert w.gw_tun.written == [bytes(10) + up]
    finally:
        await w.close()


async def test_policy_denies_by_default_and_tracks_replies(tmp_path: Path) -> None:
    w = World(tmp_path)
    lan_only = PolicyConfig(
        rules=(
            RuleConfig(from_=AnyMatch(), to=NetworkMatch(LAN), proto=Proto.UDP, ports=((7, 7),)),
        )
    )
    await w.start_gateway(policy=lan_only)
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        assert w.gateway is not None
        peer = next(p for p in w.gateway.peers.values() if p.identity.name == "alice")
        # allowed: UDP to port 7 on the LAN; its reply comes back
        ok = ipv4_packet("10.8.0.2", "192.168.50.10")
        alice.tun[0].inject(ok)
        await w.until(lambda: ok in w.gw_tun.written, "allowed flow passes")
        reply = ipv4_packet("192.168.50.10", "10.8.0.2", sport=7, dport=40000)
        w.gw_tun.inject(reply)
        await w.until(lambda: reply in alice.tun[0].written, "reply tracked")
        # denied: another port, peer-to-peer, and a LAN-initiated flow
        alice.tun[0].inject(ipv4_packet("10.8.0.2", "192.168.50.10", dport=8))
        alice.tun[0].inject(ipv4_packet("10.8.0.2", "10.8.0.3"))
        await w.until(lambda: peer.drops["policy"] == 2, "two denials counted")
        w.gw_tun.inject(ipv4_packet("192.168.50.10", "10.8.0.2", sport=9, dport=9))
        await w.until(
            lambda: w.gateway is not None and w.gateway.drops["tun_not_tracked"] == 1,
            "LAN-initiated flow denied",
        )
        assert bob.tun[0].written == []
        assert w.gw_tun.written == [ok]
    finally:
        await w.close()


async def test_subnet_rules_do_not_reach_the_gateway_hosts_own_addresses(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.gw_net.host_extra = [ipaddress.ip_address("192.168.50.1")]  # the host's LAN address
    subnets = PolicyConfig(
        rules=(
            RuleConfig(from_=AnyMatch(), to=NetworkMatch(LAN), proto=Proto.UDP),
            RuleConfig(from_=AnyMatch(), to=NetworkMatch(OVERLAY), proto=Proto.UDP),
        )
    )
    await w.start_gateway(policy=subnets)
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        assert w.gateway is not None
        peer = next(p for p in w.gateway.peers.values() if p.identity.name == "alice")
        alice.tun[0].inject(ipv4_packet("10.8.0.2", "192.168.50.1"))
        await w.until(
            lambda: peer.drops["gateway_host_needs_exact_rule"] == 1, "gateway host denied"
        )
        # A LAN host and the gateway's overlay address follow the subnet rules.
        lan_host = ipv4_packet("10.8.0.2", "192.168.50.10")
        overlay_gw = ipv4_packet("10.8.0.2", "10.8.0.1")
        alice.tun[0].inject(lan_host)
        alice.tun[0].inject(overlay_gw)
        await w.until(lambda: overlay_gw in w.gw_tun.written, "overlay address reached")
        assert lan_host in w.gw_tun.written
        # An address the host gains later is protected once it is read again.
        w.gw_net.host_extra.append(ipaddress.ip_address("192.168.50.10"))
        assert await w.gateway.refresh_host_addresses() == 1  # the tracked flow is cut
        alice.tun[0].inject(lan_host)
        await w.until(
            lambda: peer.drops["gateway_host_needs_exact_rule"] == 2, "new address denied"
        )
        assert w.gw_tun.written.count(lan_host) == 1
    finally:
        await w.close()


async def test_ipv6_overlay_addresses_routing_and_anti_spoofing(tmp_path: Path) -> None:
    w = World(tmp_path, v6=True)
    await w.start_gateway()
    try:
        alice = w.start_client("alice", addr=["10.8.0.2", "fd00:8::2"])
        bob = w.start_client("bob", addr=["10.8.0.3", "fd00:8::3"])
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        cfg = alice.client.config
        assert cfg is not None
        assert cfg.extra_addresses == (ipaddress.ip_interface("fd00:8::2/64"),)
        link = alice.net.links["tun0"]
        assert ipaddress.ip_interface("fd00:8::2/64") in link.addresses
        pkt = ipv6_packet("fd00:8::2", "fd00:8::3")
        alice.tun[0].inject(pkt)
        await w.until(lambda: pkt in bob.tun[0].written, "v6 peer to peer")
        assert w.gateway is not None and alice.client._driver is not None
        spoofed = ipv6_packet("fd00:8::3", "fd00:8::1")
        alice.client._driver.session.send_packets([spoofed], 0.0)
        alice.client._driver.flush()
        peer = next(p for p in w.gateway.peers.values() if p.identity.name == "alice")
        await w.until(lambda: peer.drops["spoofed_source"] == 1, "v6 spoof counted")
        assert spoofed not in w.gw_tun.written
    finally:
        await w.close()


async def test_renewed_certificate_takes_over_without_dropping_the_tunnel(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        first = w.ca.issue(
            "alice", addresses=["10.8.0.2"], not_before=REAL_NOW - DAY,
            not_after=REAL_NOW + 10 * DAY,
        )  # fmt: skip
        alice = w.start_client("alice", leaf=first)
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        assert w.gateway is not None
        # The admin renews: a new certificate (and key) for the same peer and address.
        renewed = w.ca.issue(
            "alice", addresses=["10.8.0.2"], not_before=REAL_NOW - DAY / 2,
            not_after=REAL_NOW + 90 * DAY,
        )  # fmt: skip
        renewed.write(tmp_path, "alice")
        assert await alice.client.rotate()
        owner = w.gateway.table.lookup(ipaddress.ip_address("10.8.0.2"))
        assert owner is not None and owner.identity.serial == renewed.cert.serial_number
        # Same TUN, never closed; no outcome recorded means no disconnect was seen.
        assert len(alice.tun) == 1 and not alice.tun[0].closed
        assert alice.client.last_outcome is None
        await w.until(
            lambda: w.gateway is not None and len(w.gateway.peers) == 1, "the old session is gone"
        )
        pkt = ipv4_packet("10.8.0.2", "192.168.50.10")
        alice.tun[0].inject(pkt)
        await w.until(lambda: pkt in w.gw_tun.written, "traffic flows on the new session")
        # An older certificate of the same peer can never evict the newer one.
        stale = w.start_client("alice", leaf=first, label="alice-old")
        await w.until(lambda: stale.client.last_outcome is not None, "stale refused")
        assert stale.client.last_outcome is not None
        assert "already in use" in stale.client.last_outcome.message
        stale.client.stop()
        owner = w.gateway.table.lookup(ipaddress.ip_address("10.8.0.2"))
        assert owner is not None and owner.identity.serial == renewed.cert.serial_number
    finally:
        await w.close()


async def test_a_peer_that_floods_pings_and_never_reads_cannot_grow_gateway_memory(
    tmp_path: Path,
) -> None:
    from vpnd.proto.frames import FrameType, encode_frame

    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        assert w.gateway is not None and alice.client._driver is not None
        conn = alice.streams[-1]
        assert isinstance(conn, MemoryStream)
        conn.pause_reading()  # alice stops reading what the gateway sends
        ping = encode_frame(FrameType.PING, b"12345678") * 4096  # 48 KiB of PINGs
        gw_peer = next(p for p in w.gateway.peers.values() if p.identity.name == "alice")
        gw_conn = gw_peer.driver.conn
        worst = 0
        for _ in range(200):  # ~10 MB of PINGs -> ~10 MB of PONGs if unbounded
            conn.write(ping)
            await asyncio.sleep(0)  # one loop turn: a delivery slice each way
            worst = max(worst, gw_conn.backlog_bytes)
        await w.until(lambda: gw_conn.backlog_bytes > BACKLOG_CAP, "the gateway stops reading")
        worst = max(worst, gw_conn.backlog_bytes)
        assert worst < BACKLOG_CAP + 256 * 1024, worst
        # The rest waits on alice's side, as in her socket buffer: pushed back, not lost.
        assert conn.backlog_bytes > 8 * 1024 * 1024, conn.backlog_bytes
        # bob is unaffected
        pkt = ipv4_packet("10.8.0.3", "192.168.50.10")
        bob.tun[0].inject(pkt)
        await w.until(lambda: pkt in w.gw_tun.written, "bob still served")
        conn.resume_reading()
    finally:
        await w.close()


async def test_removing_a_ca_from_the_bundle_ends_its_peers_sessions(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        alice = w.start_client("alice")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        assert w.gateway is not None
        successor = make_ca("corp-ca-2", networks=[OVERLAY], not_before=REAL_NOW - DAY,
                            not_after=REAL_NOW + 900 * DAY)  # fmt: skip
        crl = successor.crl(this_update=REAL_NOW - DAY, next_update=REAL_NOW + 7 * DAY)
        closed = w.gateway.apply_trust(successor.trust(crls=[crl]))
        assert closed == ["alice"]
        await w.until(lambda: alice.client.last_outcome is not None, "alice told")
        assert alice.client.last_outcome is not None
        assert "authentication failed" in alice.client.last_outcome.message
        alice.client.stop()
    finally:
        await w.close()


@pytest.mark.parametrize(
    ("routes", "accepted"),
    [
        (["192.168.50.0/24"], True),  # a site LAN that is also pushed to clients
        (["172.20.0.0/16"], True),
        (["10.8.0.0/25"], False),  # would shadow other peers and the gateway
        (["192.168.0.0/16"], False),  # would capture every client's LAN traffic
        (["0.0.0.0/0"], False),
    ],
)
async def test_site_peer_routed_subnets_are_checked(
    tmp_path: Path, routes: list[str], accepted: bool
) -> None:
    w = World(tmp_path)
    await w.start_gateway()
    try:
        leaf = w.ca.issue("site", addresses=["10.8.0.9"], routes=routes,
                          not_before=REAL_NOW - DAY, not_after=REAL_NOW + 9 * DAY)  # fmt: skip
        site = w.start_client("site", leaf=leaf)
        if accepted:
            await asyncio.wait_for(site.client.connected.wait(), 5)
        else:
            await w.until(lambda: site.client.last_outcome is not None, "refused")
            assert site.client.last_outcome is not None
            assert "policy refused" in site.client.last_outcome.message
            assert site.tun == []
        site.client.stop()
    finally:
        await w.close()


@pytest.mark.looptime(False)  # real sockets: their I/O takes real time
async def test_the_whole_path_over_real_tls_on_loopback(tmp_path: Path) -> None:
    # The memory pipe skips TLS; this keeps the TLS edge of admission honest.
    w = World(tmp_path, tls=True)
    await w.start_gateway()
    try:
        alice = w.start_client("alice", addr="10.8.0.2")
        bob = w.start_client("bob", addr="10.8.0.3")
        await asyncio.wait_for(alice.client.connected.wait(), 5)
        await asyncio.wait_for(bob.client.connected.wait(), 5)
        pkt = ipv4_packet("10.8.0.2", "10.8.0.3", b"hello bob")
        alice.tun[0].inject(pkt)
        await w.until(lambda: bob.tun[0].written, "bob receives")
        assert bob.tun[0].written == [pkt]
        reply = ipv4_packet("192.168.50.10", "10.8.0.2", b"pong", sport=7, dport=40000)
        alice.tun[0].inject(ipv4_packet("10.8.0.2", "192.168.50.10"))
        await w.until(lambda: w.gw_tun.written, "gateway TUN receives")
        w.gw_tun.inject(reply)
        await w.until(lambda: reply in alice.tun[0].written, "alice receives the reply")
        # Another CA is refused by OpenSSL in the handshake, with its alert.
        other = make_ca(
            "evil-ca", networks=[OVERLAY], not_before=REAL_NOW - DAY, not_after=REAL_NOW + 99 * DAY
        )
        mallory = w.start_client("mallory", ca=other, addr="10.8.0.9")
        await w.until(lambda: mallory.client.last_outcome is not None, "refusal")
        assert mallory.client.last_outcome is not None
        assert mallory.client.last_outcome.permanent and mallory.tun == []
        assert w.gateway is not None
        await w.until(
            lambda: w.gateway is not None and w.gateway.handshakes["refused_unknown_ca"], "audited"
        )
        assert w.gateway.handshakes["accepted"] == 2
    finally:
        await w.close()


async def test_the_client_verifies_the_gateway_chain_the_stream_presents(tmp_path: Path) -> None:
    # No TLS checks a memory pipe: the client's own verify_peer must refuse a gateway
    # certificate without the pinned name, and drop the stream.
    w = World(tmp_path)
    await w.start_gateway()
    try:
        imposter = w.ca.issue(
            "gw2", role=Role.GATEWAY, addresses=["10.8.0.1"], dns_names=["other.test"],
            not_before=REAL_NOW - DAY, not_after=REAL_NOW + 9 * DAY,
        )  # fmt: skip
        leaf = issue_leaf(w, "alice", "10.8.0.2")
        ends: list[MemoryStream] = []
        server_lost: list[Exception | None] = []

        async def dial() -> MemoryStream:
            client, server = memory_pipe(
                client_chain=(der(leaf.cert),),
                server_chain=(der(imposter.cert),),
                on_activity=w.activity.poke,
            )
            server.set_receiver(lambda _d: None, server_lost.append)
            ends.append(client)
            return client

        client = w.new_client(dial)
        task = asyncio.create_task(client.run())
        await w.until(lambda: client.last_outcome is not None, "the gateway refused")
        client.stop()
        await asyncio.wait_for(task, 5)
        assert client.last_outcome is not None and client.last_outcome.permanent
        assert "refused the gateway" in client.last_outcome.message
        assert "name" in client.last_outcome.message
        assert client.tun is None and client.gateway is None
        await w.until(lambda: server_lost, "the imposter's end is reset")
        assert isinstance(server_lost[0], ConnectionResetError)
    finally:
        await w.close()
