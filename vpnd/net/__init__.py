"""Kernel-facing edges: TUN, netlink, nftables, the virtio header; and their fakes.

Import the submodules directly (``vpnd.net.tun``, ``vpnd.net.netlink``...): this package
module stays light so pure code can use ``vpnd.net.vnet`` without pulling in pyroute2.
"""

from vpnd.net.errors import NetError, TunError

__all__ = ["NetError", "TunError"]
