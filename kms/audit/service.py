"""Audit read side: provenance, records, checkpoints, verification, export and offline verification."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kms.audit.anchors import Anchor, AnchorFile, AnchorFileError, anchor_problems
from kms.audit.chain import (
    DEFAULT_WINDOW,
    AnyCheckpoint,
    AuditRecord,
    Checkpoint,
    TailWindow,
    VerificationReport,
    checkpoint_from_json,
    verify_chain,
)
from kms.config import KmsSettings
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
        "checkpoints_chained": report.checkpoints_chained,
        "unsigned_tail": report.unsigned_tail,
        "unsigned_tail_seconds": round(report.tail_seconds, 3),
        "anchors_checked": report.anchors,
        "problems": report.problems,
    }


class AuditService:
    def __init__(
        self,
        db: Database,
        identity: KmeIdentity,
        kme_id: str,
        window: TailWindow = DEFAULT_WINDOW,
        anchors: AnchorFile | None = None,
    ) -> None:
        self.db = db
        self.identity = identity
        self.kme_id = kme_id
        self.window = window
        self.anchors = anchors

    @classmethod
    def for_settings(cls, db: Database, identity: KmeIdentity, settings: KmsSettings) -> AuditService:
        """With the configured tail window and the KME's anchor file."""
        from kms.audit.startup import anchor_file, tail_window

        return cls(db, identity, settings.kme.id, tail_window(settings), anchor_file(settings))

    def provenance(self, key_id: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            return key_provenance(conn, key_id, self.kme_id)

    def events(self, after_seq: int = 0, since: str | None = None, limit: int = 100) -> dict[str, Any]:
        with self.db.read() as conn:
            records = audit.read_records(conn, since_seq=after_seq, limit=limit, since_time=since)
            seq, head = audit.head(conn)
        return {"records": [r.to_json() for r in records], "head": {"seq": seq, "hash": head}}

    def checkpoints_raw(self) -> list[AnyCheckpoint]:
        with self.db.read() as conn:
            return audit.read_checkpoints(conn)

    def checkpoints(self) -> dict[str, Any]:
        with self.db.read() as conn:
            return {"checkpoints": [c.to_json() for c in audit.read_checkpoints(conn)]}

    def public_keys(self) -> dict[str, Any]:
        return {
            "format": PUBLIC_KEYS_FORMAT,
            "kme_id": self.kme_id,
            "keys": [k.to_json() for k in self.identity.public_keys()],
        }

    def verify(self, anchors: AnchorFile | None = None) -> VerificationReport:
        """The whole chain, checkpoints and tail window; and against ``anchors`` (default: the KME's
        own anchor file, when it has one)."""
        anchor_file = anchors or self.anchors
        # The anchors first: a running KME commits a checkpoint before it anchors it, so every anchor
        # read now is in the database snapshot taken next (the other order calls the checkpoint
        # signed in between "missing").
        anchored = read_anchor_file(anchor_file)
        with self.db.read() as conn:
            audit.snapshot(conn)
            records = audit.read_records(conn)
            checkpoints = audit.read_checkpoints(conn)
        report = verify_chain(
            records,
            checkpoints,
            lambda v, m, sig, ctx: self.identity.verify(v, m, sig, ctx),
            self.window,
        )
        keys = {k.version: k.public_key for k in self.identity.public_keys() if k.purpose == "sign"}
        check_anchors(report, anchor_file, checkpoints, records, keys, anchored)
        return report

    def verify_report(self) -> dict[str, Any]:
        return report_json(self.verify())

    def export(self) -> dict[str, Any]:
        with self.db.read() as conn:
            audit.snapshot(conn)
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


def read_anchor_file(anchors: AnchorFile | None) -> list[Anchor] | str | None:
    """The file's anchors, or why it cannot be read (None: no file to check)."""
    if anchors is None:
        return None
    try:
        return anchors.read()
    except (OSError, AnchorFileError) as exc:
        return f"anchor file {anchors.path} cannot be read: {exc}"


def check_anchors(
    report: VerificationReport,
    anchors: AnchorFile | None,
    checkpoints: Sequence[AnyCheckpoint],
    records: Sequence[AuditRecord],
    signer_keys: Mapping[int, bytes] | None,
    read: list[Anchor] | str | None = None,
) -> None:
    """Add what the anchors say is missing or changed (``read``: the file as read before the
    database, else read now). A chained checkpoint with no anchor file at all is a problem too: the
    file is what pins the newest checkpoints."""
    if anchors is None:
        return
    chained = [c for c in checkpoints if isinstance(c, Checkpoint)]
    anchored = read if read is not None else read_anchor_file(anchors)
    if isinstance(anchored, str) or anchored is None:
        report.problems.append(anchored or f"anchor file {anchors.path} cannot be read")
        return
    report.anchors = len(anchored)
    if not anchored and chained:
        report.problems.append(
            f"the anchor file {anchors.path} is missing or empty, but {len(chained)} chained checkpoints exist"
        )
    last_seq = records[-1].seq if records else 0
    report.problems.extend(anchor_problems(anchored, chained, last_seq, signer_keys, str(anchors.path)))


def verify_export(
    export: Mapping[str, Any],
    public_keys: Sequence[PublicKeyInfo],
    signer: SignatureProvider,
    window: TailWindow = DEFAULT_WINDOW,
    anchors: AnchorFile | None = None,
) -> VerificationReport:
    """Verify an exported log with nothing but the KME's public signing key(s) (and its anchors)."""
    if export.get("format") != EXPORT_FORMAT:
        raise ValueError("not a QKMS audit export")
    by_version = {k.version: k for k in public_keys if k.purpose == "sign"}
    records = [AuditRecord.from_json(r) for r in export["records"]]
    checkpoints = [checkpoint_from_json(c) for c in export["checkpoints"]]

    def check(version: int, message: bytes, signature: bytes, context: bytes) -> bool:
        key = by_version.get(version)
        if key is None:
            return False
        return signer.verify(SignatureAlgorithm(key.algorithm), key.public_key, message, signature, context)

    report = verify_chain(records, checkpoints, check, window)
    keys = {v: k.public_key for v, k in by_version.items()}
    check_anchors(report, anchors, checkpoints, records, keys)
    return report
