"""Verification of the audit hash chain and the checkpoint chain (docs/DECISIONS.md D-8).

The records and checkpoints, and how each is hashed, are ``kms.domain.audit_chain``. Anyone can
recompute a record chain, so checkpoints signed with the KME's ML-DSA key pin it; and the checkpoints
form a chain of their own, so deleting, reordering or replacing a checkpoint breaks that chain too.
Only the newest checkpoints can vanish without a trace inside the database: the anchor file
(``kms.audit.anchors``) pins them outside it, and records after the last checkpoint are accepted
only within :class:`TailWindow`.

Verification needs only the records, the checkpoints and the KME's public key(s): it runs offline on
an export (``qkms audit verify --file``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from kms.domain.audit_chain import (
    GENESIS,
    AnyCheckpoint,
    AuditRecord,
    Checkpoint,
    LegacyCheckpoint,
    record_hash,
)


@dataclass(frozen=True)
class TailWindow:
    """How many records may follow the last checkpoint, and over how long (by their own timestamps:
    first unsigned record to last record), before verification calls the newest checkpoints missing."""

    records: int = 10_000
    seconds: float = 60.0


DEFAULT_WINDOW = TailWindow()

# verify(key_version, message, signature, context) -> bool
SignatureCheck = Callable[[int, bytes, bytes, bytes], bool]


@dataclass
class VerificationReport:
    records: int = 0
    checkpoints_valid: int = 0
    checkpoints_chained: int = 0
    last_signed_seq: int = 0
    problems: list[str] = field(default_factory=list)
    unsigned_tail: int = 0
    tail_seconds: float = 0.0
    anchors: int | None = None  # anchored checkpoints compared, when an anchor file was given

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_time(at: str) -> datetime | None:
    try:
        return datetime.fromisoformat(at)
    except ValueError:
        return None


def verify_records(records: Sequence[AuditRecord], report: VerificationReport) -> dict[int, AuditRecord]:
    """Find every edited, deleted, inserted or reordered record; return the records by seq."""
    by_seq: dict[int, AuditRecord] = {}
    prev_hash = GENESIS
    prev_seq = 0
    for rec in records:
        if rec.seq in by_seq:
            report.problems.append(f"record seq {rec.seq} appears twice (inserted record)")
        by_seq.setdefault(rec.seq, rec)
        recomputed = record_hash(rec.body(), bytes.fromhex(rec.prev_hash)).hex()
        if recomputed != rec.hash:
            report.problems.append(f"record seq {rec.seq} was edited: its content does not match its hash")
        if rec.seq <= prev_seq:
            report.problems.append(f"record seq {rec.seq} is out of order after seq {prev_seq} (reordered)")
        elif rec.seq != prev_seq + 1:
            missing = f"{prev_seq + 1}" if rec.seq == prev_seq + 2 else f"{prev_seq + 1}..{rec.seq - 1}"
            report.problems.append(f"record(s) seq {missing} deleted before seq {rec.seq}")
        elif rec.prev_hash != prev_hash.hex():
            report.problems.append(
                f"record seq {rec.seq} does not chain to seq {prev_seq} (a record was inserted, replaced or reordered)"
            )
        prev_hash = bytes.fromhex(rec.hash)
        prev_seq = max(prev_seq, rec.seq)
    return by_seq


def _pins(cp: AnyCheckpoint, by_seq: Mapping[int, AuditRecord], name: str) -> str | None:
    signed = by_seq.get(cp.upto_seq)
    if signed is None:
        return f"{name} names record seq {cp.upto_seq}, which is missing (deleted or truncated)"
    if signed.hash != cp.head_hash:
        return f"log rewritten: record seq {cp.upto_seq} no longer matches the signed {name}"
    return None


def chain_problems(checkpoints: Sequence[Checkpoint], after: Checkpoint | None = None) -> list[str]:
    """Breaks in the checkpoint chain itself (numbers, links, ranges), from genesis or from ``after``;
    signatures not checked."""
    problems: list[str] = []
    expected, prev_hash, prev_upto = 1, GENESIS.hex(), 0
    if after is not None:
        expected, prev_hash, prev_upto = after.number + 1, after.hash(), after.upto_seq
    for cp in sorted(checkpoints, key=lambda c: c.number):
        name = f"checkpoint #{cp.number}"
        if cp.number < expected:
            problems.append(f"{name} appears twice (inserted checkpoint)")
            continue
        if cp.number > expected:
            gap = f"#{expected}" if cp.number == expected + 1 else f"#{expected}..#{cp.number - 1}"
            problems.append(f"checkpoint(s) {gap} missing (deleted) before {name}")
        elif cp.prev_hash != prev_hash:
            problems.append(f"{name} does not chain to #{cp.number - 1} (replaced, reordered or forged)")
        if cp.from_seq != prev_upto + 1 or cp.upto_seq < cp.from_seq:
            problems.append(
                f"{name} covers seq {cp.from_seq}..{cp.upto_seq}, but the checkpoint before it ends at seq"
                f" {prev_upto} (a range is missing, overlaps or is empty)"
            )
        expected, prev_hash, prev_upto = cp.number + 1, cp.hash(), cp.upto_seq
    return problems


def verify_chain(
    records: Sequence[AuditRecord],
    checkpoints: Iterable[AnyCheckpoint],
    check_signature: SignatureCheck,
    window: TailWindow = DEFAULT_WINDOW,
) -> VerificationReport:
    """Every edited, deleted, inserted or reordered record; every missing, reordered, forged or
    moved checkpoint; and a tail of unsigned records longer than ``window``."""
    report = VerificationReport(records=len(records))
    by_seq = verify_records(records, report)
    given = list(checkpoints)
    chained = sorted((c for c in given if isinstance(c, Checkpoint)), key=lambda c: c.number)
    legacy = sorted((c for c in given if isinstance(c, LegacyCheckpoint)), key=lambda c: c.upto_seq)
    report.problems.extend(chain_problems(chained))
    ordered: list[AnyCheckpoint] = [*legacy, *chained]
    for cp in ordered:
        name = (
            f"checkpoint #{cp.number}" if isinstance(cp, Checkpoint) else f"checkpoint at seq {cp.upto_seq}"
        )
        if not check_signature(cp.key_version, cp.message(), bytes.fromhex(cp.signature), cp.context):
            report.problems.append(f"{name} has an invalid signature (forged or altered)")
            continue
        problem = _pins(cp, by_seq, name)
        if problem is not None:
            report.problems.append(problem)
            continue
        report.checkpoints_valid += 1
        report.checkpoints_chained += isinstance(cp, Checkpoint)
        report.last_signed_seq = max(report.last_signed_seq, cp.upto_seq)
    check_tail(records, report, window)
    return report


def check_tail(records: Sequence[AuditRecord], report: VerificationReport, window: TailWindow) -> None:
    """Records after the last valid checkpoint: accepted only within ``window`` (count and time span)."""
    tail = [r for r in records if r.seq > report.last_signed_seq]
    report.unsigned_tail = len(tail)
    if not tail:
        return
    first, last = parse_time(tail[0].at), parse_time(tail[-1].at)
    span = (last - first).total_seconds() if first is not None and last is not None else float("inf")
    report.tail_seconds = span
    where = f"seq {tail[0].seq}..{tail[-1].seq}"
    if len(tail) > window.records:
        report.problems.append(
            f"{len(tail)} records ({where}) follow the last signed checkpoint, more than the window of"
            f" {window.records}: checkpoints are missing (deleted) or were never written"
        )
    elif span > window.seconds:
        report.problems.append(
            f"the records after the last signed checkpoint ({where}) span {span:.0f} s, more than the"
            f" window of {window.seconds:.0f} s: checkpoints are missing (deleted) or were never written"
        )
