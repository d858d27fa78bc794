"""OpenSSL errors -> stable TLS alert codes, and plain words for each code.

Codes are the RFC 8446 alert names in lowercase ("unknown_ca", "certificate_revoked",
...). They appear in logs and metrics, so never rename one. Two kinds of ``SSLError``
reach us:

* an alert the *peer* sent: OpenSSL's reason is ``SSLV3_ALERT_<NAME>``,
  ``TLSV1_ALERT_<NAME>`` or ``TLSV13_ALERT_<NAME>``;
* our own refusal: ``CERTIFICATE_VERIFY_FAILED`` plus an X509 verify code, or a protocol
  reason (``UNSUPPORTED_PROTOCOL``, ``WRONG_VERSION_NUMBER``, ...). For these the code is
  the alert OpenSSL sends to the peer (``ssl_verify_alarm_type`` in OpenSSL 3.0), so the
  gateway's log line and what the client is told agree.
"""

from __future__ import annotations

import ssl

_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV13_ALERT_", "TLSV1_ALERT_")
# OpenSSL spells one received alert without "ALERT".
_ODD_ALERTS = {"TLSV1_UNRECOGNIZED_NAME": "unrecognized_name"}

# X509_V_ERR_* (openssl/x509_vfy.h) -> alert sent, after OpenSSL 3.0's x509table.
# Anything not listed is sent as certificate_unknown (OpenSSL's default).
_VERIFY_CODE_ALERT = {
    2: "unknown_ca",  # unable to get issuer certificate
    3: "unknown_ca",  # unable to get CRL (CRL checking on, no CRL for this CA)
    4: "bad_certificate",
    5: "bad_certificate",
    6: "bad_certificate",
    7: "decrypt_error",  # certificate signature failure
    8: "decrypt_error",  # CRL signature failure
    9: "bad_certificate",  # not yet valid: OpenSSL does not say certificate_expired here
    10: "certificate_expired",
    11: "bad_certificate",  # CRL not yet valid
    12: "certificate_expired",  # CRL has expired
    13: "bad_certificate",
    14: "bad_certificate",
    15: "bad_certificate",
    16: "bad_certificate",
    17: "internal_error",
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    22: "unknown_ca",  # chain too long
    23: "certificate_revoked",
    25: "unknown_ca",  # path length exceeded
    26: "unsupported_certificate",  # wrong EKU / purpose
    27: "bad_certificate",  # untrusted
    28: "bad_certificate",  # rejected
    33: "unknown_ca",  # unable to get CRL issuer
    50: "handshake_failure",  # application verification
    62: "bad_certificate",  # hostname mismatch
    63: "bad_certificate",
    64: "bad_certificate",  # IP address mismatch
    65: "bad_certificate",
    66: "bad_certificate",  # end-entity key too small
    67: "bad_certificate",  # CA key too small
    68: "bad_certificate",  # CA signature digest too weak (SHA-1)
    69: "internal_error",
    70: "internal_error",
    79: "unknown_ca",  # invalid CA
}

# Non-alert OpenSSL reasons -> the alert OpenSSL sends (or would be the right one).
_REASON_ALERT = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "certificate_required",
    "NO_SHARED_CIPHER": "handshake_failure",
    "NO_SUITABLE_KEY_SHARE": "handshake_failure",
    "NO_SHARED_GROUPS": "handshake_failure",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "handshake_failure",
    "NO_APPLICATION_PROTOCOL": "no_application_protocol",
    "HTTP_REQUEST": "decode_error",
    "HTTPS_PROXY_REQUEST": "decode_error",
    "PACKET_LENGTH_TOO_LONG": "decode_error",
    "RECORD_LENGTH_MISMATCH": "decode_error",
    "LENGTH_MISMATCH": "decode_error",
    "BAD_PACKET_LENGTH": "decode_error",
    "BAD_LENGTH": "decode_error",
    "UNEXPECTED_EOF_WHILE_READING": "decode_error",
    "UNEXPECTED_MESSAGE": "unexpected_message",
    "UNEXPECTED_RECORD": "unexpected_message",
    "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "bad_record_mac",
}

_DESCRIPTIONS = {
    "unknown_ca": "the gateway does not trust the CA that signed your certificate "
    "(or has no CRL for it): check you were issued a certificate by this gateway's CA",
    "certificate_revoked": "the gateway refused your certificate: it was revoked; "
    "ask your admin for a new one",
    "certificate_expired": "your certificate has expired (or is not yet valid): "
    "check the clock or ask for a new one",
    "certificate_required": "the gateway requires a client certificate and none was sent: "
    "configure cert and key",
    "bad_certificate": "the gateway refused your certificate as invalid "
    "(a not-yet-valid date, a weak key or signature, or a bad field): check the clock "
    "or ask for a new one",
    "unsupported_certificate": "the gateway refused your certificate: it is not a client "
    "certificate (wrong extended key usage); use a peer certificate, not a gateway one",
    "certificate_unknown": "the gateway refused your certificate (for example an address "
    "outside the CA's permitted networks): ask your admin to reissue it",
    "decrypt_error": "a certificate signature did not verify: the certificate or CA file "
    "is corrupt or mismatched",
    "protocol_version": "TLS version mismatch: vpnd speaks TLS 1.3 only",
    "no_application_protocol": "the other side does not speak the vpnd/1 protocol: "
    "check host and port",
    "handshake_failure": "no common TLS parameters (cipher, group or signature "
    "algorithm): check that both sides run vpnd",
    "decode_error": "the other side sent something that is not TLS: check host and port",
    "unexpected_message": "the other side broke the TLS protocol: check host and port",
    "bad_record_mac": "a TLS record was corrupted in transit",
    "illegal_parameter": "the other side sent an invalid TLS parameter",
    "access_denied": "the gateway denied access",
    "insufficient_security": "the other side requires stronger security parameters",
    "internal_error": "the other side hit an internal TLS error: see its logs",
    "unrecognized_name": "the gateway does not serve the requested name",
    "user_canceled": "the other side cancelled the handshake",
    "close_notify": "the other side closed the connection",
}


def is_peer_alert(err: ssl.SSLError) -> bool:
    """True when ``err`` reports an alert the peer sent (not our own refusal)."""
    reason = getattr(err, "reason", None) or ""
    return reason.startswith(_ALERT_PREFIXES) or reason in _ODD_ALERTS


def alert_from_ssl_error(err: ssl.SSLError) -> str:
    """The stable alert code for an ``ssl.SSLError`` raised by a handshake or a read."""
    reason = getattr(err, "reason", None) or ""
    if reason == "CERTIFICATE_VERIFY_FAILED":
        code = getattr(err, "verify_code", None)
        if isinstance(code, int):
            return _VERIFY_CODE_ALERT.get(code, "certificate_unknown")
        return "bad_certificate"
    if reason in _REASON_ALERT:
        return _REASON_ALERT[reason]
    if reason in _ODD_ALERTS:
        return _ODD_ALERTS[reason]
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            name = reason.removeprefix(prefix).lower()
            # OpenSSL spells 90 "user_cancelled"; RFC 8446 says "user_canceled".
            return "user_canceled" if name == "user_cancelled" else name
    if isinstance(err, ssl.SSLEOFError):
        return "decode_error"
    return "handshake_failure"


# Alerts a client sends when *it* refuses the gateway: our certificate (its CA, dates,
# EKU, revocation) or our name (the client's pinned server_name is not in our SAN).
_REJECTS_OUR_CERTIFICATE = {
    "unknown_ca": "it does not trust the CA that signed our certificate",
    "bad_certificate": "our certificate does not carry the name it pinned, or is invalid",
    "certificate_unknown": "it could not accept our certificate",
    "unsupported_certificate": "our certificate is not a gateway (serverAuth) certificate",
    "certificate_expired": "our certificate has expired, or its clock is off",
    "certificate_revoked": "it holds a CRL revoking our certificate",
    "decrypt_error": "a signature in our certificate chain did not verify",
    "unrecognized_name": "we do not carry the name it asked for",
    "access_denied": "it denied access",
}


def describe_client_abort(alert: str) -> str:
    """One line for the gateway's log when the *client* aborted the handshake with ``alert``.

    Not the advice meant for a client (``describe_alert``): here the client judged us.
    """
    why = _REJECTS_OUR_CERTIFICATE.get(alert)
    if why is None:
        return f"the client aborted the TLS handshake with alert {alert}"
    return (
        f"the client aborted the TLS handshake with alert {alert}: the client rejected our "
        f"certificate or name ({why}); check that its pki.ca holds the CA that signed our "
        "certificate and that its server_name is a DNS name in our certificate"
    )


def describe_alert(alert: str) -> str:
    """One line, in plain words, for an alert the gateway (or peer) sent us."""
    if alert in _DESCRIPTIONS:
        return _DESCRIPTIONS[alert]
    return f"the other side aborted the TLS connection with alert {alert}"
