"""When the CAs expire, said early: the 90/30/7-day warnings and the forecast lines that
`vpnctl ca status` and the gateway print.

A CA's expiry is the day every certificate under it stops working at once; an
issuer's is the day renewals and enrollments stop. Pure: callers pass the time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

from vpnd.pki.keys import fingerprint

STAGES = (90, 30, 7)
"""Days before expiry at which a CA or issuer is warned about, loudest last."""


@dataclass(frozen=True, slots=True)
class CaExpiry:
    kind: str
    """``root`` or ``issuer``."""
    name: str
    fingerprint: str
    not_after: dt.datetime
    days_left: int
    stage: int | None
    """The smallest of STAGES the expiry is within (None: further away)."""

    def line(self) -> str:
        when = f"{self.not_after:%Y-%m-%d %H:%M} UTC"
        if self.days_left < 0:
            return f"{self.kind} CA {self.name} EXPIRED at {when}"
        what = (
            "every certificate it signed stops working then"
            if self.kind == "root"
            else "renewals and enrollments stop then"
        )
        return f"{self.kind} CA {self.name} expires {when} (in {self.days_left} days): {what}"


def ca_expiry(kind: str, cert: x509.Certificate, now: dt.datetime) -> CaExpiry:
    not_after = cert.not_valid_after_utc
    left = not_after - now
    days = left.days
    # A stage at more than half the CA's lifetime would fire the day it is made (a
    # 90-day issuer): not a warning, noise.
    lifetime = not_after - cert.not_valid_before_utc
    stages = [s for s in sorted(STAGES) if dt.timedelta(days=s) < lifetime / 2]
    stage = next((s for s in stages if left <= dt.timedelta(days=s)), None)
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    return CaExpiry(kind, name, fingerprint(cert), not_after, days, stage)


class ExpiryWarner:
    """Says each stage once per CA and process: at 90, 30 and 7 days, and when expired."""

    def __init__(self) -> None:
        self._said: set[tuple[str, int | None]] = set()

    def due(self, expiries: Iterable[CaExpiry]) -> list[CaExpiry]:
        out = []
        for exp in expiries:
            stage = -1 if exp.days_left < 0 else exp.stage
            if stage is None or (exp.fingerprint, stage) in self._said:
                continue
            self._said.add((exp.fingerprint, stage))
            out.append(exp)
        return out
