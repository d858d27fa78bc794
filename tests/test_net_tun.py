"""LinuxTun without root: name validation, and batch semantics on a datagram socketpair fd.

A SOCK_SEQPACKET pair keeps message boundaries like a TUN fd, so read_batch and
write_batch run their real code paths here; the real device is covered in netns-tests.
"""

from __future__ import annotations

import os
import socket

import pytest

from vpnd.net.tun import LinuxTun, TunError, validate_ifname


@pytest.mark.parametrize("good", ["vpn0", "a", "tun_a-b.c", "x" * 15, "VPN.1"])
def test_valid_names(good: str) -> None:
    assert validate_ifname(good) == good


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "x" * 16, "vpn 0", "vpn/0", "tun%d", "vpn:0", "é", "a\n", "a\x00"]
)
def test_invalid_names(bad: str) -> None:
    with pytest.raises(TunError, match="interface name invalid"):
        validate_ifname(bad)
    with pytest.raises(TunError, match="interface name invalid"):
        LinuxTun.open(bad)  # refused before /dev/net/tun is touched


def pair() -> tuple[LinuxTun, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    return LinuxTun(os.dup(a.fileno()), "vpn0", vnet_hdr=False), b


def test_read_batch_returns_whatever_is_ready() -> None:
    tun, peer = pair()
    assert tun.read_batch() == []  # EAGAIN is not an error
    for i in range(10):
        peer.send(bytes([0x45, i]) + bytes(18))
    first = tun.read_batch(max_packets=4)
    assert [p[1] for p in first] == [0, 1, 2, 3]
    assert [p[1] for p in tun.read_batch()] == [4, 5, 6, 7, 8, 9]
    assert tun.read_batch() == []
    big = bytes(65000)
    peer.send(big)
    assert tun.read_batch() == [big]  # a 64 KB super-packet fits one read
    tun.close()
    peer.close()


def test_write_batch_counts_refusals_and_keeps_going() -> None:
    tun, peer = pair()
    pkts: list[bytes | memoryview] = [b"\x45one", memoryview(b"\x45two"), b"\x45three"]
    assert tun.write_batch(pkts) == 3
    assert [peer.recv(100) for _ in range(3)] == [b"\x45one", b"\x45two", b"\x45three"]
    peer.close()  # now every write fails with EPIPE, like the kernel refusing
    assert tun.write_batch(pkts) == 0
    assert tun.write_errors == 3
    assert tun.last_write_error is not None and "EPIPE" in tun.last_write_error
    tun.close()


def test_close_is_idempotent_and_use_after_close_is_a_typed_error() -> None:
    tun, peer = pair()
    fd = tun.fileno()
    tun.close()
    tun.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # really closed
    for call in (tun.fileno, tun.read_batch, lambda: tun.write_batch([b"x"])):
        with pytest.raises(TunError, match="vpn0 is closed"):
            call()
    peer.close()


def test_context_manager_closes() -> None:
    tun, peer = pair()
    with tun as t:
        assert t.fileno() >= 0
    with pytest.raises(TunError):
        tun.fileno()
    peer.close()
