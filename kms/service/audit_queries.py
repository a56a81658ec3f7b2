"""The audit read side as a use case: a key's provenance, the records, the checkpoints, the public
keys, verification of the live chain (against the anchor file) and the export. The auditor API
(``kms.api.routes.audit``), ``qkms audit`` and ``qkms keys export-public`` call it; the checks
themselves are ``kms.audit``'s."""

from __future__ import annotations

from typing import Any

from kms.audit.anchors import AnchorFile
from kms.audit.chain import DEFAULT_WINDOW, TailWindow, VerificationReport, verify_chain
from kms.audit.verification import (
    EXPORT_FORMAT,
    PUBLIC_KEYS_FORMAT,
    check_anchors,
    read_anchor_file,
    report_json,
)
from kms.config import KmsSettings
from kms.crypto.identity import KmeIdentity
from kms.domain.audit_chain import AnyCheckpoint
from kms.service.audit_checkpoints import anchor_file, tail_window
from kms.storage import audit_repository as audit
from kms.storage.database import Database
from kms.storage.provenance_queries import key_provenance


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
