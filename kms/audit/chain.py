"""The audit hash chain and its verification (DESIGN.md #8).

Each record's hash is SHA-384 over a domain label, the record's canonical JSON (sorted keys, no
whitespace) and the previous record's hash, so editing, deleting, inserting or reordering a record
breaks the chain at that point. Anyone can recompute a chain, so the chain alone only shows that
the log is *consistent*; checkpoints signed with the KME's ML-DSA key pin it: a rewritten log no
longer matches a signed checkpoint. Records after the newest checkpoint are reported as unsigned.

Verification needs only the records, the checkpoints and the KME's public key(s): it runs offline on
an export (``qkms audit verify --file``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GENESIS = bytes(48)
RECORD_LABEL = b"QKMS audit record v1"
CHECKPOINT_CONTEXT = b"qkms-audit-checkpoint-v1"


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


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: 'the log up to ``upto_seq`` has head hash ``head_hash``'."""

    upto_seq: int
    head_hash: str
    kme_id: str
    key_version: int
    algorithm: str
    at: str
    signature: str  # hex

    def message(self) -> bytes:
        return canonical_json(
            {
                "upto_seq": self.upto_seq,
                "head_hash": self.head_hash,
                "kme_id": self.kme_id,
                "key_version": self.key_version,
                "algorithm": self.algorithm,
                "at": self.at,
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {**json.loads(self.message()), "signature": self.signature}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Checkpoint:
        return cls(
            int(obj["upto_seq"]),
            str(obj["head_hash"]),
            str(obj["kme_id"]),
            int(obj["key_version"]),
            str(obj["algorithm"]),
            str(obj["at"]),
            str(obj["signature"]),
        )


# verify(public_key, message, signature) -> bool, for the checkpoint's key version
SignatureCheck = Callable[[int, bytes, bytes], bool]


@dataclass
class VerificationReport:
    records: int = 0
    checkpoints_valid: int = 0
    last_signed_seq: int = 0
    problems: list[str] = field(default_factory=list)
    unsigned_tail: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(
    records: Sequence[AuditRecord],
    checkpoints: Iterable[Checkpoint],
    check_signature: SignatureCheck,
) -> VerificationReport:
    """Find every edited, deleted, inserted or reordered record, and every bad checkpoint."""
    report = VerificationReport(records=len(records))
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

    for cp in sorted(checkpoints, key=lambda c: c.upto_seq):
        if not check_signature(cp.key_version, cp.message(), bytes.fromhex(cp.signature)):
            report.problems.append(f"checkpoint at seq {cp.upto_seq} has an invalid signature")
            continue
        signed = by_seq.get(cp.upto_seq)
        if signed is None:
            report.problems.append(
                f"checkpoint at seq {cp.upto_seq} names a record that is missing (deleted)"
            )
        elif signed.hash != cp.head_hash:
            report.problems.append(
                f"log rewritten: record seq {cp.upto_seq} no longer matches the signed checkpoint"
            )
        else:
            report.checkpoints_valid += 1
            report.last_signed_seq = max(report.last_signed_seq, cp.upto_seq)
    report.unsigned_tail = sum(1 for r in records if r.seq > report.last_signed_seq)
    return report
