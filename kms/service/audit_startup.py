"""The audit check a KME runs before it serves: does the database still hold what it signed and anchored?

Run once per server process at start (``kms.server.build_app``). It reads the audit in one snapshot
and refuses — a log line naming each problem (``kms.audit.integrity.start_problems``) and a non-zero
exit — when a checkpoint anchored outside the database is missing or altered, the records are
truncated below the last anchored seq or rewritten under a checkpoint, the checkpoint chain is broken,
the chain head disagrees with the records, or more records follow the last checkpoint than the window
allows. Otherwise it anchors any checkpoint committed but not yet anchored (a crash in between) and
signs the unsigned tail, so a KME never signs a rewritten history.

Cost: one pass over the checkpoints (hash each, compare with its anchor) and over the tail records;
not over all records — a record edited without touching the hash columns is left to
``qkms audit verify``, which rehashes everything (such an edit is never signed over: checkpoints pin
the hash columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from kms.audit.anchors import AnchorFile, AnchorFileError
from kms.audit.chain import TailWindow
from kms.audit.integrity import AuditIntegrityError, StoredAudit, start_problems
from kms.config import KmsSettings
from kms.crypto.identity import KmeIdentity
from kms.domain.audit_chain import Checkpoint
from kms.service.audit_checkpoints import CheckpointWriter, anchor_file, tail_window
from kms.storage import audit_repository as audit
from kms.storage.database import Database

log = structlog.get_logger(__name__)
EXIT_AUDIT_REFUSED = 3


@dataclass(frozen=True)
class StartCheck:
    checkpoints: int
    anchors: int
    unsigned_tail: int
    signed: Checkpoint | None


def check_audit_at_start(
    db: Database, identity: KmeIdentity, kme_id: str, anchors: AnchorFile, window: TailWindow
) -> StartCheck:
    """Raise ``AuditIntegrityError`` naming every problem, or anchor and sign what is pending."""
    try:
        anchored = anchors.read()
    except (OSError, AnchorFileError) as exc:
        raise AuditIntegrityError([f"the anchor file cannot be read: {exc}"]) from exc
    with db.read() as conn:
        audit.snapshot(conn)
        head = audit.head_row(conn)
        last_record = audit.last_record(conn)
        stored_count = audit.count_after(conn, 0)
        chained = audit.chained_checkpoints(conn)
        pinned = audit.pinned_records(conn)
        signed_seq = audit.last_checkpoint_seq(conn)
        tail = audit.read_records(conn, since_seq=signed_seq, limit=window.records + 1)
        before_tail = audit.record_at(conn, signed_seq) if signed_seq else None
    stored = StoredAudit(head, last_record, stored_count, chained, pinned, signed_seq, tail, before_tail)
    sign_keys = {k.version: k.public_key for k in identity.public_keys() if k.purpose == "sign"}
    problems = start_problems(stored, anchored, str(anchors.path), sign_keys, identity.verify, window)
    if problems:
        raise AuditIntegrityError(problems)
    signed = CheckpointWriter(db, identity, kme_id, anchors).write()  # anchors lagging ones, signs the tail
    return StartCheck(len(chained), len(anchored), len(tail), signed)


def refuse_unless_audit_intact(db: Database, identity: KmeIdentity, settings: KmsSettings) -> StartCheck:
    """The one call at server start: log why and exit with status 3 if this KME must not serve."""
    try:
        return check_audit_at_start(
            db, identity, settings.kme.id, anchor_file(settings), tail_window(settings)
        )
    except AuditIntegrityError as exc:
        log.error(
            "audit_start_refused",
            reason="the audit trail in the database no longer matches what this KME signed and anchored",
            problems=exc.problems,
        )
        raise SystemExit(EXIT_AUDIT_REFUSED) from None
