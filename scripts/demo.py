#!/usr/bin/env python3
"""`make demo`: vpnd's main job, live, in throwaway network namespaces.

Builds a gateway with an internal LAN behind it, two employees' laptops and an
outsider; makes a CA with vpnctl; shows that verified peers get through and that a
certificate from another CA and a revoked one get nothing; enrolls a new laptop by
invite and renews its certificate inside the tunnel; then removes everything.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "netns-tests"))

import yaml  # noqa: E402
from nslib import NetnsFactory, list_namespaces  # noqa: E402
from vpnlab import GW_OVERLAY, GW_WAN, LAN, LAN_HOST, PORT, VPND, Lab  # noqa: E402

# Default deny; eng may reach the LAN, everyone may ping the gateway, eng may ping ops.
POLICY = {
    "rules": [
        {"from": {"groups": ["eng"]}, "to": LAN, "proto": "any"},
        {"from": "any", "to": f"{GW_OVERLAY}/32", "proto": "icmp"},
        {"from": {"groups": ["eng"]}, "to": {"group": "ops"}, "proto": "icmp"},
    ]
}


def ping_cut_after(log: Path, t0: float) -> float | None:
    """Seconds from t0 to the last reply in a `ping -D` log (None: no reply after t0)."""
    times = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", log.read_text(), re.M)]
    after = [t for t in times if t >= t0]
    return (max(after) - t0) if after else (0.0 if times else None)


GREEN, RED, BOLD, DIM, RESET = "\033[32m", "\033[31m", "\033[1m", "\033[2m", "\033[0m"
if not sys.stdout.isatty():
    GREEN = RED = BOLD = DIM = RESET = ""


class Demo:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.steps = 0

    def section(self, title: str) -> None:
        print(f"\n{BOLD}== {title}{RESET}")

    def check(self, what: str, fn: Callable[[], bool]) -> bool:
        self.steps += 1
        started = time.monotonic()
        try:
            ok = fn()
        except Exception as err:  # a demo step must report, not crash
            ok = False
            what = f"{what} ({err})"
        mark = f"{GREEN}PASS{RESET}" if ok else f"{RED}FAIL{RESET}"
        print(f"  [{mark}] {what} {DIM}({time.monotonic() - started:.1f}s){RESET}")
        if not ok:
            self.failures.append(what)
        return ok

    def show(self, text: str) -> None:
        for line in text.strip().splitlines():
            print(f"        {DIM}{line}{RESET}")


def last_line(text: str, needle: str) -> str:
    lines = [ln for ln in text.splitlines() if needle.lower() in ln.lower()]
    return lines[-1] if lines else "(no such line)"


def _network(demo: Demo, lab: Lab, factory: NetnsFactory) -> None:
    demo.section("1. Network: gateway + internal LAN, laptops alice, bob, carol, outsider mallory")
    lab.build(clients=("alice", "bob", "mallory", "carol", "dave"))
    print(f"  namespaces: {', '.join(ns.name for ns in factory.namespaces)}")
    print("  underlay 172.31.0.0/24 (gw .1), overlay 10.8.0.0/24, LAN 192.168.50.0/24")


def _pki(demo: Demo, lab: Lab) -> Path:
    demo.section("2. PKI with vpnctl: CA, gateway, peers; carol gets revoked")
    lab.make_pki()
    lab.issue("alice", "--groups", "eng")
    lab.issue("bob", "--groups", "ops")
    lab.issue("carol")
    demo.show(lab.vpnctl("ca", "issuer"))  # the online issuer: renewals and enrollments
    out = lab.vpnctl("revoke", "carol", "--reason", "keyCompromise")
    demo.show(out)
    demo.show(lab.vpnctl("list"))
    other = lab.other_ca()
    mallory_certs = lab.issue("mallory", pki=other)
    # She trusts our gateway's CA, and her bundle holds her own CA too (vpnd's start-up
    # check refuses a certificate that chains to nothing she trusts).
    evil_ca = (mallory_certs / "ca.pem").read_bytes()
    (mallory_certs / "ca.pem").write_bytes((lab.pki / "ca.pem").read_bytes() + evil_ca)
    print("  mallory holds a certificate from a different CA ('evil-ca') for the same overlay")
    return mallory_certs


def _gateway_and_peers(demo: Demo, lab: Lab) -> dict[str, str]:
    demo.section("3. Gateway (default-deny policy) and verified peers")
    for rule in POLICY["rules"]:
        print(f"  policy: {rule}")
    before = {n: lab.hosts[n].ns.snapshot() for n in ("gw", "alice")}
    lab.start_gateway(
        policy=POLICY,
        pki=lab.issuing_pki(),
        renewal={"enabled": True, "lifetime": "1h"},
        enrollment={"enabled": True},
    )
    demo.check("gateway listening on 172.31.0.1:4443", lambda: lab.wait_log("gw", "listening on"))
    lab.start_client("alice")
    lab.start_client("bob")
    demo.check(
        "alice: tunnel up, address 10.8.0.2 from her certificate",
        lambda: lab.wait_log("alice", r"tunnel up: tun0 address 10\.8\.0\.2/24"),
    )
    demo.check(
        "bob: tunnel up, address 10.8.0.3 from his certificate",
        lambda: lab.wait_log("bob", r"tunnel up: tun0 address 10\.8\.0\.3/24"),
    )
    demo.show(last_line(lab.hosts["gw"].log_text(), "accepted alice"))
    return before


def _verified_traffic(demo: Demo, lab: Lab) -> None:
    demo.section("4. Verified peer gets through")
    demo.check(
        f"alice pings the gateway's overlay address {GW_OVERLAY}",
        lambda: lab.ping("alice", GW_OVERLAY),
    )
    demo.check(
        "alice pings bob (10.8.0.3) through the gateway", lambda: lab.ping("alice", "10.8.0.3")
    )
    demo.check(
        f"alice pings the internal host {LAN_HOST} via the pushed route",
        lambda: lab.ping("alice", LAN_HOST),
    )

    demo.section("5. Verified, but the policy says no")
    demo.check(
        "bob (group ops) cannot reach the internal host: the policy denies it",
        lambda: not lab.ping("bob", LAN_HOST, count=1, timeout=1),
    )
    demo.check(
        "the gateway logged the denial with the flow and the reason",
        lambda: lab.wait_log("gw", r"\[bob .*denied icmp"),
    )
    demo.show(last_line(lab.hosts["gw"].log_text(), "denied icmp"))
    demo.check("bob still reaches what he may: the gateway", lambda: lab.ping("bob", GW_OVERLAY))


def _refused_peers(demo: Demo, lab: Lab, mallory_certs: Path) -> None:
    demo.section("6. Unverified and revoked peers get nothing")
    lab.start_client("mallory", certs=mallory_certs)
    demo.check(
        "mallory (other CA) is refused with a TLS alert",
        lambda: lab.wait_log("mallory", r"does not trust"),
    )
    demo.show(last_line(lab.hosts["mallory"].log_text(), "does not trust"))
    demo.check("mallory has no tunnel interface", lambda: not lab.has_link("mallory", "tun0"))
    demo.check(
        "mallory cannot reach the internal host (no route, no tunnel)",
        lambda: not lab.ping("mallory", LAN_HOST, count=1, timeout=1),
    )
    lab.start_client("carol")
    demo.check("carol (revoked) is refused", lambda: lab.wait_log("carol", r"revoked"))
    demo.show(last_line(lab.hosts["carol"].log_text(), "revoked"))
    demo.check("carol has no tunnel interface", lambda: not lab.has_link("carol", "tun0"))
    demo.show(last_line(lab.hosts["gw"].log_text(), "certificate_revoked"))


def _live_revocation(demo: Demo, lab: Lab) -> None:
    demo.section("7. Live revocation: bob is revoked while connected and pinging")
    pinger = lab.hosts["bob"].ns.popen(
        ["ping", "-n", "-D", "-i", "0.05", "-W", "1", "-c", "80", GW_OVERLAY],
        lab.workdir / "ping-bob.log",
    )
    time.sleep(1.5)
    started = time.time()
    demo.show(lab.vpnctl("revoke", "bob", "--reason", "keyCompromise"))
    published = (lab.pki / "crl.pem").stat().st_mtime  # when the new CRL hit the disk
    pinger.wait(30)
    cut = ping_cut_after(lab.workdir / "ping-bob.log", published)
    print(f"        vpnctl revoke itself took {published - started:.2f}s to write crl.pem")
    if cut is not None and cut < 0.05:
        what = "bob's pings (every 50 ms) stopped within one interval of the new CRL"
    else:
        shown = cut if cut is not None else float("nan")
        what = f"bob's last ping reply came {shown:.2f}s after the new CRL was written"
    demo.check(f"{what} (promise: < 1 s)", lambda: cut is not None and cut < 1.0)
    demo.check(
        "the gateway closed bob's session as revoked",
        lambda: lab.wait_log("gw", r"closing bob: certificate revoked"),
    )
    demo.check(
        "bob was told in plain words", lambda: lab.wait_log("bob", r"revoked your certificate")
    )
    demo.show(last_line(lab.hosts["bob"].log_text(), "revoked your certificate"))
    demo.check("alice was not interrupted", lambda: lab.ping("alice", GW_OVERLAY))


def _self_managed(demo: Demo, lab: Lab) -> None:
    demo.section("8. A new laptop joins by invite and its certificate manages itself")
    out = lab.vpnctl("invite", "dave", "--server", f"{GW_WAN}:{PORT}", "--ttl", "1h")
    token = next(line for line in out.splitlines() if line.startswith("vpnd1-"))
    print(f"  vpnctl invite dave -> {token[:24]}... (one line, single use, 1 h)")
    etc = lab.workdir / "dave-etc"
    res = lab.hosts["dave"].ns.run(
        [VPND, "enroll", "-", "--dir", str(etc)], check=False, input=token + "\n"
    )
    demo.check("dave: `vpnd enroll` made its key locally and got a certificate",
               lambda: res.returncode == 0)  # fmt: skip
    demo.show(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr)
    cfg = yaml.safe_load((etc / "client.yaml").read_text())
    for key in ("ca", "cert", "key"):
        cfg["pki"][key] = str(etc / cfg["pki"][key])
    cfg.update(tun={"name": "tun0"}, control_socket=str(lab.workdir / "dave.sock"))
    lab._start(lab.hosts["dave"], cfg)
    demo.check("dave: tunnel up from the client.yaml enroll wrote", lambda: lab.wait_log(
        "dave", r"tunnel up: tun0"))  # fmt: skip
    demo.check("dave (no groups) cannot reach the internal host",
               lambda: not lab.ping("dave", LAN_HOST, count=1, timeout=1))  # fmt: skip
    pinger = lab.hosts["dave"].ns.popen(
        ["ping", "-n", "-i", "0.01", "-W", "1", "-c", "400", GW_OVERLAY],
        lab.workdir / "ping-dave.log",
    )
    out = lab.vpnctl("update", "dave", "--groups", "eng", "--now",
                     "--socket", str(lab.workdir / "gw.sock"))  # fmt: skip
    demo.show(out)
    demo.check(
        "the gateway renewed dave's certificate in the tunnel (generation 2)",
        lambda: lab.wait_log("gw", r"renewed dave: serial \w+ -> \w+ \(generation 2"),
    )
    demo.show(last_line(lab.hosts["gw"].log_text(), "renewed dave"))
    reaches = lambda: lab.ping("dave", LAN_HOST, count=1, timeout=1)  # noqa: E731
    demo.check("dave (now eng) reaches the internal host", lambda: lab.wait_for(reaches, 5))
    pinger.wait(30)
    summary = (lab.workdir / "ping-dave.log").read_text()
    demo.check("not one of dave's 400 pings (10 ms apart) was lost across the renewal",
               lambda: "400 packets transmitted, 400 received" in summary)  # fmt: skip
    demo.check(
        "dave's old certificate is superseded: listed in vpnctl list",
        lambda: lab.wait_for(lambda: "superseded" in lab.vpnctl("list"), 5),
    )


def _teardown(demo: Demo, lab: Lab, before: dict[str, str]) -> None:
    demo.section("9. Tear-down")
    for name in ("mallory", "carol", "dave", "alice", "bob", "gw"):
        lab.stop(name)
    demo.check(
        "alice's kernel state is exactly as before (ip addr + ip route)",
        lambda: lab.hosts["alice"].ns.snapshot() == before["alice"],
    )
    demo.check(
        "gateway's kernel state is exactly as before",
        lambda: lab.hosts["gw"].ns.snapshot() == before["gw"],
    )


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it creates network namespaces, TUN devices and routes.")
        print("Run it as root (e.g. `sudo make demo`).")
        return 1
    demo = Demo()
    factory = NetnsFactory()
    lab = Lab(factory)
    try:
        _network(demo, lab, factory)
        mallory_certs = _pki(demo, lab)
        before = _gateway_and_peers(demo, lab)
        _verified_traffic(demo, lab)
        _refused_peers(demo, lab, mallory_certs)
        _live_revocation(demo, lab)
        _self_managed(demo, lab)
        _teardown(demo, lab, before)
    finally:
        problems = lab.cleanup() + factory.cleanup()
        left = [ns.name for ns in factory.namespaces if ns.name in list_namespaces()]
        demo.check(
            "every namespace, interface and process removed", lambda: not problems and not left
        )
    total = demo.steps
    if demo.failures:
        bad = len(demo.failures)
        print(f"\n{RED}{BOLD}VERDICT: FAIL{RESET}: {bad} of {total} steps did not behave:")
        for f in demo.failures:
            print(f"  - {f}")
        return 1
    print(f"\n{GREEN}{BOLD}VERDICT: PASS{RESET}: all {total} steps behaved.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
