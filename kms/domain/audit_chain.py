"""The audit trail's records and signed checkpoints, and how each is hashed (docs/DECISIONS.md D-8).

Pure: hashlib and json only. Each record's hash is SHA-384 over a domain label, the record's canonical
JSON (sorted keys, no whitespace) and the previous record's hash, so editing, deleting, inserting or
reordering a record breaks the chain at that point. A checkpoint, signed with the KME's ML-DSA key,
names its number, the previous checkpoint's hash and the record range ``from_seq..upto_seq`` it
covers, so the checkpoints form a chain of their own. Storage stores and reads these types,
``kms.audit`` verifies them, ``kms.service`` appends and signs them; none of those is imported here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
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
class Receipt:
    """A peer KME's countersignature: ``peer`` holds a copy of our checkpoint chain up to checkpoint
    ``number`` (hash ``checkpoint_hash``) and signed that with its key ``key_version``
    (``kms.audit.peer_copies``)."""

    peer: str
    number: int
    checkpoint_hash: str
    key_version: int
    algorithm: str
    signature: str  # hex
    at: datetime
