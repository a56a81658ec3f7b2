"""Verification as an auditor runs it: a chain (read from the database or from an export) checked
against the anchors; the export and public-key file formats; the report as JSON.

``verify_export`` needs nothing but an export, the KME's public keys and optionally an anchor file
(``qkms audit verify --file``); ``kms.service.audit_queries.AuditService`` reads a live KME's audit
and checks it with the same functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kms.audit.anchors import Anchor, AnchorFile, AnchorFileError, anchor_problems
from kms.audit.chain import DEFAULT_WINDOW, TailWindow, VerificationReport, verify_chain
from kms.crypto.identity import PublicKeyInfo
from kms.crypto.pqc.base import SignatureAlgorithm, SignatureProvider
from kms.domain.audit_chain import AnyCheckpoint, AuditRecord, Checkpoint, checkpoint_from_json

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
