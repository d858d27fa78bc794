"""The in-tunnel renewal exchange and quarantine, sans-I/O, with stepped time."""

from __future__ import annotations

import struct

import pytest
from proto_fixtures import TICK, Pair, sent_close, the_close, tunnel_config

from vpnd.proto import (
    CloseCode,
    LocalProtocolError,
    RefusalCode,
    RenewalFrame,
    RenewalIssued,
    RenewalRefused,
    RenewalRequested,
    RenewHint,
    Session,
    SessionConfig,
    SessionState,
)
from vpnd.proto.frames import FrameType, encode_frame
from vpnd.proto.renewal_frames import CSR_MAX, PEM_MAX

CSR = b"\x30\x82\x01\x00" + b"c" * 256
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" * 2


def _renewal_pair(*, renewal_timeout: float = 60.0) -> Pair:
    pair = Pair()
    cfg = SessionConfig("client", renewal_timeout=renewal_timeout)
    pair.cl = Session(cfg, pair.now)
    pair.handshake()
    pair.gw_events.clear()
    pair.cl_events.clear()
    return pair


def _requested(pair: Pair) -> RenewalRequested:
    events = [e for e in pair.gw_events if isinstance(e, RenewalRequested)]
    assert len(events) == 1, pair.gw_events
    pair.gw_events.clear()
    return events[0]


def test_request_and_issue_round_trip() -> None:
    pair = _renewal_pair()
    rid = pair.cl.request_renewal(CSR, pair.now)
    assert rid == 1 and pair.cl.renewal_pending == 1
    pair.pump()
    req = _requested(pair)
    assert (req.request_id, req.csr_der) == (1, CSR)
    assert pair.gw.renewal_pending == 1
    pair.gw.send_renewed(1, PEM, pair.now)
    pair.pump()
    assert pair.cl_events == [RenewalIssued(1, PEM)]
    assert pair.cl.renewal_pending is None and pair.gw.renewal_pending is None
    assert pair.cl.state is SessionState.ESTABLISHED
    # The next request gets the next id.
    assert pair.cl.request_renewal(CSR, pair.now) == 2


def test_refusal_carries_code_and_sanitised_message() -> None:
    pair = _renewal_pair()
    pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    rid = _requested(pair).request_id
    pair.gw.refuse_renewal(rid, RefusalCode.REVOKED, "serial 1f is\x07 revoked", pair.now)
    pair.pump()
    assert pair.cl_events == [RenewalRefused(1, RefusalCode.REVOKED, "serial 1f is\ufffd revoked")]
    assert pair.cl.renewal_pending is None


def test_unknown_refusal_code_stays_an_int() -> None:
    pair = _renewal_pair()
    pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    pair.gw.refuse_renewal(1, 4242, "newer gateway", pair.now)
    pair.pump()
    (event,) = pair.cl_events
    assert isinstance(event, RenewalRefused) and event.code == 4242
    assert not isinstance(event.code, RefusalCode)


def test_one_outstanding_request_per_session() -> None:
    pair = _renewal_pair()
    pair.cl.request_renewal(CSR, pair.now)
    with pytest.raises(LocalProtocolError, match="still outstanding"):
        pair.cl.request_renewal(CSR, pair.now)


def test_gateway_closes_on_a_second_request_while_one_is_open() -> None:
    pair = _renewal_pair()
    pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    _requested(pair)
    pair.gw.receive_data(encode_frame(RenewalFrame.RENEW_REQUEST, struct.pack(">I", 2) + CSR), 0)
    assert sent_close(pair.gw)[0] == CloseCode.PROTOCOL_ERROR
    close = the_close(pair.gw)
    assert "unanswered" in close.message


def test_unanswered_request_times_out_on_the_tick_and_a_late_answer_is_ignored() -> None:
    pair = _renewal_pair(renewal_timeout=1.0)
    pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    _requested(pair)
    timer = pair.cl.get_timer()
    assert timer is not None and timer <= 1.0
    pair.step(int(1.0 / TICK) - 1)
    assert not [e for e in pair.cl_events if isinstance(e, RenewalRefused)]
    pair.step()
    refused = [e for e in pair.cl_events if isinstance(e, RenewalRefused)]
    assert refused == [
        RenewalRefused(1, RefusalCode.TIMEOUT, "no answer to renewal request 1 within 1s", True)
    ]
    assert pair.cl.renewal_pending is None
    pair.cl_events.clear()
    pair.gw.send_renewed(1, PEM, pair.now)  # the gateway was slow, not wrong
    pair.pump()
    assert pair.cl_events == []
    assert pair.cl.counters.drops["stale_renewal"] == 1
    assert pair.cl.state is SessionState.ESTABLISHED
    assert pair.cl.request_renewal(CSR, pair.now) == 2


def test_answer_to_a_request_never_sent_is_a_protocol_error() -> None:
    pair = _renewal_pair()
    pair.cl.receive_data(encode_frame(RenewalFrame.RENEW_ISSUED, struct.pack(">I", 7) + PEM), 0)
    close = the_close(pair.cl)
    assert close.code == CloseCode.PROTOCOL_ERROR and "never sent" in close.message


def _client_frame(ftype: int, payload: bytes) -> Session:
    pair = _renewal_pair()
    pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    pair.cl.receive_data(encode_frame(ftype, payload), pair.now)
    return pair.cl


def _gateway_frame(ftype: int, payload: bytes) -> Session:
    pair = _renewal_pair()
    pair.gw.receive_data(encode_frame(ftype, payload), pair.now)
    return pair.gw


ID1 = struct.pack(">I", 1)
R = RenewalFrame


@pytest.mark.parametrize(
    ("ftype", "payload", "words"),
    [
        (R.RENEW_ISSUED, b"\x00\x01", "no request id"),
        (R.RENEW_ISSUED, ID1, "no certificate"),
        (R.RENEW_ISSUED, ID1 + b"\xff\xfe", "not ASCII"),
        (R.RENEW_ISSUED, ID1 + b"hello", "does not start with a certificate"),
        (R.RENEW_ISSUED, b"\x00\x00\x00\x00" + PEM, "request id 0"),
        (R.RENEW_REFUSED, ID1 + b"\x00", "no 16-bit code"),
        (R.RENEW_REFUSED, ID1 + b"\x00\x01\xc3", "not valid UTF-8"),
        (R.RENEW_HINT, b"", "no flags byte"),
        (R.RENEW_HINT, b"\x02why", "reserved flag bits"),
        (R.RENEW_HINT, b"\x00\xff", "not valid UTF-8"),
        (R.RENEW_REQUEST, ID1 + CSR, "invalid"),
    ],
)
def test_bad_frames_to_the_client_close_with_protocol_error(
    ftype: int, payload: bytes, words: str
) -> None:
    session = _client_frame(ftype, payload)
    assert sent_close(session)[0] == CloseCode.PROTOCOL_ERROR
    assert words in the_close(session).message


@pytest.mark.parametrize(
    ("ftype", "payload", "words"),
    [
        (R.RENEW_REQUEST, b"", "no request id"),
        (R.RENEW_REQUEST, ID1, "carries no CSR"),
        (R.RENEW_REQUEST, ID1 + b"\x04not-der", "not DER"),
        (R.RENEW_ISSUED, ID1 + PEM, "invalid"),
        (R.RENEW_REFUSED, ID1 + b"\x00\x01", "invalid"),
        (R.RENEW_HINT, b"\x00", "invalid"),
    ],
)
def test_bad_frames_to_the_gateway_close_with_protocol_error(
    ftype: int, payload: bytes, words: str
) -> None:
    session = _gateway_frame(ftype, payload)
    assert sent_close(session)[0] == CloseCode.PROTOCOL_ERROR
    assert words in the_close(session).message


def test_oversize_renewal_frames_are_refused_from_the_header() -> None:
    gw = _gateway_frame(R.RENEW_REQUEST, ID1 + b"\x30" + b"x" * CSR_MAX)
    assert the_close(gw).code == CloseCode.FRAME_TOO_LARGE
    cl = _client_frame(R.RENEW_ISSUED, ID1 + b"-" * (PEM_MAX + 1))
    assert the_close(cl).code == CloseCode.FRAME_TOO_LARGE


def test_renewal_needs_an_established_or_quarantined_session() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError, match="await_config"):
        pair.cl.request_renewal(CSR, pair.now)
    # A request before HELLO is the client's protocol error.
    pair.gw.receive_data(encode_frame(R.RENEW_REQUEST, ID1 + CSR), 0)
    close = the_close(pair.gw)
    assert close.code == CloseCode.PROTOCOL_ERROR and "await_hello" in close.message


def test_request_arguments_are_checked_locally() -> None:
    pair = _renewal_pair()
    with pytest.raises(LocalProtocolError, match="DER"):
        pair.cl.request_renewal(b"\x30" + b"x" * CSR_MAX, pair.now)
    with pytest.raises(LocalProtocolError, match="DER"):
        pair.cl.request_renewal(b"", pair.now)
    with pytest.raises(LocalProtocolError, match="only a client"):
        pair.gw.request_renewal(CSR, pair.now)
    with pytest.raises(LocalProtocolError, match="only a gateway"):
        pair.cl.send_renewed(1, PEM, pair.now)
    assert pair.cl.renewal_pending is None


def test_gateway_answers_only_the_open_request_and_is_a_no_op_once_closed() -> None:
    pair = _renewal_pair()
    with pytest.raises(LocalProtocolError, match="not the open one"):
        pair.gw.send_renewed(1, PEM, pair.now)
    pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    _requested(pair)
    with pytest.raises(LocalProtocolError, match="PEM"):
        pair.gw.send_renewed(1, b"not pem", pair.now)
    pair.gw.close(CloseCode.SHUTDOWN, "bye", pair.now)
    pair.gw.data_to_send()
    pair.gw.send_renewed(1, PEM, pair.now)  # the signer finished after the close
    pair.gw.refuse_renewal(1, RefusalCode.BUSY, "late", pair.now)
    pair.gw.send_renew_hint("late", pair.now)
    assert pair.gw.data_to_send() == b""


def test_renew_hint_reaches_an_established_client() -> None:
    pair = _renewal_pair()
    pair.gw.send_renew_hint("groups changed", pair.now)
    pair.pump()
    assert pair.cl_events == [RenewHint("groups changed", quarantined=False)]
    assert pair.cl.state is SessionState.ESTABLISHED


def test_renew_hint_before_the_tunnel_is_up_is_our_bug() -> None:
    pair = Pair()
    pair.pump()
    with pytest.raises(LocalProtocolError, match="await_config"):
        pair.gw.send_renew_hint("too early", pair.now)


def test_quarantined_hint_after_config_is_a_protocol_error() -> None:
    session = _client_frame(R.RENEW_HINT, b"\x01expired")
    assert "after its CONFIG" in the_close(session).message


def _quarantined(*, grace: float = 5.0, config_timeout: float = 2.0) -> Pair:
    pair = Pair(config_timeout=config_timeout)
    pair.pump()
    pair.gw_events.clear()
    pair.gw.quarantine(pair.now, pair.now + grace)
    pair.pump()
    return pair


def test_quarantine_admits_only_renewal_and_the_client_renews() -> None:
    pair = _quarantined()
    assert pair.gw.state is SessionState.QUARANTINED
    assert pair.cl.state is SessionState.QUARANTINED
    assert pair.cl_events == [RenewHint("certificate expired: renew now", quarantined=True)]
    assert pair.cl.tunnel_config is None
    rid = pair.cl.request_renewal(CSR, pair.now)
    pair.pump()
    assert _requested(pair).request_id == rid
    pair.gw.send_renewed(rid, PEM, pair.now)
    pair.pump()
    assert RenewalIssued(rid, PEM) in pair.cl_events
    # Packets are refused both ways, and CONFIG can no longer be sent.
    assert pair.gw.send_packets([b"\x45" * 40], pair.now) == 1
    assert pair.gw.counters.drops["quarantined"] == 1
    assert pair.cl.send_packets([b"\x45" * 40], pair.now) == 1
    with pytest.raises(LocalProtocolError, match="quarantined"):
        pair.gw.send_config(tunnel_config(), pair.now)


def test_quarantine_outlives_the_setup_timeout_and_closes_at_the_deadline() -> None:
    pair = _quarantined(grace=5.0, config_timeout=2.0)
    pair.step(int(5.0 / TICK) - 1)  # past config_timeout: PINGs keep both alive
    assert not pair.closed(pair.gw_events) and not pair.closed(pair.cl_events)
    assert pair.now == 5.0 - TICK
    pair.step()
    (close,) = pair.closed(pair.gw_events)
    assert close.code == CloseCode.POLICY and "grace period" in close.message
    (seen,) = pair.closed(pair.cl_events)
    assert seen.by_peer and seen.code == CloseCode.POLICY


def test_data_from_a_quarantined_client_is_a_protocol_error() -> None:
    pair = _quarantined()
    pair.gw.receive_data(encode_frame(FrameType.DATA, b"\x00\x00\x00\x00\x01E"), pair.now)
    close = the_close(pair.gw)
    assert close.code == CloseCode.PROTOCOL_ERROR and "quarantined" in close.message


def test_renew_hint_in_quarantine_keeps_the_flag() -> None:
    pair = _quarantined()
    pair.cl_events.clear()
    pair.gw.send_renew_hint("still expired", pair.now)
    pair.pump()
    assert pair.cl_events == [RenewHint("still expired", quarantined=True)]


def test_quarantine_only_after_hello() -> None:
    gw = Session(SessionConfig("gateway"), 0.0)
    with pytest.raises(LocalProtocolError, match="await_hello"):
        gw.quarantine(0.0, 5.0)
    pair = _renewal_pair()
    with pytest.raises(LocalProtocolError, match="established"):
        pair.gw.quarantine(0.0, 5.0)


def test_unknown_extensions_are_still_skipped() -> None:
    pair = _renewal_pair()
    pair.cl.receive_data(encode_frame(0x94, b"future"), pair.now)
    assert pair.cl.state is SessionState.ESTABLISHED
    assert pair.cl.counters.drops["extension"] == 1
