"""A site (CA, gateway and client files, configs) and fake edges for the services.

Certificates are dated around the real clock: the services read them with the wall
clock they are given, and ``Edges.wall`` defaults to the real one. Kernel, TUN,
nftables and the TLS listener/dialer are in-memory fakes; the control socket and the
TLS contexts are real (neither needs root).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pki_fixtures import DAY, Leaf, TestCA, make_ca

from vpnd.net.fakes import FakeNetConfigurator, FakeTun
from vpnd.net.nftables import NftablesRuleset
from vpnd.net.tun import TunDevice
from vpnd.pki import Role, crl_pem
from vpnd.service.runstate import InstanceLock
from vpnd.service.startup import Edges
from vpnd.transport.connection import TlsConnection

REAL = dt.datetime.now(dt.UTC)


def put(leaf: Leaf, directory: Path, name: str) -> None:
    _, key = leaf.write(directory, name)
    key.chmod(0o600)


class Site:
    """Good files until a test changes one; configs are JSON (a subset of YAML)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.ca: TestCA = make_ca("corp-ca", not_before=REAL - 10 * DAY, not_after=REAL + 365 * DAY)
        self.gw = self.issue_gateway()
        self.alice = self.issue_client()
        self.ca.write(tmp)
        self.write_crl(number=1)
        put(self.gw, tmp, "gw")
        put(self.alice, tmp, "alice")
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()

    def issue_gateway(self, addresses: Sequence[str] = ("10.77.0.1",)) -> Leaf:
        return self.ca.issue("gw", role=Role.GATEWAY, addresses=list(addresses),
                             dns_names=["gw.test"], not_before=REAL - DAY,
                             not_after=REAL + 30 * DAY)  # fmt: skip

    def issue_client(self, routes: Sequence[str] = ()) -> Leaf:
        return self.ca.issue("alice", addresses=["10.77.0.2"], routes=list(routes),
                             not_before=REAL - DAY, not_after=REAL + 30 * DAY)  # fmt: skip

    def write_crl(self, *, number: int, revoked: Sequence[Leaf] = ()) -> None:
        crl = self.ca.crl(revoked, number=number, this_update=REAL - DAY,
                          next_update=REAL + 7 * DAY)  # fmt: skip
        (self.dir / "crl.pem").write_bytes(crl_pem(crl))

    def gateway_doc(self, **over: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mode": "gateway",
            "listen": "127.0.0.1:4443",
            "pki": {"ca": "ca.pem", "cert": "gw.pem", "key": "gw.key", "crl": "crl.pem"},
            "tun": {"name": "vpnsvc0"},
            "control_socket": str(self.dir / "vpnd.sock"),
            "state_dir": str(self.dir / "state"),
        }
        doc.update(over)
        return doc

    def client_doc(self, **over: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mode": "client",
            "server": "127.0.0.1:4443",
            "server_name": "gw.test",
            "pki": {"ca": "ca.pem", "cert": "alice.pem", "key": "alice.key"},
            "tun": {"name": "vpnsvc1"},
            "control_socket": str(self.dir / "client.sock"),
        }
        doc.update(over)
        return doc

    def write(self, doc: dict[str, Any], name: str = "vpnd.yaml") -> Path:
        path = self.dir / name
        path.write_text(json.dumps(doc))
        return path

    def lock(self, tun: str) -> InstanceLock:
        lock = InstanceLock(self.run_dir, tun)
        lock.acquire()
        return lock


class FakeRuleset(NftablesRuleset):
    """The real renderer; the ``nft`` runs are recorded instead of executed."""

    def __init__(self, ifname: str) -> None:
        super().__init__(ifname)
        self.scripts: list[tuple[list[str], str]] = []
        self.removed = False

    async def _run(self, args: list[str], script: str, what: str) -> str:
        self.scripts.append((args, script))
        return '{"nftables": [{"counter": {"name": "forward_dropped", "packets": 3}}]}'

    async def remove(self) -> None:
        await super().remove()
        self.removed = True


class FakeListener:
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeEdges(Edges):
    """Edges over the in-memory kernel; records what was built."""

    def __init__(self, net: FakeNetConfigurator | None = None, **kw: Any) -> None:
        self.fake_net = net or FakeNetConfigurator()
        self.tuns: list[FakeTun] = []
        self.rulesets: list[FakeRuleset] = []
        self.listeners: list[FakeListener] = []
        self.listen_error: OSError | None = None
        self.dials = 0
        self.dialing = asyncio.Event()
        super().__init__(
            net=lambda: self.fake_net,
            open_tun=self._open_tun,
            probe_offload=lambda: False,
            firewall=self._firewall,
            listen=self._listen,
            dial=self._dial,
            signals=False,
            **kw,
        )

    def _open_tun(self, name: str, offload: bool) -> TunDevice:
        tun = FakeTun(name, vnet_hdr=offload, net=self.fake_net)
        self.tuns.append(tun)
        return tun

    def _firewall(self, ifname: str) -> NftablesRuleset:
        ruleset = FakeRuleset(ifname)
        self.rulesets.append(ruleset)
        return ruleset

    async def _listen(self, *args: Any, **kwargs: Any) -> FakeListener:
        if self.listen_error is not None:
            raise self.listen_error
        listener = FakeListener(args, kwargs)
        self.listeners.append(listener)
        return listener

    async def _dial(self, *args: Any, **kwargs: Any) -> TlsConnection:
        # A gateway that never answers: the client waits here until it is stopped.
        self.dials += 1
        self.dialing.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")
