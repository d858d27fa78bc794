"""Checks run before vpnd touches anything: by ``vpnd --check`` and at every start.

``check(cfg, now=...)`` reads files, ``/sys/class/net`` and ``/proc/self/status``, and
bind-tests the listen ports (bind, then close: local, no traffic). It writes nothing,
opens no TUN, sends no netlink request and makes no outbound connection. It returns a
``Report``: one line per problem (each names the config key to fix), warnings, and
short notes for the OK summary.

What it checks:

* the own certificate: readable, matches the private key (passphrase file honoured),
  carries the EKU of the mode (serverAuth on a gateway, clientAuth on a client), chains
  to the CA bundle ``pki.ca``, is inside its validity period and not revoked by a CRL
  we hold (``vpnd.pki.verify`` does the path validation);
* on a gateway, the CRL file: every CRL is signed by a CA of ``pki.ca``, every CA has
  one, and it is fresh (past nextUpdate is a warning under ``pki.crl_stale: allow``);
* that OpenSSL accepts the certificate, key and CA as a TLS context;
* that the gateway's listen port (and the metrics port) is free;
* that ``tun.name`` is free or owned by vpnd: a link vpnd made carries the ifalias
  ``vpnd:<pid>``; any other existing link of that name is refused;
* with ``privileged=True`` (at start, not for ``--check``): CAP_NET_ADMIN.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from vpnd.config import ClientConfig, CrlStale, GatewayConfig, HostPort
from vpnd.files.passphrase import PassphraseError, read_passphrase
from vpnd.net.ownership import LinkOwner, alias_owner, classify_link
from vpnd.pki import TrustStore, load_trust_store, verify_chain
from vpnd.pki.crl import crl_number, crl_problem, load_crls
from vpnd.pki.identity import PkiError, Reason, Role, VerifyError
from vpnd.pki.issuer import expiry_forecast, load_issuer
from vpnd.pki.keys import load_certificates, load_private_key
from vpnd.transport.tlsctx import TlsConfigError, client_context, server_context

SYS_CLASS_NET = Path("/sys/class/net")
PROC_STATUS = Path("/proc/self/status")
CAP_NET_ADMIN = 12


@dataclass
class Report:
    """What ``check`` found. Start (or ``--check``) succeeds iff ``problems`` is empty."""

    problems: list[str] = field(default_factory=list)
    """One line each, naming the config key to fix."""
    warnings: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)
    """Short notes for the summary line on success."""

    @property
    def passed(self) -> bool:
        return not self.problems


def check(
    cfg: GatewayConfig | ClientConfig,
    *,
    now: dt.datetime,
    privileged: bool = False,
    sys_class_net: Path = SYS_CLASS_NET,
    proc_status: Path = PROC_STATUS,
) -> Report:
    """Everything that can be known to be wrong before start, without side effects."""
    report = Report()
    gateway = isinstance(cfg, GatewayConfig)
    for warning in cfg.warnings:
        report.warnings.append(warning)
    _check_identity(cfg, now, report)
    if gateway:
        assert isinstance(cfg, GatewayConfig)
        _check_lifecycle(cfg, now, report)
        _check_port("listen", cfg.listen, report)
    if cfg.metrics.listen is not None:
        _check_port("metrics.listen", cfg.metrics.listen, report)
    _check_tun(cfg.tun.name, sys_class_net, report)
    if privileged and not has_cap_net_admin(proc_status):
        report.problems.append(
            "vpnd needs CAP_NET_ADMIN (for its TUN, addresses and routes): run it as root, "
            "or grant it with AmbientCapabilities=CAP_NET_ADMIN"
        )
    return report


# --- the online issuer and the inventory --------------------------------------------------


def _check_lifecycle(cfg: GatewayConfig, now: dt.datetime, report: Report) -> None:
    pki = cfg.pki
    # The inventory is only opened at start: opening migrates an old schema, and a
    # check has no side effects.
    if pki.issuer is None:
        return
    try:
        roots = load_certificates(pki.ca)
        issuer = load_issuer(
            pki.issuer.cert,
            pki.issuer.key,
            passphrase_file=pki.issuer.key_passphrase_file,
            roots=roots,
            now=now,
        )
    except PkiError as err:
        report.problems.append(f"pki.issuer: {err}")
        return
    warning = expiry_forecast(
        issuer.cert, now=now, lifetime_s=cfg.renewal.lifetime, warn_days=pki.expiry_warning_days
    )
    if warning:
        report.warnings.append(f"pki.issuer: {warning}")
    report.ok.append(
        f"issuer {issuer.name} valid until {issuer.not_after.date().isoformat()}, signed by pki.ca"
    )


# --- certificate, key, CA and CRL ------------------------------------------------------


def _label(cert: x509.Certificate) -> str:
    try:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        cns = []
    name = str(cns[0].value)[:64] if cns else cert.subject.rfc4514_string()[:64]
    return f"{name!r} (serial {cert.serial_number:x})"


def _passphrase(path: Path | None, report: Report) -> bytes | bool | None:
    if path is None:
        return None
    try:
        return read_passphrase(path)
    except PassphraseError as err:
        report.problems.append(f"pki.key_passphrase_file: {err}")
        return False


def _public_der(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _check_identity(cfg: GatewayConfig | ClientConfig, now: dt.datetime, report: Report) -> None:
    gateway = isinstance(cfg, GatewayConfig)
    pki = cfg.pki
    chain, passphrase = _check_key_pair(pki.cert, pki.key, pki.key_passphrase_file, report)
    try:
        roots = load_certificates(pki.ca)
    except PkiError as err:
        report.problems.append(f"pki.ca: {err}")
        return
    crls = _held_crls(cfg, roots, now, report)
    try:
        # Only well-signed CRLs; staleness and gaps were judged above.
        trust = load_trust_store(pki.ca, None, crl_required=False)
        trust = TrustStore(
            roots=trust.roots,
            crls=tuple(c for c in crls if any(crl_problem(c, r) is None for r in trust.roots)),
            crl_required=False,
            allow_stale_crl=True,
        )
    except PkiError as err:
        report.problems.append(f"pki.ca: {err}")
        return
    if chain:
        when = _renewal_time(cfg, chain[0], now, report)
        _check_own_certificate(chain, trust, gateway, pki.cert, pki.ca, when, report)
    if report.problems:
        return  # OpenSSL would only repeat them, less clearly
    if _check_tls_context(cfg, passphrase if isinstance(passphrase, bytes) else None, report):
        leaf = chain[0]
        report.ok.append(
            f"{'gateway' if gateway else 'client'} certificate {_label(leaf)} valid until "
            f"{leaf.not_valid_after_utc.date().isoformat()}, matches its key, chains to pki.ca"
        )


def _renewal_time(
    cfg: GatewayConfig | ClientConfig, leaf: x509.Certificate, now: dt.datetime, report: Report
) -> dt.datetime:
    """A client that renews may start with an expired certificate: the gateway then
    admits it only to renew (quarantine), or refuses it. Check the chain as of its
    last valid second, and say so."""
    if not isinstance(cfg, ClientConfig) or not cfg.renewal.enabled:
        return now
    not_after = leaf.not_valid_after_utc
    if now <= not_after:
        return now
    report.warnings.append(
        f"pki.cert: {cfg.pki.cert}: expired at {not_after.isoformat()}: connecting only to "
        "renew it (the gateway allows that within its quarantine grace, or refuses)"
    )
    return not_after - dt.timedelta(seconds=1)


def _check_key_pair(
    cert: Path, key_path: Path, passphrase_file: Path | None, report: Report
) -> tuple[list[x509.Certificate], bytes | bool | None]:
    """The certificate chain and the passphrase (False: unreadable), key match checked."""
    try:
        chain = load_certificates(cert)
    except PkiError as err:
        report.problems.append(f"pki.cert: {err}")
        chain = []
    passphrase = _passphrase(passphrase_file, report)
    key = None
    if passphrase is not False:
        assert passphrase is None or isinstance(passphrase, bytes)
        try:
            key = load_private_key(key_path, passphrase)
        except PkiError as err:
            text = str(err).replace("give --passphrase-file", "set pki.key_passphrase_file")
            report.problems.append(f"pki.key: {text}")
    if chain and key is not None and _public_der(chain[0]) != _public_der(key):
        report.problems.append(
            f"pki.key: {key_path} is not the key of the certificate {_label(chain[0])} in "
            f"{cert}: give the key that was made with this certificate's CSR"
        )
    return chain, passphrase


def _held_crls(
    cfg: GatewayConfig | ClientConfig,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
    report: Report,
) -> list[x509.CertificateRevocationList]:
    if isinstance(cfg, GatewayConfig):
        assert cfg.pki.crl is not None
        return _check_crls(cfg, roots, now, report)
    if cfg.pki.crl is None:
        return []
    try:
        return load_crls(cfg.pki.crl)
    except PkiError as err:
        report.problems.append(f"pki.crl: {err}")
        return []


def _check_tls_context(
    cfg: GatewayConfig | ClientConfig, passphrase: bytes | None, report: Report
) -> bool:
    """Does OpenSSL accept the files as a TLS context of the mode?"""
    pki = cfg.pki
    try:
        if isinstance(cfg, GatewayConfig):
            server_context(
                ca=pki.ca, cert=pki.cert, key=pki.key, crl=pki.crl, key_passphrase=passphrase
            )
        else:
            client_context(ca=pki.ca, cert=pki.cert, key=pki.key, key_passphrase=passphrase)
    except TlsConfigError as err:
        report.problems.append(f"pki: {err}")
        return False
    return True


def _check_own_certificate(  # noqa: PLR0917 - one private call site
    chain: Sequence[x509.Certificate],
    trust: TrustStore,
    gateway: bool,
    cert_path: Path,
    ca_path: Path,
    now: dt.datetime,
    report: Report,
) -> None:
    leaf = chain[0]
    role = Role.GATEWAY if gateway else Role.PEER
    subject: x509.DNSName | None = None
    if gateway:
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = san.get_values_for_type(x509.DNSName)
            ips = san.get_values_for_type(x509.IPAddress)
        except (x509.ExtensionNotFound, ValueError):
            dns, ips = [], []
        if dns:
            subject = x509.DNSName(dns[0])
        if not ips:
            report.problems.append(
                f"pki.cert: {cert_path}: certificate {_label(leaf)} carries no overlay IP address: "
                "a gateway certificate needs one (vpnctl issue --gateway)"
            )
            return
    try:
        if gateway and subject is None:
            try:
                eku = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
            except (x509.ExtensionNotFound, ValueError):
                eku = []
            if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
                raise VerifyError(Reason.WRONG_EKU, "a gateway certificate needs EKU serverAuth")
            raise VerifyError(Reason.NO_SAN, "it carries no DNS name for clients to pin")
        verify_chain(list(chain), now=now, trust=trust, role=role, subject=subject)
    except VerifyError as err:
        report.problems.append(_own_cert_problem(err, leaf, gateway, cert_path, ca_path))
    except PkiError as err:
        report.problems.append(f"pki.cert: {cert_path}: {err}")


def _own_cert_problem(
    err: VerifyError, leaf: x509.Certificate, gateway: bool, cert_path: Path, ca_path: Path
) -> str:
    mode = "gateway" if gateway else "client"
    what = f"pki.cert: {cert_path}: certificate {_label(leaf)}"
    if err.reason in (Reason.WRONG_EKU, Reason.NO_EKU, Reason.CA_AS_LEAF):
        other = "a peer's" if gateway else "a gateway's"
        return (
            f"{what} is not a {mode} certificate ({err.detail}): is it {other}? "
            f"give this {mode}'s own certificate"
        )
    if err.reason in (Reason.UNKNOWN_CA, Reason.BAD_SIGNATURE):
        issuer = leaf.issuer.rfc4514_string()[:80]
        return (
            f"{what} does not chain to a CA in pki.ca ({ca_path}): it was issued by "
            f"{issuer!r}; use a certificate from this CA, or add its CA to pki.ca"
        )
    if err.reason in (Reason.EXPIRED, Reason.NOT_YET_VALID):
        return f"{what}: {err.detail}; get a new certificate (or check the clock)"
    if err.reason is Reason.REVOKED:
        return f"{what} is revoked by the CRL: get a new certificate"
    return f"{what}: {err}"


def _crl_label(crl: x509.CertificateRevocationList) -> str:
    return repr(crl.issuer.rfc4514_string()[:80])


def _check_crls(
    cfg: GatewayConfig,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
    report: Report,
) -> list[x509.CertificateRevocationList]:
    path = cfg.pki.crl
    assert path is not None
    try:
        crls = load_crls(path)
    except PkiError as err:
        report.problems.append(f"pki.crl: {err}")
        return []
    good: list[x509.CertificateRevocationList] = []
    blamed = False  # a bad CRL was reported: a missing one is the same mistake
    for crl in crls:
        issuers = [r for r in roots if r.subject == crl.issuer]
        if not issuers:
            blamed = True
            report.problems.append(
                f"pki.crl: {path} holds a CRL issued by {_crl_label(crl)}, which is not a CA "
                f"in pki.ca ({cfg.pki.ca}): every peer would be refused; use your CA's crl.pem"
            )
            continue
        problems = [crl_problem(crl, r) for r in issuers]
        if all(problems):
            blamed = True
            report.problems.append(f"pki.crl: {path}: CRL of {_crl_label(crl)}: {problems[0]}")
            continue
        good.append(crl)
    for root in roots:
        if not any(c.issuer == root.subject for c in good) and not blamed:
            report.problems.append(
                f"pki.crl: {path} holds no CRL of the CA {_label(root)} from pki.ca: its peers "
                "would all be refused (revocation fails closed); add its crl.pem"
            )
    for root in roots:
        mine = [c for c in good if c.issuer == root.subject]
        if mine:
            _check_fresh(cfg, max(mine, key=crl_number), now, report)
    return good


def _check_fresh(
    cfg: GatewayConfig, crl: x509.CertificateRevocationList, now: dt.datetime, report: Report
) -> None:
    """The newest CRL of a CA: valid now, and not past its nextUpdate."""
    next_update = crl.next_update_utc
    if crl.last_update_utc > now:
        report.problems.append(
            f"pki.crl: CRL #{crl_number(crl)} of {_crl_label(crl)} is not valid before "
            f"{crl.last_update_utc.isoformat()}: check the clock"
        )
    elif next_update is not None and next_update < now:
        text = (
            f"pki.crl: CRL #{crl_number(crl)} of {_crl_label(crl)} is stale: its "
            f"nextUpdate was {next_update.isoformat()}; publish a fresh one (vpnctl crl)"
        )
        if cfg.pki.crl_stale == CrlStale.ALLOW:
            report.warnings.append(f"{text} (accepted: pki.crl_stale is 'allow')")
        else:
            report.problems.append(text)
    elif next_update is not None:
        report.ok.append(f"CRL #{crl_number(crl)} fresh until {next_update.date().isoformat()}")


# --- ports, links, capabilities ----------------------------------------------------------


def port_problem(key: str, where: HostPort) -> str | None:
    """Why ``where`` cannot be listened on now, or None. Binds and closes at once."""
    try:
        ip = ipaddress.ip_address(where.host)
    except ValueError:
        return None  # a name: resolving it is not a local check
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As asyncio's create_server does: TIME_WAIT leftovers must not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(ip), where.port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return f"{key}: {where} is already in use by another process (is vpnd running?)"
        if err.errno == errno.EADDRNOTAVAIL:
            return f"{key}: {ip} is not an address of this host"
        if err.errno == errno.EACCES:
            return f"{key}: port {where.port} needs privileges (CAP_NET_BIND_SERVICE)"
        return f"{key}: cannot bind {where}: {err.strerror}"
    finally:
        sock.close()
    return None


def _check_port(key: str, where: HostPort, report: Report) -> None:
    problem = port_problem(key, where)
    if problem is None:
        report.ok.append(f"{key} {where} free")
    else:
        report.problems.append(problem)


def link_owner(name: str, sys_class_net: Path = SYS_CLASS_NET) -> tuple[bool, int | None]:
    """(exists, pid): the pid from a ``vpnd:<pid>`` ifalias, None if not vpnd's."""
    exists, alias = _link_alias(name, sys_class_net)
    return exists, alias_owner(alias)


def _link_alias(name: str, sys_class_net: Path) -> tuple[bool, str | None]:
    base = sys_class_net / name
    if not base.exists():
        return False, None
    try:
        return True, (base / "ifalias").read_text().strip()
    except OSError:
        return True, None


def _check_tun(name: str, sys_class_net: Path, report: Report) -> None:
    exists, alias = _link_alias(name, sys_class_net)
    owner = classify_link(exists, alias)  # the one definition of vpnd's link marker
    if owner == LinkOwner.FREE:
        report.ok.append(f"TUN {name} free")
    elif owner == LinkOwner.FOREIGN:
        report.problems.append(
            f"tun.name: interface {name} exists and was not created by vpnd; pick another name"
        )
    elif owner == LinkOwner.OURS_LIVE:
        report.problems.append(
            f"tun.name: interface {name} is in use by a running vpnd ({alias}); "
            "stop it first or pick another name"
        )
    else:
        report.ok.append(f"TUN {name} left by a vpnd that is gone ({alias}): replaced at start")


def has_cap_net_admin(proc_status: Path = PROC_STATUS) -> bool:
    """Does this process hold CAP_NET_ADMIN in its effective set? (True if unknown.)"""
    try:
        text = proc_status.read_text()
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
            except (IndexError, ValueError):
                return True
    return True
