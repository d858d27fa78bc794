"""Why a tunnel closed: stable close codes and plain-English explanations for users."""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Close codes carried in CLOSE frames. The numbers are wire format: never renumber."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    KEEPALIVE_TIMEOUT = 2
    CERT_EXPIRED = 3
    REVOKED = 4
    KICKED = 5
    REPLACED = 6
    ADDRESS_CONFLICT = 7
    POLICY = 8
    SHUTDOWN = 9
    AUTH_FAILED = 10
    FRAME_TOO_LARGE = 11
    RESOURCE_LIMIT = 12
    CONFIG_TIMEOUT = 13


def close_code(value: int) -> int:
    """Return the ``CloseCode`` member for ``value``, or ``value`` itself if unknown.

    A newer peer may send codes we do not know; they are kept as plain ints.
    """
    try:
        return CloseCode(value)
    except ValueError:
        return value


# "{m}" is the (sanitised) message the closing side sent.
_SENTENCES: dict[int, str] = {
    CloseCode.NORMAL: "the session was closed normally{m}",
    CloseCode.PROTOCOL_ERROR: (
        "the tunnel protocol broke down{m}; this is a bug or a version mismatch, "
        "so upgrade both ends to the same vpnd release"
    ),
    CloseCode.KEEPALIVE_TIMEOUT: (
        "the other end stopped answering{m}; check the network path between you "
        "and the gateway (vpnd reconnects on its own)"
    ),
    CloseCode.CERT_EXPIRED: "your certificate expired at {r}; ask your admin for a new one",
    CloseCode.REVOKED: "the gateway revoked your certificate{m}; ask your admin for a new one",
    CloseCode.KICKED: "an administrator disconnected this session{m}",
    CloseCode.REPLACED: (
        "a newer connection with the same certificate replaced this one{m}; "
        "make sure the certificate is not in use on two machines"
    ),
    CloseCode.ADDRESS_CONFLICT: (
        "your overlay address is already in use by another peer{m}; "
        "ask your admin to check the address assignment"
    ),
    CloseCode.POLICY: "the gateway's policy refused this session{m}; ask your admin",
    CloseCode.SHUTDOWN: ("the gateway is shutting down{m}; vpnd reconnects when it is back"),
    CloseCode.AUTH_FAILED: (
        "authentication failed{m}; check your certificate and the CA the gateway trusts"
    ),
    CloseCode.FRAME_TOO_LARGE: (
        "the other end sent a frame larger than allowed{m}; make sure both ends run "
        "compatible vpnd releases with the same max_frame"
    ),
    CloseCode.RESOURCE_LIMIT: "the gateway is at a resource limit{m}; try again later",
    CloseCode.CONFIG_TIMEOUT: (
        "the tunnel setup did not finish in time{m}; check that the other end is a "
        "vpnd of a compatible release and that it is not overloaded"
    ),
}


def describe_close(code: int, message: str) -> str:
    """A one-line, plain-English sentence telling a user what happened and what to do."""
    text = printable(message).strip()
    template = _SENTENCES.get(code)
    if template is None:
        suffix = f": {text}" if text else ""
        return f"the session was closed with unknown code {code}{suffix}"
    return template.format(m=f": {text}" if text else "", r=text or "an unknown time")


def printable(text: str) -> str:
    """Replace control and other non-printable characters, so peer text is safe to log."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
