"""Attack matrix, names: `/`, `..`, newlines, shell metacharacters, NUL and 200-character
names wherever a name becomes a path, an interface or a log line.

Every refusal is one line on stderr, and nothing is written anywhere: the whole
temporary tree is compared before and after.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from attack_fixtures import Hostile, build_hostile, probe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from inprocess_fixtures import DAY, REAL_NOW, World

from vpnctl import cli as vpnctl
from vpnd import cli as vpnd_cli
from vpnd.config import ConfigError, parse_config
from vpnd.proto.close import describe_close
from vpnd.proto.frames import decode_close, encode_close
from vpnd.telemetry.logsetup import PeerLogger, TextFormatter, setup_logging

HOSTILE_NAMES = [
    "/",
    "..",
    "../../etc/cron.d/x",
    "a/b",
    "a\nb",
    "a\rb",
    "$(id)",
    "`id`",
    "a;rm -rf ~",
    "a|b",
    "a&b",
    "a b",
    "*",
    "a\x00b",
    "x" * 200,
    "\u00e9",
]
IDS = [repr(n)[1:-1][:24] for n in HOSTILE_NAMES]
pytestmark = pytest.mark.filterwarnings("ignore:Attribute.s length:UserWarning")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def call(main: object, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)  # type: ignore[operator]
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, prog: str) -> None:
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: "), err


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(vpnctl.ENV_PASSPHRASE_FILE, raising=False)
    path = tmp_path / "pki"
    code, _, err = call(
        vpnctl.main, "--pki", str(path), "ca", "init", "--name", "t", "--network", "10.8.0.0/24"
    )
    assert code == 0, err
    (tmp_path / "out").mkdir()
    code, _, err = call(
        vpnctl.main, "--pki", str(path), "issue", "alice", "--out", str(tmp_path / "out")
    )
    assert code == 0, err
    monkeypatch.setenv(vpnctl.ENV_PKI, str(path))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=IDS)
def test_vpnctl_issue_and_revoke_refuse_hostile_names(pki: Path, name: str) -> None:
    root = pki.parent
    before = tree(root)
    code, _, err = call(vpnctl.main, "issue", name, "--out", str(root / "out"))
    assert code == 2, err
    one_line(err, "vpnctl")
    code, _, err = call(vpnctl.main, "revoke", name)
    assert code in (1, 2), err
    one_line(err, "vpnctl")
    assert tree(root) == before  # nothing written, the CRL untouched


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=IDS)
def test_vpnctl_sign_refuses_a_csr_with_a_hostile_cn(pki: Path, name: str) -> None:
    root = pki.parent
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name, _validate=False)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    (root / "x.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    before = tree(root)
    code, _, err = call(vpnctl.main, "sign", str(root / "x.csr"), "--out", str(root / "x.pem"))
    assert code == 1, err
    one_line(err, "vpnctl")
    assert tree(root) == before


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=IDS)
def test_vpnd_keygen_refuses_hostile_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = call(vpnd_cli.main, "keygen", "--name", name, "--out-key", "k", "--out-csr", "c")
    assert code == 2, err
    one_line(err, "vpnd")
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=IDS)
def test_tun_name_refuses_hostile_names(tmp_path: Path, name: str) -> None:
    doc = {
        "mode": "client",
        "server": "gw.example.net:4443",
        "server_name": "gw.example.net",
        "pki": {"ca": "ca.pem", "cert": "c.pem", "key": "c.key"},
        "tun": {"name": name},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="client.yaml", base_dir=tmp_path, check_files=False)
    assert info.value.path == "tun.name"
    assert "\n" not in str(info.value) and "\r" not in str(info.value)


# ---- logs ----------------------------------------------------------------------------

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\S+: ")
FORGERIES = [
    "alice\n2026-01-01 00:00:00,000 CRITICAL vpnd.audit: forged",
    "alice\r\nforged",
    "alice\x1b[2K\x1b[1Gforged",  # a terminal escape that erases the real line
    "alice\u2028forged",
    "alice\x85forged",
    "alice\x0bforged",
]


@pytest.mark.parametrize("text", FORGERIES, ids=[repr(t)[1:12] for t in FORGERIES])
def test_text_log_lines_cannot_be_forged(text: str) -> None:
    record = logging.LogRecord("vpnd.audit", logging.WARNING, "x", 1, "refused %s", (text,), None)
    line = TextFormatter().format(record)
    assert line.isprintable(), repr(line)  # so no viewer can see a second line
    assert len(line.splitlines()) == 1


def test_a_peer_close_message_is_printable_before_it_is_logged() -> None:
    code, message = decode_close(memoryview(encode_close(10, FORGERIES[0] + FORGERIES[2])))
    assert message.isprintable()
    assert describe_close(code, message).isprintable()


async def test_a_refused_certificate_cn_cannot_forge_gateway_log_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    try:
        w = World(tmp_path, tls=True)  # OpenSSL may refuse some of them first
        await w.start_gateway()
        try:
            for i, cn in enumerate(FORGERIES):
                leaf = build_hostile(
                    w.ca,
                    Hostile("cn", "bad_name", {"name": cn, "addresses": ["10.8.0.5"]}),
                    not_before=REAL_NOW - DAY,
                    not_after=REAL_NOW + 30 * DAY,
                )
                cert, key = leaf.write(tmp_path, f"forger{i}")
                verdict = await probe(w.port, w.ca_path, cert, key)
                assert verdict.kind in {"close", "alert"}, verdict
        finally:
            await w.close()
    finally:
        logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert "refused" in text
    for line in text.split("\n")[:-1]:
        assert LINE.match(line), repr(line)
        assert line.isprintable(), repr(line)
        assert "CRITICAL" not in line.split(": ", 1)[0]


def test_peer_logger_prefix_is_escaped_too() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("vpnd.test_attack_names")
    logger.addHandler(handler)
    try:
        PeerLogger(logger, {"peer": "bob\nforged", "fingerprint": "ab" * 32}).warning("hi")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().count("\n") == 1
