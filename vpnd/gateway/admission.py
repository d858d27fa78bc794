"""The address rules of admission, as pure functions of the gateway's settings."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from vpnd.pki.identity import IPAddress, IPNetwork, PeerIdentity
from vpnd.proto import TunnelConfig

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def outside_overlay(networks: Sequence[IPNetwork], overlays: Sequence[IPNetwork]) -> str | None:
    """Why one of a peer's addresses is refused for lying outside every overlay, or None."""
    for net in networks:
        if not any(
            net.version == o.version and net.subnet_of(o)  # type: ignore[arg-type]
            for o in overlays
        ):
            return f"address {net} is outside the overlay"
    return None


def reserved_address(
    addresses: Sequence[IPAddress],
    overlays: Sequence[IPNetwork],
    gateway: Sequence[IPInterface],
) -> str | None:
    """Why a peer may not hold one of ``addresses`` (the gateway's own, or an overlay's
    network or broadcast address), or None."""
    own = {a.ip for a in gateway}
    for addr in addresses:
        if addr in own:
            return f"address {addr} is the gateway's own"
        for o in overlays:
            if addr not in o or o.num_addresses <= 2:
                continue
            if addr == o.network_address:
                return f"address {addr} is the network address of {o}"
            if o.version == 4 and addr == o.broadcast_address:
                return f"address {addr} is the broadcast address of {o}"
    return None


def bad_route(
    routes: Sequence[IPNetwork], overlays: Sequence[IPNetwork], pushed: Sequence[IPNetwork]
) -> str | None:
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
        for o in overlays:
            if net.version == o.version and net.overlaps(o):
                return f"routed subnet {net} overlaps the overlay {o}"
        for p in pushed:
            if p.version == net.version and p != net and p.subnet_of(net):  # type: ignore[arg-type]
                return f"routed subnet {net} would capture the pushed route {p}"
    return None


def _prefix_of(addr: IPAddress, overlays: Sequence[IPNetwork]) -> int:
    for n in overlays:
        if addr in n:
            return n.prefixlen
    return addr.max_prefixlen


def tunnel_config(
    ident: PeerIdentity,
    *,
    overlays: Sequence[IPNetwork],
    gateway: Sequence[IPInterface],
    pushed: Sequence[IPNetwork],
    mtu: int,
    keepalive_interval: float,
    keepalive_timeout: float,
    offload: bool,
) -> TunnelConfig:
    """The CONFIG an admitted peer gets: its addresses, our address, the routes to push."""
    primary = ident.addresses[0]
    prefix = next(n.prefixlen for n in overlays if primary in n)
    extra = tuple(
        ipaddress.ip_interface(f"{a}/{_prefix_of(a, overlays)}") for a in ident.addresses[1:]
    )
    gw = next((a.ip for a in gateway if a.version == primary.version), gateway[0].ip)
    routes = tuple(n for n in (*overlays, *pushed) if not any(a in n for a in ident.addresses))
    return TunnelConfig(
        address=ipaddress.ip_interface(f"{primary}/{prefix}"),
        gateway=gw,
        routes=routes,
        mtu=mtu,
        keepalive_interval=keepalive_interval,
        keepalive_timeout=keepalive_timeout,
        offload=offload,
        extra_addresses=extra,
    )
