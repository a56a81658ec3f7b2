"""The anchor file and the checkpoint writer: durable appends, torn writes, catching up, refusing."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from kms.audit.anchors import AnchorFile, AnchorFileError, read_anchors
from kms.audit.integrity import AuditIntegrityError
from kms.config import KmsSettings
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.service.audit_checkpoints import CheckpointWriter, anchor_file, tail_window
from kms.service.audit_startup import check_audit_at_start


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    res = init_workdir(tmp_path / "kme", "KME-U", ["A", "B"], link_source="random")
    runtime = build_runtime(KmsSettings.load(res.config_path))
    try:
        yield runtime
    finally:
        runtime.close()


def _writer(rt: Runtime, anchored: bool = True) -> CheckpointWriter:
    return CheckpointWriter(
        rt.db, rt.identity, rt.settings.kme.id, anchor_file(rt.settings) if anchored else None
    )


def _traffic(rt: Runtime) -> None:
    rt.make_filler().fill_once()
    rt.service.get_keys(rt.registry.get("A"), "B")  # type: ignore[arg-type]


def test_anchors_are_appended_in_order_owner_only_and_outside_the_database(rt: Runtime) -> None:
    writer = _writer(rt)
    for _ in range(3):
        _traffic(rt)
        assert writer.write() is not None
    assert writer.write() is None  # nothing new to sign
    path = anchor_file(rt.settings).path
    anchors = read_anchors(path)
    assert [a.number for a in anchors] == [1, 2, 3] and anchors[0].from_seq == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    db_file = Path(rt.settings.database.url.removeprefix("sqlite:///"))
    assert path.parent != db_file.parent  # its own directory, not the database's


def test_a_torn_last_line_is_dropped_and_the_next_anchor_follows(rt: Runtime) -> None:
    writer = _writer(rt)
    _traffic(rt)
    writer.write()
    path = anchor_file(rt.settings).path
    with path.open("ab") as fh:
        fh.write(b'{"number": 2, "from_se')  # a crash mid-append
    assert [a.number for a in read_anchors(path)] == [1]
    _traffic(rt)
    assert writer.write() is not None
    assert [a.number for a in read_anchors(path)] == [1, 2]


def test_appending_out_of_sequence_is_refused(tmp_path: Path) -> None:
    book_file = AnchorFile(tmp_path / "a" / "K.anchors.jsonl")
    with book_file.locked() as book, pytest.raises(AnchorFileError):
        from kms.audit.anchors import Anchor

        book.append([Anchor(2, 1, 1, "00", 1, "00", "t")])


def test_a_checkpoint_committed_but_not_anchored_is_anchored_by_the_next_writer(rt: Runtime) -> None:
    _traffic(rt)
    _writer(rt).write()
    _traffic(rt)
    assert _writer(rt, anchored=False).write() is not None  # as if the process died before anchoring
    path = anchor_file(rt.settings).path
    assert [a.number for a in read_anchors(path)] == [1]
    check_audit_at_start(rt.db, rt.identity, "KME-U", anchor_file(rt.settings), tail_window(rt.settings))
    assert [a.number for a in read_anchors(path)] == [1, 2]


def test_the_writer_refuses_to_sign_over_a_database_rewritten_under_it(rt: Runtime) -> None:
    writer = _writer(rt)
    for _ in range(2):
        _traffic(rt)
        writer.write()
    with rt.db.write() as conn:
        conn.execute(text("DELETE FROM audit_checkpoints WHERE number = 2"))
    _traffic(rt)
    with pytest.raises(AuditIntegrityError, match=r"checkpoint #2 .* is anchored"):
        writer.write()
    with rt.db.read() as conn:
        assert conn.execute(text("SELECT MAX(number) FROM audit_checkpoints")).scalar() == 1


def test_the_writer_refuses_when_the_pinned_record_was_rewritten(rt: Runtime) -> None:
    writer = _writer(rt)
    _traffic(rt)
    cp = writer.write()
    assert cp is not None
    with rt.db.write() as conn:
        conn.execute(
            text("UPDATE audit_records SET hash = :h WHERE seq = :s"), {"h": "ef" * 48, "s": cp.upto_seq}
        )
    _traffic(rt)
    with pytest.raises(AuditIntegrityError, match=f"record seq {cp.upto_seq} no longer matches"):
        writer.write()


def test_verify_of_a_live_kme_never_calls_a_checkpoint_signed_meanwhile_missing(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running KME commits a checkpoint and then anchors it. ``audit verify`` once read the
    database and then the anchor file, so a checkpoint signed in between was anchored but not in its
    snapshot: "missing (deleted)" on an untouched KME (seen in CI). Here the checkpoint is signed
    right after verify's database read, every time."""
    from kms.service import audit_queries as audit_service
    from kms.service.audit_queries import AuditService

    writer = _writer(rt)
    _traffic(rt)
    writer.write()
    original = audit_service.audit.read_checkpoints

    def read_then_sign_another(conn):  # type: ignore[no-untyped-def]
        out = original(conn)
        _traffic(rt)
        assert writer.write() is not None  # committed and anchored after the snapshot was read
        return out

    monkeypatch.setattr(audit_service.audit, "read_checkpoints", read_then_sign_another)
    report = AuditService.for_settings(rt.db, rt.identity, rt.settings).verify()
    assert report.problems == [] and report.ok, report.problems
