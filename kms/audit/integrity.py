"""Does the database still hold what this KME signed and anchored? The checks, without the database.

Two callers in ``kms.service``: the checkpoint writer (``audit_checkpoints.CheckpointWriter``) checks,
before it signs, that the last anchored checkpoint is in the database unchanged and that the record it
pins is too, so a KME whose database was rewritten under it refuses to sign the rewrite; and the
start-up check (``audit_startup.check_audit_at_start``) refuses to serve when a checkpoint anchored
outside the database is missing or altered, the records are truncated below the last anchored seq or
rewritten under a checkpoint, the checkpoint chain is broken, the chain head disagrees with the
records, or more records follow the last checkpoint than the window allows. They read; these decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kms.audit.anchors import Anchor, anchor_problems
from kms.audit.chain import SignatureCheck, TailWindow, VerificationReport, chain_problems, check_tail
from kms.domain.audit_chain import GENESIS, AuditRecord, Checkpoint, record_hash


class AuditIntegrityError(RuntimeError):
    """The database's audit no longer matches what this KME signed and anchored; each problem named."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def pinned_problems(last: Checkpoint, pinned: AuditRecord | None, following: AuditRecord | None) -> list[str]:
    """The record the last checkpoint pins (``pinned``) is still there, unchanged, and the next one
    (``following``) chains to it."""
    if pinned is None or pinned.hash != last.head_hash:
        return [
            f"record seq {last.upto_seq} no longer matches checkpoint #{last.number} (rewritten or truncated)"
        ]
    if following is not None and following.prev_hash != last.head_hash:
        return [
            f"record seq {following.seq} does not chain to seq {last.upto_seq}, pinned by checkpoint #{last.number}"
        ]
    return []


def anchored_in_database(path: str, anchored: Anchor | None, last: Checkpoint | None) -> None:
    """The last anchor must name a checkpoint the database still holds (raises if not)."""
    if anchored is None:
        if last is not None:
            raise AuditIntegrityError(
                [
                    f"the anchor file {path} is empty but the database holds checkpoints up to"
                    f" #{last.number}: restore the anchor file, or run `qkms audit verify` and then"
                    " `qkms audit adopt-anchors` if the file was lost"
                ]
            )
        return
    if last is None or last.number < anchored.number:
        raise AuditIntegrityError(
            [
                f"checkpoint #{anchored.number} (seq {anchored.from_seq}..{anchored.upto_seq}) is anchored in"
                f" {path} but the database's last checkpoint is #{last.number if last else 0} (deleted)"
            ]
        )


def unanchored(
    path: str, anchored: Anchor, newer: Sequence[Checkpoint], verify: SignatureCheck
) -> Sequence[Checkpoint]:
    """``newer``: the database's checkpoints from the last anchored one on. That one must be unchanged;
    those committed after it (a crash between commit and anchor) must chain and verify, and are
    returned, to be anchored now. Raises naming every problem."""
    if not newer or newer[0].hash() != anchored.hash:
        raise AuditIntegrityError(
            [f"checkpoint #{anchored.number} differs from its anchor in {path} (altered or forged)"]
        )
    problems = chain_problems(newer[1:], after=newer[0])
    for cp in newer[1:]:
        if not verify(cp.key_version, cp.message(), bytes.fromhex(cp.signature), cp.context):
            problems.append(f"checkpoint #{cp.number} has an invalid signature (forged or altered)")
    if problems:
        raise AuditIntegrityError(problems)
    return newer[1:]


@dataclass(frozen=True)
class StoredAudit:
    """What the start-up check reads from the database, in one snapshot."""

    head: tuple[int, str] | None  # audit_head: (seq, hash), None if the row is missing
    last_record: tuple[int, str] | None  # the highest-numbered record stored
    stored_count: int
    chained: list[Checkpoint]
    pinned: list[tuple[int, int, str, str | None]]  # (number, upto_seq, head_hash, stored hash)
    signed_seq: int  # the last checkpoint's upto_seq
    tail: list[AuditRecord]  # the records after it, at most window.records + 1
    before_tail: AuditRecord | None  # the record at signed_seq


def start_problems(
    stored: StoredAudit,
    anchored: Sequence[Anchor],
    anchors_path: str,
    sign_keys: Mapping[int, bytes],
    verify: SignatureCheck,
    window: TailWindow,
) -> list[str]:
    """Every reason the KME must not serve over this database (empty: it may)."""
    problems: list[str] = []
    last = stored.last_record or (0, GENESIS.hex())
    if stored.head is None:
        problems.append("the audit chain head (audit_head) is missing")
    elif stored.head != last:
        problems.append(
            f"the audit chain head says seq {stored.head[0]} but the last stored record is seq {last[0]}"
            " (records deleted or inserted behind the head)"
        )
    if stored.stored_count != last[0]:
        problems.append(
            f"{stored.stored_count} records are stored for seq 1..{last[0]}: records were deleted or inserted"
        )
    if not anchored and stored.chained:
        problems.append(
            f"the anchor file {anchors_path} is missing or empty, but the database holds {len(stored.chained)}"
            " chained checkpoints: restore the file, or if it was lost, run `qkms audit verify` and then"
            " `qkms audit adopt-anchors`"
        )
    problems += anchor_problems(anchored, stored.chained, last[0], sign_keys, anchors_path)
    problems += chain_problems(stored.chained)
    last_anchored = anchored[-1].number if anchored else 0
    for cp in stored.chained:
        if cp.number > last_anchored and not verify(
            cp.key_version, cp.message(), bytes.fromhex(cp.signature), cp.context
        ):
            problems.append(f"checkpoint #{cp.number} has an invalid signature (forged or altered)")
    for number, upto, head_hash, record in stored.pinned:
        if record is None:
            problems.append(
                f"checkpoint #{number} names record seq {upto}, which is missing (deleted or truncated)"
            )
        elif record != head_hash:
            problems.append(
                f"log rewritten: record seq {upto} no longer matches the signed checkpoint #{number}"
            )
    problems += tail_problems(stored.tail, stored.before_tail, stored.signed_seq, window)
    return problems


def tail_problems(
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
