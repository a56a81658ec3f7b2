"""The audit hash chain, the checkpoint chain and their verification (docs/DECISIONS.md D-8).

Each record's hash is SHA-384 over a domain label, the record's canonical JSON (sorted keys, no
whitespace) and the previous record's hash, so editing, deleting, inserting or reordering a record
breaks the chain at that point. Anyone can recompute a record chain, so checkpoints signed with the
KME's ML-DSA key pin it; and the checkpoints form a chain of their own (each signs its number, the
previous checkpoint's hash and the record range ``from_seq..upto_seq`` it covers), so deleting,
reordering or replacing a checkpoint breaks that chain too. Only the newest checkpoints can vanish
without a trace inside the database: the anchor file (``kms.audit.anchors``) pins them outside it,
and records after the last checkpoint are accepted only within :class:`TailWindow`.

Verification needs only the records, the checkpoints and the KME's public key(s): it runs offline on
an export (``qkms audit verify --file``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

GENESIS = bytes(48)
RECORD_LABEL = b"QKMS audit record v1"
CHECKPOINT_CONTEXT = b"qkms-audit-checkpoint-v1"  # legacy checkpoints (before migration 0009)
CHAINED_CONTEXT = b"qkms-audit-checkpoint-v2"
CHECKPOINT_LABEL = b"QKMS audit checkpoint v2"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    data: Mapping[str, Any]
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "data": dict(self.data),
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "prev_hash": self.prev_hash, "hash": self.hash}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AuditRecord:
        return cls(
            int(obj["seq"]),
            str(obj["at"]),
            str(obj["actor"]),
            str(obj["action"]),
            str(obj["subject"]),
            dict(obj["data"]),
            str(obj["prev_hash"]),
            str(obj["hash"]),
        )


def record_hash(body: Mapping[str, Any], prev_hash: bytes) -> bytes:
    encoded = canonical_json(dict(body))
    return hashlib.sha384(RECORD_LABEL + len(encoded).to_bytes(4, "big") + encoded + prev_hash).digest()


def _signed_message(checkpoint: Any) -> bytes:
    """What a checkpoint signs: every field but the signature, as canonical JSON (sorted keys, so
    the field order of the class does not matter)."""
    return canonical_json(
        {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint) if f.name != "signature"}
    )


@dataclass(frozen=True)
class LegacyCheckpoint:
    """A pre-0009 signed statement 'the log up to ``upto_seq`` has head hash ``head_hash``' (not chained).

    Still verified when present; its absence proves nothing, so it never counts as coverage on its own
    once chained checkpoints exist."""

    upto_seq: int
    head_hash: str
    kme_id: str
    key_version: int
    algorithm: str
    at: str
    signature: str  # hex

    context = CHECKPOINT_CONTEXT

    def message(self) -> bytes:
        return _signed_message(self)

    def to_json(self) -> dict[str, Any]:
        return {**json.loads(self.message()), "signature": self.signature}


@dataclass(frozen=True)
class Checkpoint:
    """Checkpoint number ``number``: 'records ``from_seq..upto_seq`` end in ``head_hash``, and the
    checkpoint before me hashes to ``prev_hash``' — signed, so it can be neither moved nor forged."""

    number: int
    prev_hash: str
    from_seq: int
    upto_seq: int
    head_hash: str
    kme_id: str
    key_version: int
    algorithm: str
    at: str
    signature: str  # hex

    context = CHAINED_CONTEXT

    def message(self) -> bytes:
        return _signed_message(self)

    def hash(self) -> str:
        """What the next checkpoint and the anchor file name: the signed content, not the signature."""
        encoded = self.message()
        return hashlib.sha384(CHECKPOINT_LABEL + len(encoded).to_bytes(4, "big") + encoded).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {**json.loads(self.message()), "signature": self.signature}


AnyCheckpoint = Checkpoint | LegacyCheckpoint


def checkpoint_from_json(obj: Mapping[str, Any]) -> AnyCheckpoint:
    common = (
        int(obj["upto_seq"]),
        str(obj["head_hash"]),
        str(obj["kme_id"]),
        int(obj["key_version"]),
        str(obj["algorithm"]),
        str(obj["at"]),
        str(obj["signature"]),
    )
    if "number" not in obj:
        return LegacyCheckpoint(*common)
    return Checkpoint(int(obj["number"]), str(obj["prev_hash"]), int(obj["from_seq"]), *common)


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
