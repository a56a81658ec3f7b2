"""The audit check a KME runs before it serves: does the database still hold what it signed and anchored?

Run once per server process at start (``kms.server.build_app``). It refuses — a log line naming
each problem and a non-zero exit — when a checkpoint anchored outside the database is missing or
altered, the records are truncated below the last anchored seq or rewritten under a checkpoint, the
checkpoint chain is broken, the chain head disagrees with the records, or more records follow the
last checkpoint than the window allows. Otherwise it anchors any checkpoint committed but not yet
anchored (a crash in between) and signs the unsigned tail, so a KME never signs a rewritten history.

Cost: one pass over the checkpoints (hash each, compare with its anchor) and over the tail records;
not over all records — a record edited without touching the hash columns is left to
``qkms audit verify``, which rehashes everything (such an edit is never signed over: checkpoints pin
the hash columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from kms.audit.anchors import AnchorFile, AnchorFileError, anchor_path, anchor_problems
from kms.audit.chain import (
    GENESIS,
    AuditRecord,
    Checkpoint,
    TailWindow,
    VerificationReport,
    chain_problems,
    check_tail,
    record_hash,
)
from kms.audit.checkpointer import AuditIntegrityError, CheckpointWriter
from kms.config import KmsSettings
from kms.crypto.identity import KmeIdentity
from kms.storage import audit_repository as audit
from kms.storage.database import Database

log = structlog.get_logger(__name__)
EXIT_AUDIT_REFUSED = 3


def anchor_file(settings: KmsSettings) -> AnchorFile:
    return AnchorFile(anchor_path(settings.config_dir, settings.audit.anchor_dir, settings.kme.id))


def tail_window(settings: KmsSettings) -> TailWindow:
    return TailWindow(settings.audit.max_unsigned_records, settings.audit.max_unsigned_seconds)


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
    problems: list[str] = []
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

    stored = last_record or (0, GENESIS.hex())
    if head is None:
        problems.append("the audit chain head (audit_head) is missing")
    elif head != stored:
        problems.append(
            f"the audit chain head says seq {head[0]} but the last stored record is seq {stored[0]}"
            " (records deleted or inserted behind the head)"
        )
    if stored_count != stored[0]:
        problems.append(
            f"{stored_count} records are stored for seq 1..{stored[0]}: records were deleted or inserted"
        )
    if not anchored and chained:
        problems.append(
            f"the anchor file {anchors.path} is missing or empty, but the database holds {len(chained)} chained"
            " checkpoints: restore the file, or if it was lost, run `qkms audit verify` and then"
            " `qkms audit adopt-anchors`"
        )
    problems += anchor_problems(anchored, chained, stored[0], _sign_keys(identity), str(anchors.path))
    problems += chain_problems(chained)
    last_anchored = anchored[-1].number if anchored else 0
    for cp in chained:
        if cp.number > last_anchored and not identity.verify(
            cp.key_version, cp.message(), bytes.fromhex(cp.signature), cp.context
        ):
            problems.append(f"checkpoint #{cp.number} has an invalid signature (forged or altered)")
    for number, upto, head_hash, record in pinned:
        if record is None:
            problems.append(
                f"checkpoint #{number} names record seq {upto}, which is missing (deleted or truncated)"
            )
        elif record != head_hash:
            problems.append(
                f"log rewritten: record seq {upto} no longer matches the signed checkpoint #{number}"
            )
    problems += _tail_problems(tail, before_tail, signed_seq, window)
    if problems:
        raise AuditIntegrityError(problems)
    signed = CheckpointWriter(db, identity, kme_id, anchors).write()  # anchors lagging ones, signs the tail
    return StartCheck(len(chained), len(anchored), len(tail), signed)


def _sign_keys(identity: KmeIdentity) -> dict[int, bytes]:
    return {k.version: k.public_key for k in identity.public_keys() if k.purpose == "sign"}


def _tail_problems(
    tail: list[AuditRecord], before: AuditRecord | None, signed_seq: int, window: TailWindow
) -> list[str]:
    """The unsigned records: within the window, each intact and chained to the signed part."""
    report = VerificationReport(last_signed_seq=signed_seq)
    check_tail(tail, report, window)
    prev_seq, prev_hash = signed_seq, before.hash if before is not None else GENESIS.hex()
    for rec in tail:
        if rec.seq != prev_seq + 1 or rec.prev_hash != prev_hash:
            report.problems.append(f"unsigned record seq {rec.seq} does not chain to seq {prev_seq}")
            break
        if record_hash(rec.body(), bytes.fromhex(rec.prev_hash)).hex() != rec.hash:
            report.problems.append(
                f"unsigned record seq {rec.seq} was edited: its content does not match its hash"
            )
            break
        prev_seq, prev_hash = rec.seq, rec.hash
    return report.problems


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
