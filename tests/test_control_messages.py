"""Control codec: round trips, every error code, result shapes, garbage lines."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnd.control.protocol import (
    MAX_LINE,
    Command,
    ControlError,
    ErrorCode,
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
    ReloadReport,
    StatusInfo,
    peers_from_json,
    peers_to_json,
)

CERT = CertSummary("gw1", "1a2b", "ab" * 32, "2027-06-01T12:00:00+00:00", 365)
CA = CertSummary("test-ca", "77", "cd" * 32, "2030-01-01T00:00:00+00:00", 1300)
STATUS = StatusInfo(
    role="gateway",
    version="0.1.0",
    pid=42,
    uptime_s=3723.5,
    listen="0.0.0.0:4443",
    tun="vpn0",
    sessions=2,
    handshakes={"accepted": 5, "refused_revoked": 1},
    drops={"spoofed_source": 3},
    cert=CERT,
    ca=CA,
    crl=CrlSummary(4, "2026-06-08T12:00:00+00:00", 604800.0, stale=False),
    policy_rules=3,
)
PEER = PeerInfo(
    name="alice",
    serial="c0ffee",
    fingerprint="ef" * 32,
    addresses=["10.77.0.2"],
    groups=["dev", "ops"],
    remote="192.0.2.1:50000",
    connected_since="2026-06-01T12:00:00+00:00",
    bytes_in=1000,
    bytes_out=2000,
    packets_in=10,
    packets_out=20,
    drops={"spoofed_source": 1},
    cert_not_after="2026-07-01T12:00:00+00:00",
    cert_days_left=30,
)


def request_line(doc: object) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def refused(line: bytes | str) -> ControlError:
    with pytest.raises(ControlError) as info:
        decode_request(line)
    return info.value


# --- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req",
    [
        Request(1, Command.PING),
        Request(2, Command.STATUS),
        Request(3, Command.PEERS),
        Request(4, Command.KICK, {"name": "alice", "reason": "left the company"}),
        Request(5, Command.KICK, {"name": "bob"}),
        Request(2**40, Command.RELOAD),
    ],
)
def test_request_round_trip(req: Request) -> None:
    line = encode_request(req)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == req


def test_kick_args_default_reason() -> None:
    assert kick_args(
        decode_request(request_line({"id": 1, "cmd": "kick", "args": {"name": "a"}}))
    ) == ("a", "")


def test_args_may_be_omitted() -> None:
    assert decode_request(b'{"id": 7, "cmd": "status"}') == Request(7, Command.STATUS, {})


@pytest.mark.parametrize(
    ("line", "message_part"),
    [
        (b"", "not a JSON object line"),
        (b"hello\n", "not a JSON object line"),
        (b"\xff\xfe\n", "not a JSON object line"),
        (b'{"id": NaN, "cmd": "status"}', "not a JSON object line"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"status"', "must be a JSON object"),
        (b'{"cmd": "status"}', "'id' must be an integer"),
        (b'{"id": "1", "cmd": "status"}', "'id' must be an integer"),
        (b'{"id": true, "cmd": "status"}', "'id' must be an integer"),
        (b'{"id": 1.5, "cmd": "status"}', "'id' must be an integer"),
        (b'{"id": 1}', "'cmd' must be a string"),
        (b'{"id": 1, "cmd": 5}', "'cmd' must be a string"),
        (b'{"id": 1, "cmd": "status", "args": []}', "'args' must be an object"),
        (b'{"id": 1, "cmd": "status", "extra": 1}', "unknown request field 'extra'"),
        (b'{"id": 1, "cmd": "status", "args": {"x": 1}}', "status takes no argument 'x'"),
        (b'{"id": 1, "cmd": "kick", "args": {}}', "kick needs 'name'"),
        (b'{"id": 1, "cmd": "kick", "args": {"name": ""}}', "kick needs 'name'"),
        (b'{"id": 1, "cmd": "kick", "args": {"name": 3}}', "kick needs 'name'"),
        (b'{"id": 1, "cmd": "kick", "args": {"name": "a", "reason": 1}}', "'reason' must be"),
        (b'{"id": 1, "cmd": "kick", "args": {"name": "a\\nb"}}', "printable"),
        (b'{"id": 1, "cmd": "kick", "args": {"name": "a", "reason": "x\\r\\ny"}}', "printable"),
    ],
)
def test_bad_request(line: bytes, message_part: str) -> None:
    err = refused(line)
    assert err.code is ErrorCode.BAD_REQUEST
    assert message_part in err.message
    assert "\n" not in str(err)


def test_bad_request_keeps_the_id_when_it_has_one() -> None:
    assert refused(b'{"id": 9, "cmd": "kick", "args": {}}').request_id == 9
    assert refused(b'{"cmd": "status"}').request_id is None


def test_unknown_command() -> None:
    err = refused(b'{"id": 3, "cmd": "shutdown"}')
    assert err.code is ErrorCode.UNKNOWN_COMMAND
    assert err.request_id == 3
    assert "'shutdown'" in err.message and "status" in err.message


def test_too_large() -> None:
    pad = "x" * MAX_LINE
    err = refused(request_line({"id": 1, "cmd": "status", "pad": pad}))
    assert err.code is ErrorCode.TOO_LARGE
    # Exactly at the limit is still parsed (and refused for its content instead).
    body = b'{"id":1,"cmd":"ping","p":"' + b"y" * (MAX_LINE - 28) + b'"}'
    assert len(body) == MAX_LINE
    assert refused(body + b"\n").code is ErrorCode.BAD_REQUEST


def test_overlong_kick_fields() -> None:
    assert refused(request_line({"id": 1, "cmd": "kick", "args": {"name": "a" * 65}})).code == (
        ErrorCode.BAD_REQUEST
    )
    line = request_line({"id": 1, "cmd": "kick", "args": {"name": "a", "reason": "r" * 201}})
    assert "at most 200" in refused(line).message


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_control_error(line: bytes) -> None:
    try:
        decode_request(line)
    except ControlError as err:
        assert err.code in ErrorCode
        assert "\n" not in str(err)


@given(st.text(max_size=300))
def test_random_text_only_raises_control_error(line: str) -> None:
    try:
        decode_request(line)
    except ControlError as err:
        assert "\n" not in str(err)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(["id", "cmd", "args", "x"]) | st.text(max_size=5), json_values, max_size=4
    )
)
def test_random_objects_only_raise_control_error(doc: dict[str, Any]) -> None:
    try:
        req = decode_request(json.dumps(doc))
    except ControlError:
        return
    assert isinstance(req.id, int) and req.cmd in Command


# --- responses ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_round_trips(code: ErrorCode) -> None:
    resp = Response.failure(4, ControlError(code, "it went\nwrong"))
    line = encode_response(resp)
    doc = json.loads(line)
    assert doc == {"id": 4, "ok": False, "error": {"code": code.value, "message": "it went wrong"}}
    back = decode_response(line)
    assert not back.ok and back.id == 4
    assert back.error is not None
    assert back.error.code is code and back.error.message == "it went wrong"


def test_success_round_trip_and_null_id() -> None:
    line = encode_response(Response.success(None, {"pong": True}))
    back = decode_response(line)
    assert back.ok and back.id is None and back.result == {"pong": True}


def test_unknown_error_code_from_a_newer_server_is_kept_as_text() -> None:
    back = decode_response(b'{"id":1,"ok":false,"error":{"code":"quota","message":"m"}}')
    assert back.error is not None
    assert back.error.code is ErrorCode.INTERNAL and back.error.message == "quota: m"


@pytest.mark.parametrize(
    "line",
    [
        b"nope",
        b"[]",
        b'{"id":"1","ok":true,"result":{}}',
        b'{"id":1,"ok":"yes"}',
        b'{"id":1,"ok":true,"result":[]}',
        b'{"id":1,"ok":false}',
        b'{"id":1,"ok":false,"error":{"code":"busy"}}',
    ],
)
def test_malformed_response(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_response(line)


# --- result shapes ------------------------------------------------------------------------


def test_status_round_trip_through_json_text() -> None:
    doc = json.loads(json.dumps(STATUS.to_json()))
    assert StatusInfo.from_json(doc) == STATUS
    no_crl = dataclasses.replace(STATUS, crl=None)
    assert no_crl.to_json()["crl"] is None
    assert StatusInfo.from_json(json.loads(json.dumps(no_crl.to_json()))) == no_crl


def test_peer_kick_reload_round_trip() -> None:
    assert peers_from_json(json.loads(json.dumps(peers_to_json([PEER, PEER])))) == [PEER, PEER]
    assert KickResult.from_json(KickResult("alice", 2).to_json()) == KickResult("alice", 2)
    report = ReloadReport(["policy: 3 rules -> 2 rules"], ["bob"], [])
    assert ReloadReport.from_json(json.loads(json.dumps(report.to_json()))) == report


@pytest.mark.parametrize(
    ("mutate", "message_part"),
    [
        (lambda d: d.pop("pid"), "lacks 'pid'"),
        (lambda d: d.update(pid="42"), "status.pid is not an integer"),
        (lambda d: d.update(pid=True), "status.pid is not an integer"),
        (lambda d: d.update(uptime_s="long"), "status.uptime_s is not a number"),
        (lambda d: d.update(handshakes={"accepted": "5"}), "integer counts"),
        (lambda d: d.update(cert=[]), "status.cert is not an object"),
        (lambda d: d["cert"].pop("days_left"), "status.cert lacks 'days_left'"),
        (lambda d: d["crl"].update(stale=1), "status.crl.stale is not true or false"),
    ],
)
def test_status_shape_errors(mutate: Any, message_part: str) -> None:
    doc = json.loads(json.dumps(STATUS.to_json()))
    mutate(doc)
    with pytest.raises(ProtocolError, match=message_part):
        StatusInfo.from_json(doc)


def test_peer_shape_errors() -> None:
    with pytest.raises(ProtocolError, match=r"result\.peers is not a list"):
        peers_from_json({"peers": {}})
    doc = PEER.to_json()
    doc["addresses"] = "10.77.0.2"
    with pytest.raises(ProtocolError, match=r"peers\[0\].addresses is not a list of strings"):
        peers_from_json({"peers": [doc]})


# --- the codec: wire bytes pinned, round trips, malformed fields ------------------------

# The exact reply lines of the hand-written codec this one replaced: scripts parse them.
GOLDEN = [
    (
        b'{"id":7,"ok":true,"result":{"role":"gateway","version":"0.1.0","pid":42,"uptime_s":3'
        b'723.5,"listen":"0.0.0.0:4443","tun":"vpn0","sessions":2,"handshakes":{"accepted":5,"'
        b'refused_revoked":1},"drops":{"spoofed_source":3},"cert":{"name":"gw1","serial":"1a2b'
        b'","fingerprint":"abababababababababababababababababababababababababababababababab","'
        b'not_after":"2027-06-01T12:00:00+00:00","days_left":365},"ca":{"name":"test-ca","seri'
        b'al":"77","fingerprint":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd'
        b'cdcd","not_after":"2030-01-01T00:00:00+00:00","days_left":1300},"crl":{"number":4,"n'
        b'ext_update":"2026-06-08T12:00:00+00:00","seconds_left":604800.0,"stale":false},"poli'
        b'cy_rules":3}}\n'
    ),
    (
        b'{"id":7,"ok":true,"result":{"role":"gateway","version":"0.1.0","pid":42,"uptime_s":3'
        b'723.5,"listen":"0.0.0.0:4443","tun":"vpn0","sessions":2,"handshakes":{"accepted":5,"'
        b'refused_revoked":1},"drops":{"spoofed_source":3},"cert":{"name":"gw1","serial":"1a2b'
        b'","fingerprint":"abababababababababababababababababababababababababababababababab","'
        b'not_after":"2027-06-01T12:00:00+00:00","days_left":365},"ca":{"name":"test-ca","seri'
        b'al":"77","fingerprint":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd'
        b'cdcd","not_after":"2030-01-01T00:00:00+00:00","days_left":1300},"crl":null,"policy_r'
        b'ules":3}}\n'
    ),
    (
        b'{"id":7,"ok":true,"result":{"peers":[{"name":"alice","serial":"c0ffee","fingerprint"'
        b':"efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef","addresses":["10'
        b'.77.0.2"],"groups":["dev","ops"],"remote":"192.0.2.1:50000","connected_since":"2026-'
        b'06-01T12:00:00+00:00","bytes_in":1000,"bytes_out":2000,"packets_in":10,"packets_out"'
        b':20,"drops":{"spoofed_source":1},"cert_not_after":"2026-07-01T12:00:00+00:00","cert_'
        b'days_left":30}]}}\n'
    ),
    (b'{"id":7,"ok":true,"result":{"name":"alice","closed":2}}\n'),
    (b'{"id":7,"ok":true,"result":{"changed":["a"],"closed":["b"],"errors":[]}}\n'),
]


def test_reply_bytes_are_unchanged() -> None:
    results = [
        STATUS.to_json(),
        dataclasses.replace(STATUS, crl=None).to_json(),
        peers_to_json([PEER]),
        KickResult("alice", 2).to_json(),
        ReloadReport(["a"], ["b"], []).to_json(),
    ]
    assert [encode_response(Response.success(7, r)) for r in results] == GOLDEN


texts = st.text(max_size=12)
counts = st.dictionaries(texts, st.integers(-(2**63), 2**63))
finite = st.floats(allow_nan=False, allow_infinity=False)
certs = st.builds(CertSummary, texts, texts, texts, texts, st.integers())
statuses = st.builds(
    StatusInfo,
    role=texts,
    version=texts,
    pid=st.integers(),
    uptime_s=finite,
    listen=texts,
    tun=texts,
    sessions=st.integers(),
    handshakes=counts,
    drops=counts,
    cert=certs,
    ca=certs,
    crl=st.none() | st.builds(CrlSummary, st.integers(), texts, finite, st.booleans()),
    policy_rules=st.integers(),
)
peers = st.builds(
    PeerInfo,
    name=texts,
    serial=texts,
    fingerprint=texts,
    addresses=st.lists(texts, max_size=3),
    groups=st.lists(texts, max_size=3),
    remote=texts,
    connected_since=texts,
    bytes_in=st.integers(min_value=0),
    bytes_out=st.integers(min_value=0),
    packets_in=st.integers(min_value=0),
    packets_out=st.integers(min_value=0),
    drops=counts,
    cert_not_after=texts,
    cert_days_left=st.integers(),
)


def over_the_wire(result: dict[str, Any]) -> dict[str, Any]:
    reply = decode_response(encode_response(Response.success(1, result)))
    assert reply.ok and reply.result is not None
    return reply.result


@given(statuses)
def test_status_round_trips_over_the_wire(status: StatusInfo) -> None:
    assert StatusInfo.from_json(over_the_wire(status.to_json())) == status


@given(st.lists(peers, max_size=3))
def test_peers_round_trip_over_the_wire(listed: list[PeerInfo]) -> None:
    assert peers_from_json(over_the_wire(peers_to_json(listed))) == listed


@given(st.builds(KickResult, texts, st.integers()), st.lists(texts, max_size=3))
def test_kick_and_reload_round_trip_over_the_wire(kick: KickResult, lines: list[str]) -> None:
    assert KickResult.from_json(over_the_wire(kick.to_json())) == kick
    report = ReloadReport(lines, lines[:1], lines[1:])
    assert ReloadReport.from_json(over_the_wire(report.to_json())) == report


@pytest.mark.parametrize(
    ("shape", "key", "value", "message"),
    [
        (KickResult, "name", 7, r"^kick\.name is not a string$"),
        (KickResult, "closed", 2.0, r"^kick\.closed is not an integer$"),
        (KickResult, "closed", None, r"^kick\.closed is not an integer$"),
        (ReloadReport, "changed", ["a", 1], r"^reload\.changed is not a list of strings$"),
        (ReloadReport, "errors", "oops", r"^reload\.errors is not a list of strings$"),
        (StatusInfo, "uptime_s", 1e400, r"^status\.uptime_s is not a finite number$"),
        (StatusInfo, "drops", {"x": True}, r"^status\.drops is not an object of integer counts$"),
        (StatusInfo, "crl", "none", r"^status\.crl is not an object$"),
        (PeerInfo, "groups", {"dev": 1}, r"^peer\.groups is not a list of strings$"),
    ],
)
def test_a_malformed_field_is_refused_by_name(
    shape: Any, key: str, value: object, message: str
) -> None:
    sample = {KickResult: KickResult("alice", 1), ReloadReport: ReloadReport(), StatusInfo: STATUS}
    doc = dict((sample.get(shape) or PEER).to_json())
    doc[key] = value
    with pytest.raises(ProtocolError, match=message):
        shape.from_json(doc)


def test_an_absent_optional_field_is_none_but_a_required_one_is_refused() -> None:
    doc = STATUS.to_json()
    del doc["crl"]
    assert StatusInfo.from_json(doc) == dataclasses.replace(STATUS, crl=None)
    with pytest.raises(ProtocolError, match=r"^reload lacks 'closed'$"):
        ReloadReport.from_json({"changed": [], "errors": []})


def test_keys_a_newer_daemon_adds_are_ignored() -> None:
    assert KickResult.from_json({"name": "a", "closed": 0, "later": [1]}) == KickResult("a", 0)


@given(json_values)
def test_random_results_only_raise_protocol_error(doc: object) -> None:
    for shape in (StatusInfo, PeerInfo, KickResult, ReloadReport):
        with contextlib.suppress(ProtocolError):
            shape.from_json(doc)
    with contextlib.suppress(ProtocolError):
        peers_from_json({"peers": doc})
