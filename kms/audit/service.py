"""Audit read side: provenance, records, checkpoints, verification, export and offline verification."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kms.audit.chain import CHECKPOINT_CONTEXT, AuditRecord, Checkpoint, VerificationReport, verify_chain
from kms.crypto.identity import KmeIdentity, PublicKeyInfo
from kms.crypto.pqc.base import SignatureAlgorithm, SignatureProvider
from kms.storage import audit_repository as audit
from kms.storage.database import Database
from kms.storage.provenance_queries import key_provenance

EXPORT_FORMAT = "qkms-audit-export-v1"
PUBLIC_KEYS_FORMAT = "qkms-kme-public-keys-v1"


def report_json(report: VerificationReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "records": report.records,
        "checkpoints_valid": report.checkpoints_valid,
        "last_signed_seq": report.last_signed_seq,
        "unsigned_tail": report.unsigned_tail,
        "problems": report.problems,
    }


class AuditService:
    def __init__(self, db: Database, identity: KmeIdentity, kme_id: str) -> None:
        self.db = db
        self.identity = identity
        self.kme_id = kme_id

    def provenance(self, key_id: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            return key_provenance(conn, key_id, self.kme_id)

    def events(self, after_seq: int = 0, since: str | None = None, limit: int = 100) -> dict[str, Any]:
        with self.db.read() as conn:
            records = audit.read_records(conn, since_seq=after_seq, limit=limit, since_time=since)
            seq, head = audit.head(conn)
        return {"records": [r.to_json() for r in records], "head": {"seq": seq, "hash": head}}

    def checkpoints(self) -> dict[str, Any]:
        with self.db.read() as conn:
            return {"checkpoints": [c.to_json() for c in audit.read_checkpoints(conn)]}

    def public_keys(self) -> dict[str, Any]:
        return {
            "format": PUBLIC_KEYS_FORMAT,
            "kme_id": self.kme_id,
            "keys": [k.to_json() for k in self.identity.public_keys()],
        }

    def verify(self) -> VerificationReport:
        with self.db.read() as conn:
            records = audit.read_records(conn)
            checkpoints = audit.read_checkpoints(conn)
        return verify_chain(
            records, checkpoints, lambda v, m, sig: self.identity.verify(v, m, sig, CHECKPOINT_CONTEXT)
        )

    def verify_report(self) -> dict[str, Any]:
        return report_json(self.verify())

    def export(self) -> dict[str, Any]:
        with self.db.read() as conn:
            records = audit.read_records(conn)
            checkpoints = audit.read_checkpoints(conn)
        return {
            "format": EXPORT_FORMAT,
            "kme_id": self.kme_id,
            "records": [r.to_json() for r in records],
            "checkpoints": [c.to_json() for c in checkpoints],
        }


def load_public_keys(path: Path) -> list[PublicKeyInfo]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != PUBLIC_KEYS_FORMAT:
        raise ValueError(f"{path} is not a QKMS public-key file")
    return [
        PublicKeyInfo(
            k["purpose"], k["algorithm"], int(k["version"]), bytes.fromhex(k["public_key"]), k["state"]
        )
        for k in data["keys"]
    ]


def verify_export(
    export: Mapping[str, Any], public_keys: Sequence[PublicKeyInfo], signer: SignatureProvider
) -> VerificationReport:
    """Verify an exported log with nothing but the KME's public signing key(s)."""
    if export.get("format") != EXPORT_FORMAT:
        raise ValueError("not a QKMS audit export")
    by_version = {k.version: k for k in public_keys if k.purpose == "sign"}
    records = [AuditRecord.from_json(r) for r in export["records"]]
    checkpoints = [Checkpoint.from_json(c) for c in export["checkpoints"]]

    def check(version: int, message: bytes, signature: bytes) -> bool:
        key = by_version.get(version)
        if key is None:
            return False
        return signer.verify(
            SignatureAlgorithm(key.algorithm), key.public_key, message, signature, CHECKPOINT_CONTEXT
        )

    return verify_chain(records, checkpoints, check)
