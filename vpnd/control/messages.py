"""The whole control API in one import: the protocol and the result shapes.

Handlers and daemons that build replies import from here; the definitions live in
``vpnd.control.protocol`` (framing, requests, errors) and ``vpnd.control.results``
(result shapes, carried by ``vpnd.control.codec``).
"""

from __future__ import annotations

from vpnd.control.protocol import (
    MAX_LINE,
    MAX_NAME,
    MAX_REASON,
    Command,
    ControlError,
    ErrorCode,
    Json,
    ProtocolError,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    kick_args,
)
from vpnd.control.results import (
    CertSummary,
    CrlSummary,
    KickResult,
    PeerInfo,
    PeerList,
    ReloadReport,
    RenewalStatus,
    RenewHintResult,
    RenewResult,
    ResultShape,
    StatusInfo,
    peers_from_json,
    peers_to_json,
)

__all__ = [
    "MAX_LINE",
    "MAX_NAME",
    "MAX_REASON",
    "CertSummary",
    "Command",
    "ControlError",
    "CrlSummary",
    "ErrorCode",
    "Json",
    "KickResult",
    "PeerInfo",
    "PeerList",
    "ProtocolError",
    "ReloadReport",
    "RenewHintResult",
    "RenewResult",
    "RenewalStatus",
    "Request",
    "Response",
    "ResultShape",
    "StatusInfo",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "kick_args",
    "peers_from_json",
    "peers_to_json",
]
