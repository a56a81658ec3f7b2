"""The syslog sink against a real rsyslogd, without a KME: plain TCP, and TLS refusing a receiver whose
certificate does not carry the name asked for or comes from another CA."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.crypto import pki
from kms.domain.audit_chain import GENESIS, AuditRecord, record_hash
from kms.lab.launcher import free_port
from kms.siem.sink import SinkError
from kms.siem.syslog_sink import SyslogSink, SyslogTarget
from tests.siem.rsyslog import Rsyslog
from tests.siem.site import check_stream, require_rsyslog


def _records(n: int) -> list[AuditRecord]:
    out, prev = [], GENESIS.hex()
    for seq in range(1, n + 1):
        body = {
            "seq": seq,
            "at": "2026-12-05T17:00:00+00:00",
            "actor": "a",
            "action": "keys.reserved",
            "subject": "s",
            "data": {"i": seq},
        }
        digest = record_hash(body, bytes.fromhex(prev)).hex()
        out.append(AuditRecord(seq, str(body["at"]), "a", "keys.reserved", "s", {"i": seq}, prev, digest))
        prev = digest
    return out


def _target(port: int, tls: ssl.SSLContext | None, name: str = "127.0.0.1") -> SyslogTarget:
    return SyslogTarget("127.0.0.1", port, tls, name, 13, "test-host", 5.0, 0.2)


def _deliver(sink: SyslogSink, timeout: float = 20.0) -> tuple[int, str] | None:
    deadline, last = time.monotonic() + timeout, None
    while sink.in_flight() and time.monotonic() < deadline:
        last = sink.delivered() or last
        time.sleep(0.05)
    return last


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    require_rsyslog()
    ca = pki.create_ca("siem test CA")
    pki.write_credential(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    server = pki.issue_server_cert(ca, "receiver", hostnames=["siem.test"], ip_addresses=["127.0.0.1"])
    pki.write_credential(server, tmp_path / "server.pem", tmp_path / "server.key")
    pki.write_credential(pki.create_ca("another CA"), tmp_path / "other-ca.pem", tmp_path / "other-ca.key")
    return tmp_path


@pytest.fixture
def tls_receiver(pki_dir: Path) -> Iterator[Rsyslog]:
    receiver = Rsyslog(
        pki_dir / "rs-tls", free_port(), (pki_dir / "ca.pem", pki_dir / "server.pem", pki_dir / "server.key")
    )
    receiver.start()
    yield receiver
    receiver.stop()


def test_plain_tcp_delivers_every_record_in_order(tmp_path: Path) -> None:
    require_rsyslog()
    receiver = Rsyslog(tmp_path / "rs", free_port())
    receiver.start()
    try:
        sink = SyslogSink(_target(receiver.port, None), "KME-A")
        records = _records(300)
        for i in range(0, 300, 100):
            sink.send(records[i : i + 100])
        assert _deliver(sink) == (300, records[-1].hash)
        deadline = time.monotonic() + 10
        while len(receiver.lines()) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check_stream(receiver.lines(), "KME-A") == (300, 0)
        sink.reset()
    finally:
        receiver.stop()


def test_tls_checks_the_receivers_name_and_ca(pki_dir: Path, tls_receiver: Rsyslog) -> None:
    good = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    sink = SyslogSink(_target(tls_receiver.port, good, "siem.test"), "KME-A")
    sink.send(_records(3))
    assert _deliver(sink) is not None
    sink.reset()
    for context, name in (
        (good, "other.test"),
        (ssl.create_default_context(cafile=str(pki_dir / "other-ca.pem")), "siem.test"),
    ):
        sink = SyslogSink(_target(tls_receiver.port, context, name), "KME-A")
        with pytest.raises(SinkError, match="TLS failed: CERTIFICATE_VERIFY_FAILED"):
            sink.send(_records(1))
        assert sink.in_flight() == 0
