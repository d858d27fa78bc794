"""Typed errors of the kernel-facing edges; ``str(err)`` is one actionable line."""

from __future__ import annotations


class NetError(Exception):
    """A netlink, sysctl or nftables operation failed."""


class TunError(NetError):
    """A TUN device could not be opened, configured or used."""
