"""How vpnctl shows things: aligned tables for people, stable JSON keys for machines."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from vpnd.pki.inventory import CertRecord
from vpnd.pki.profile import CertificateInfo
from vpnd.pki.results import ListedCertificate

LIST_COLUMNS = (
    "NAME",
    "SERIAL",
    "GEN",
    "ADDRESSES",
    "GROUPS",
    "NOT-AFTER",
    "DAYS",
    "RENEWS",
    "STATUS",
)


def day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d")


def moment(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def joined(items: Iterable[object]) -> str:
    text = ", ".join(str(i) for i in items)
    return text or "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


def fields(pairs: Sequence[tuple[str, str]], indent: str = "  ") -> str:
    width = max(len(k) for k, _ in pairs)
    return "".join(f"{indent}{k.ljust(width)}  {v}\n" for k, v in pairs)


def _renews(cert: ListedCertificate, now: dt.datetime) -> str:
    if cert.renews_at is None:
        return "-"
    return "due" if cert.renews_at <= now else day(cert.renews_at)


def list_table(certs: Sequence[ListedCertificate], now: dt.datetime | None = None) -> str:
    when = now or dt.datetime.now(dt.UTC)
    rows = [
        (
            c.record.name,
            c.record.serial_hex,
            str(c.record.generation),
            joined(c.record.addresses),
            ",".join(c.record.groups) or "-",
            day(c.record.not_after),
            str(c.days_left),
            _renews(c, when),
            c.status,
        )
        for c in certs
    ]
    return table(LIST_COLUMNS, rows)


def record_json(record: CertRecord) -> dict[str, object]:
    return {
        "name": record.name,
        "serial": record.serial_hex,
        "role": record.role.value,
        "addresses": [str(a) for a in record.addresses],
        "groups": list(record.groups),
        "routes": [str(r) for r in record.routes],
        "dns_names": list(record.dns_names),
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "fingerprint": record.fingerprint,
        "issued_at": record.issued_at.isoformat(),
        "revoked_at": None if record.revoked_at is None else record.revoked_at.isoformat(),
        "revoke_reason": record.revoke_reason,
        "delivered": record.delivered,
        "generation": record.generation,
        "issuer_fp": record.issuer_fp,
        "superseded_at": _iso(record.superseded_at),
        "superseded_by": None if record.superseded_by is None else f"{record.superseded_by:x}",
    }


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def listed_json(cert: ListedCertificate) -> dict[str, object]:
    return {
        **record_json(cert.record),
        "days_left": cert.days_left,
        "status": cert.status,
        "next_renewal": _iso(cert.renews_at),
    }


def days_phrase(days_left: int) -> str:
    if days_left < 0:
        return f"expired {-days_left} days ago"
    return f"{days_left} days left"


def certificate_text(info: CertificateInfo, days_left: int) -> str:
    pairs = [
        ("name", info.name or "-"),
        ("role", info.role),
        ("serial", f"{info.serial:x}"),
        ("subject", info.subject or "-"),
        ("issuer", info.issuer or "-"),
        ("addresses", joined(info.addresses)),
        ("dns names", joined(info.dns_names)),
        ("groups", joined(info.groups)),
        ("routes", joined(info.routes)),
        ("not before", moment(info.not_before)),
        ("not after", f"{moment(info.not_after)} ({days_phrase(days_left)})"),
        ("fingerprint", f"sha256 {info.fingerprint}"),
        ("eku", joined(info.eku)),
        ("key type", info.key_type),
    ]
    if info.role == "peer":
        pairs.append(("generation", str(info.generation)))
    return fields(pairs, indent="")
