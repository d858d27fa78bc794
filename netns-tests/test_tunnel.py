"""The tunnel end to end: real vpnd processes, real TUN, routes and kernel, in namespaces."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import signal
import textwrap

import pytest
from vpnlab import GW_OVERLAY, GW_WAN, LAN_HOST, PORT, SERVER_NAME, Lab

from vpnd.pki.authority import issue_certificate
from vpnd.pki.identity import Role
from vpnd.pki.keys import (
    certificate_pem,
    generate_key,
    load_certificate,
    load_private_key,
    private_key_pem,
)

pytestmark = pytest.mark.netns
NFT_SET = ["nft", "list", "set", "inet", "vpnd_vpn0", "allowed4"]


def test_verified_peers_reach_gateway_each_other_and_lan(lab: Lab) -> None:
    gw_before = lab.hosts["gw"].ns.snapshot()
    alice_before = lab.hosts["alice"].ns.snapshot()
    lab.issue("alice", "--groups", "eng")
    lab.issue("bob")
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on"), lab.hosts["gw"].log_text()
    lab.start_client("alice")
    lab.start_client("bob")
    lab.wait_up("alice")
    lab.wait_up("bob")

    # Address from the certificate, pushed LAN route, via the TUN.
    addr = lab.hosts["alice"].ns.run(["ip", "-o", "-4", "addr", "show", "tun0"]).stdout
    assert "10.8.0.2/24" in addr
    routes = lab.hosts["alice"].ns.run(["ip", "route", "show", "dev", "tun0"]).stdout
    assert "192.168.50.0/24" in routes

    # nftables mirrors anti-spoofing: exactly the connected peers' sources are allowed.
    gw_ns = lab.hosts["gw"].ns
    assert lab.wait_for(
        lambda: (
            {"10.8.0.2", "10.8.0.3"} <= set(re.findall(r"10\.8\.0\.\d+", gw_ns.run(NFT_SET).stdout))
        )
    ), gw_ns.run(NFT_SET).stdout
    assert lab.ping("alice", GW_OVERLAY)
    assert lab.ping("alice", "10.8.0.3"), "peer to peer through the hub"
    assert lab.ping("bob", "10.8.0.2")
    assert lab.ping("alice", LAN_HOST), "internal host behind the gateway via the pushed route"

    # TCP through the tunnel: to the gateway, to another peer, to the LAN host.
    assert lab.tcp_transfer("alice", "gw", GW_OVERLAY)
    assert lab.tcp_transfer("alice", "bob", "10.8.0.3")
    assert lab.tcp_transfer("alice", "lan", LAN_HOST, size=2_000_000)

    lab.stop("bob")
    assert lab.wait_for(lambda: "10.8.0.3" not in gw_ns.run(NFT_SET).stdout)
    lab.stop("alice")
    lab.stop("gw")
    assert "vpnd" not in gw_ns.run(["nft", "list", "tables"]).stdout
    # Everything the daemons changed in the kernel is gone again.
    assert lab.hosts["alice"].ns.snapshot() == alice_before
    assert lab.hosts["gw"].ns.snapshot() == gw_before


def _assert_refused(lab: Lab, name: str, pattern: str) -> None:
    assert lab.wait_log(name, pattern), lab.hosts[name].log_text()
    assert not lab.has_link(name, "tun0"), f"{name} got a TUN although refused"


def test_other_ca_revoked_and_expired_peers_are_refused(lab: Lab) -> None:
    gw_before = lab.hosts["gw"].ns.snapshot()
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on")
    # mallory: a certificate from another CA
    other = lab.other_ca()
    certs = lab.issue("mallory", pki=other)
    # She trusts our gateway, and her bundle holds her own CA too (else her own start-up
    # check refuses her certificate before she ever dials).
    evil_ca = (certs / "ca.pem").read_bytes()
    (certs / "ca.pem").write_bytes((lab.pki / "ca.pem").read_bytes() + evil_ca)
    lab.start_client("mallory", certs=certs)
    _assert_refused(lab, "mallory", r"(?i)does not trust|unknown.ca")
    lab.stop("mallory")
    # bob: revoked before connecting (the gateway's CRL is re-read on restart here;
    # live CRL reloading is the access-control issue's job)
    lab.issue("bob")
    lab.vpnctl("revoke", "bob", "--reason", "keyCompromise")
    lab.stop("gw")
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on")
    lab.start_client("bob")
    _assert_refused(lab, "bob", r"(?i)revoked")
    lab.stop("bob")
    # alice: a certificate that expired a minute ago, signed by the real CA
    certs = lab.issue("alice")
    ca_cert = load_certificate(lab.pki / "ca.pem")
    ca_key = load_private_key(lab.pki / "ca.key")
    key = generate_key("ecdsa-p256")
    now = dt.datetime.now(dt.UTC)
    cert = issue_certificate(
        ca_cert=ca_cert,
        ca_key=ca_key,
        name="alice",
        public_key=key.public_key(),
        role=Role.PEER,
        addresses=[ipaddress.ip_address("10.8.0.40")],
        # Inside the CA's own lifetime (made minutes ago), so the chain was once valid.
        not_before=now - dt.timedelta(minutes=4),
        not_after=now - dt.timedelta(minutes=1),
    )
    (certs / "alice.pem").write_bytes(certificate_pem(cert))
    (certs / "alice.key").write_bytes(private_key_pem(key))
    lab.start_client("alice", certs=certs, renewal={"enabled": False})
    # Without renewal, a permanent local error: the client refuses to start, with one
    # line, and never dials (the gateway's own refusal is in test_tls_connection).
    _assert_refused(lab, "alice", r"cannot start: pki\.cert: .*expired")
    proc = lab.hosts["alice"].proc
    assert proc is not None and proc.wait(10) == 1  # it exits on its own, non-zero
    lab.stop("alice")
    assert not lab.wait_log("gw", r"\(alice, serial", timeout=0.5)
    # With renewal (the default) it dials, hoping for quarantine; this gateway has none,
    # so the handshake refuses it as expired and it gets nothing.
    lab.start_client("alice", certs=certs)
    _assert_refused(lab, "alice", r"your certificate has expired")
    lab.stop("alice")
    assert lab.wait_log("gw", r"refused .*certificate_revoked")
    assert not lab.wait_log("gw", r"accepted", timeout=0.5)
    lab.stop("gw")
    assert lab.hosts["gw"].ns.snapshot() == gw_before


def test_no_client_certificate_is_refused_with_an_alert(lab: Lab) -> None:
    lab.start_gateway()
    assert lab.wait_log("gw", r"listening on")
    probe = textwrap.dedent(
        f"""
        import socket, ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations("{lab.pki / "ca.pem"}")
        ctx.set_alpn_protocols(["vpnd/1"])
        s = ctx.wrap_socket(socket.create_connection(("{GW_WAN}", {PORT}), timeout=5),
                            server_hostname="{SERVER_NAME}")
        try:
            s.recv(10)
            print("NO-ALERT")
        except ssl.SSLError as e:
            print(e.reason)
        """
    )
    out = lab.hosts["mallory"].ns.python(["-c", probe], timeout=30).stdout
    assert "CERTIFICATE_REQUIRED" in out, out
    assert lab.wait_log("gw", r"refused .*certificate_required")


def test_gateway_restart_client_reconnects_by_itself(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    assert lab.ping("alice", GW_OVERLAY)
    gw = lab.hosts["gw"]
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGKILL)  # a crash: no CLOSE frame, no clean-up
    gw.proc.wait(5)
    gw.proc = None
    # The TUN died with the process (non-persistent), so its routes went too.
    assert lab.wait_link("gw", "vpn0", present=False)
    lab.start_gateway()
    assert lab.wait_log("gw", r"accepted alice", timeout=30), lab.hosts["alice"].log_text()
    assert lab.wait_log("alice", r"(?s)tunnel down.*tunnel up: tun0", timeout=30)
    assert lab.ping("alice", GW_OVERLAY, count=3)


def test_killed_client_frees_its_address(lab: Lab) -> None:
    lab.issue("alice")
    lab.start_gateway()
    lab.start_client("alice")
    lab.wait_up("alice")
    alice = lab.hosts["alice"]
    assert alice.proc is not None
    alice.proc.send_signal(signal.SIGKILL)
    alice.proc.wait(5)
    alice.proc = None
    assert not lab.has_link("alice", "tun0"), "the TUN must vanish with the process"
    assert lab.wait_log("gw", r"\[alice .*disconnected.*freed 10\.8\.0\.2/32", timeout=20)
    # The address is free: the same peer connects again at once.
    lab.start_client("alice")
    assert lab.wait_log("gw", r"(?s)freed 10\.8\.0\.2.*accepted alice", timeout=20)
    lab.wait_up("alice")
    assert lab.ping("alice", GW_OVERLAY)


def test_nat_masquerade_reaches_a_lan_without_a_route_back(lab: Lab) -> None:
    lan = lab.lan
    assert lan is not None
    lan.run(["ip", "route", "del", "10.8.0.0/24"])  # the LAN knows nothing of the overlay
    gw_before = lab.hosts["gw"].ns.snapshot()
    lab.issue("alice")
    lab.start_gateway(nat="masquerade")
    lab.start_client("alice")
    lab.wait_up("alice")
    assert lab.ping("alice", LAN_HOST)
    table = lab.hosts["gw"].ns.run(["nft", "list", "ruleset"]).stdout
    assert "masquerade" in table
    lab.stop("alice")
    lab.stop("gw")
    assert "masquerade" not in lab.hosts["gw"].ns.run(["nft", "list", "ruleset"]).stdout
    assert lab.hosts["gw"].ns.snapshot() == gw_before


def test_offload_gateway_with_a_plain_client_large_transfers_arrive_intact(lab: Lab) -> None:
    """The gateway's TUN hands out 64 KB super-packets; a client with tun.offload: false
    gets them segmented in software, and its plain packets get a header on the way in."""
    lab.issue("alice")
    lab.issue("bob")
    lab.start_gateway()
    lab.start_client("alice", tun={"name": "tun0", "mtu": 1400, "offload": False})
    lab.start_client("bob")
    lab.wait_up("alice")
    lab.wait_up("bob")
    assert lab.wait_log("gw", r"TUN vpn0 offload on")
    assert lab.tcp_transfer("alice", "lan", LAN_HOST, size=4_000_000)
    assert lab.tcp_transfer("alice", "lan", LAN_HOST, size=4_000_000, download=True)
    assert lab.tcp_transfer("bob", "lan", LAN_HOST, size=4_000_000, download=True)
    # peer to peer across the two forms, both ways
    assert lab.tcp_transfer("alice", "bob", "10.8.0.3", size=2_000_000, download=True)
    assert lab.tcp_transfer("bob", "alice", "10.8.0.2", size=2_000_000, download=True)
