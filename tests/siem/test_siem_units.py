"""The parts of audit to SIEM without a server: the line and the RFC 5424 message, the file sink under
rotation, the position file, and where a shipper resumes (a real SQLite store and the real file sink)."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.domain.audit_chain import GENESIS, AuditRecord, record_hash
from kms.service.audit_shipping import AuditShipper
from kms.siem.file_sink import FileSink
from kms.siem.records import audit_line, octet_counted, syslog_message
from kms.storage import audit_repository, migrate
from kms.storage.database import Database
from kms.storage.siem_positions import PositionError, PositionStore

# RFC 5424 section 6: HEADER SP STRUCTURED-DATA SP MSG (with this shipper's NILVALUE structured data).
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>[\x21-\x7e]{1,255})"
    r" (?P<app>[\x21-\x7e]{1,48}) (?P<proc>[\x21-\x7e]{1,128}) (?P<msgid>[\x21-\x7e]{1,32}) - (?P<msg>.*)$"
)


def _records(n: int, action: str = "keys.reserved") -> list[AuditRecord]:
    out, prev = [], GENESIS.hex()
    for seq in range(1, n + 1):
        body = {
            "seq": seq,
            "at": "2026-12-05T17:00:00.123456+00:00",
            "actor": "sae:SAE-M",
            "action": action,
            "subject": "SAE-M->SAE-S",
            "data": {"n": seq, "note": "caf\u00e9 \u2713\n"},
        }
        digest = record_hash(body, bytes.fromhex(prev)).hex()
        out.append(
            AuditRecord(seq, body["at"], body["actor"], action, body["subject"], body["data"], prev, digest)
        )  # type: ignore[arg-type]
        prev = digest
    return out


def test_a_line_holds_the_chained_record_and_verifies() -> None:
    first, second = _records(2)
    line = audit_line(second, "KME-A")
    assert line.isascii() and "\n" not in line
    obj = json.loads(line)
    assert obj["format"] == "qkms-audit/1" and obj["kme"] == "KME-A" and obj["prev_hash"] == first.hash
    body = {k: obj[k] for k in ("seq", "at", "actor", "action", "subject", "data")}
    assert record_hash(body, bytes.fromhex(obj["prev_hash"])).hex() == obj["hash"] == second.hash


@pytest.mark.parametrize(
    ("action", "severity"), [("keys.reserved", 5), ("access.denied", 4), ("link.alarm", 4)]
)
def test_the_syslog_message_is_rfc5424_and_octet_counted(action: str, severity: int) -> None:
    (record,) = _records(1, action)
    message = syslog_message(record, "KME A/\u00e9", facility=13, hostname="kme host")
    match = RFC5424.match(message.decode("ascii"))
    assert match is not None, message
    assert int(match["pri"]) == 13 * 8 + severity
    assert match["ts"] == "2026-12-05T17:00:00.123456Z"
    assert (match["host"], match["app"], match["proc"], match["msgid"]) == (
        "kme_host",
        "qkms",
        "KME_A/_",
        action,
    )
    assert json.loads(match["msg"]) == json.loads(audit_line(record, "KME A/\u00e9"))
    framed = octet_counted(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(message) and rest == message


def test_the_file_sink_follows_rotation_and_deletion(tmp_path: Path) -> None:
    path = tmp_path / "siem" / "audit.jsonl"
    sink = FileSink(path, "KME-A", fsync=True)
    records = _records(6)
    sink.send(records[:2])
    assert sink.delivered() == (2, records[1].hash) and sink.delivered() is None
    path.rename(path.with_name("audit.jsonl.1"))
    sink.send(records[2:4])
    path.unlink()
    sink.send(records[4:])
    rotated = [json.loads(x)["seq"] for x in path.with_name("audit.jsonl.1").read_text().splitlines()]
    assert rotated == [1, 2]
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [5, 6]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sink.reset()


def test_positions_are_replaced_whole_and_owner_only(tmp_path: Path) -> None:
    store = PositionStore(tmp_path / "state", "KME-A")
    assert store.load("syslog") is None
    store.save("syslog", 41, "ab" * 48)
    saved = store.save("syslog", 42, "cd" * 48)
    assert store.load("syslog") == saved and saved.seq == 42
    assert stat.S_IMODE(store.path("syslog").stat().st_mode) == 0o600
    assert list(store.directory.iterdir()) == [store.path("syslog")]
    store.path("syslog").write_text("{torn")
    with pytest.raises(PositionError, match="unreadable"):
        store.load("syslog")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    migrate.upgrade(url)
    db = Database(url)
    yield db
    db.engine.dispose()


def _append(db: Database, n: int) -> None:
    with db.write() as conn:
        audit_repository.append(
            conn, datetime.now(UTC), [("test", "keys.reserved", "s", {"i": i}) for i in range(n)]
        )


def _ship_all(db: Database, tmp_path: Path) -> list[int]:
    """A new shipper (as after a restart) over the real file sink; returns the seqs it wrote."""
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    shipper = AuditShipper(db, FileSink(out, "KME-A"), PositionStore(tmp_path / "state", "KME-A"), 3, 2)
    while shipper.step():
        pass
    shipper.sink.reset()
    return [json.loads(x)["seq"] for x in out.read_text().splitlines()] if out.exists() else []


def test_a_shipper_resumes_after_its_position_and_rewinds_when_the_store_changed(
    store: Database, tmp_path: Path
) -> None:
    _append(store, 5)
    assert _ship_all(store, tmp_path) == [1, 2, 3, 4, 5]  # in batches of 3
    assert _ship_all(store, tmp_path) == []
    _append(store, 2)
    assert _ship_all(store, tmp_path) == [6, 7]
    positions = PositionStore(tmp_path / "state", "KME-A")
    # A store restored to an earlier state holds fewer records than were shipped: resume at its head.
    positions.save("file", 50, "00" * 48)
    assert _ship_all(store, tmp_path) == []
    assert positions.load("file").seq == 7  # type: ignore[union-attr]
    _append(store, 1)
    assert _ship_all(store, tmp_path) == [8]
    # The record at the position is another one (history forked before it): send everything again.
    positions.save("file", 8, "11" * 48)
    assert _ship_all(store, tmp_path) == list(range(1, 9))
