"""Why a packet was dropped: the keys of every drop counter and of the metrics.

A ``StrEnum``, so a member is its own string: ``Counter`` keys, JSON status and metric
labels stay the plain names they always were (``drops["spoofed_source"]`` still works).
"""

from __future__ import annotations

from enum import StrEnum


class Drop(StrEnum):
    # The gateway's data path.
    NOT_IP = "not_ip"
    SPOOFED_SOURCE = "spoofed_source"
    HAIRPIN = "hairpin"
    QUEUE_FULL = "queue_full"
    OVERSIZE = "oversize"
    SESSION_CLOSED = "closed"
    NO_ROUTE = "no_route"
    TUN_NOT_IP = "tun_not_ip"
    # The firewall's verdicts (from the TUN side they are counted with a ``tun_`` prefix).
    POLICY = "policy"
    NOT_TRACKED = "not_tracked"
    GATEWAY_HOST_NEEDS_EXACT_RULE = "gateway_host_needs_exact_rule"
    ICMP_UNTRACKED = "icmp_untracked"
    FRAGMENT = "fragment"
    # The header parser's reasons (``vpnd.policy.packet``), passed through by the firewall.
    TRUNCATED = "truncated"
    BAD_IHL = "bad_ihl"
    BAD_LENGTH = "bad_length"
    BAD_OPTIONS = "bad_options"
    BAD_FRAGMENT = "bad_fragment"
    BAD_TCP = "bad_tcp"
    SOURCE_ROUTE = "source_route"
    IPV6_EXT_TOO_MANY = "ipv6_ext_too_many"
    IPV6_EXT_ORDER = "ipv6_ext_order"
    IPV6_EXT_LOOP = "ipv6_ext_loop"
    ICMP_NESTED = "icmp_nested"
    ICMP_INNER = "icmp_inner"
    # A virtio_net_hdr-prefixed packet that is unsafe for an offload TUN.
    VNET_SHORT = "vnet_short"
    VNET_BAD_FLAGS = "vnet_bad_flags"
    VNET_BAD_GSO_TYPE = "vnet_bad_gso_type"
    VNET_BAD_HDR_LEN = "vnet_bad_hdr_len"
    VNET_NOT_IP = "vnet_not_ip"
    VNET_BAD_CSUM_OFFSETS = "vnet_bad_csum_offsets"
    VNET_GSO_SIZE = "vnet_gso_size"
    VNET_GSO_IP_VERSION = "vnet_gso_ip_version"
    VNET_GSO_NOT_TCP = "vnet_gso_not_tcp"
    VNET_GSO_NEEDS_CSUM = "vnet_gso_needs_csum"
    VNET_BAD_TCP_HEADER = "vnet_bad_tcp_header"
    VNET_GSO_SIZE_SMALL = "vnet_gso_size_small"
