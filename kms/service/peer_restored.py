"""A KME restored from a backup, and its adjacent peers (DECISIONS.md D-39; D-28 across sites).

At the restored KME, ``qkms restore`` (or ``qkms peer tell-restored`` later) tells each adjacent peer
when it was restored and from what snapshot (``kms.peer.restore_notices``, a signed
``store.restored``), and records who was told (``backup.peers_told``). At the peer, :func:`apply`
retires in one transaction, with the message's replay check, every piece it holds of blocks shared
with the restored KME and confirmed before the restore (``kms.storage.peer_restore_repository``),
audited ``peer.restored`` with the counts. Keys the restored KME made for slaves here stay
deliverable: their master already holds them, and their bits are in no piece anyone will cut again.
The peer answers with what the restored KME had told it about its SAEs, so that a revocation the
snapshot predates is not undone by the restore (``peer_sae_states.adopt_after_restore``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kms.service import audit_recorder
from kms.service.peer_context import Received, remember
from kms.service.peer_sae_states import SaeNotice, utc
from kms.storage import peer_restore_repository as restores
from kms.storage import pool_repository as pool
from kms.storage import registry_repository as registry
from kms.storage.database import Database


class NotRestored(Exception):
    """This KME has no restore on record to tell its peers about."""


@dataclass(frozen=True)
class RestoreNotice:
    restored_at: datetime  # when the restore fenced the store (this KME's clock)
    backup: str
    backup_created_at: str | None
    snapshot_head_seq: int

    def body(self) -> dict[str, Any]:
        return {
            "restored_at": self.restored_at.isoformat(),
            "backup": self.backup,
            "backup_created_at": self.backup_created_at,
            "snapshot_head_seq": self.snapshot_head_seq,
        }

    @classmethod
    def parse(cls, b: dict[str, Any]) -> RestoreNotice:
        restored_at = datetime.fromisoformat(str(b["restored_at"]))
        if restored_at.tzinfo is None:
            raise ValueError("restored_at must carry its time zone")
        created = b.get("backup_created_at")
        return cls(restored_at, str(b["backup"])[:256], None if created is None else str(created)[:64],
                   int(b["snapshot_head_seq"]))  # fmt: skip


def notice_of(db: Database, kme_id: str) -> RestoreNotice:
    """This KME's newest restore, from its ``backup.restored`` audit record."""
    with db.read() as conn:
        record = restores.last_restore(conn, kme_id)
    if record is None:
        raise NotRestored(f"KME {kme_id} has no restore on record (no backup.restored audit record)")
    at = datetime.fromisoformat(record.at)
    d = record.data
    return RestoreNotice(
        at if at.tzinfo else at.replace(tzinfo=UTC),
        str(d.get("backup", "")),
        d.get("backup_created_at"),
        int(d.get("snapshot_head_seq", 0)),
    )


def apply(db: Database, message: Received, notice: RestoreNotice) -> dict[str, Any]:
    """At the peer: retire the pieces shared with the restored sender (see the module docstring)."""
    now = datetime.now(UTC)
    actor = f"kme:{message.sender}"
    events = pool.EventBatch(now)
    reason = f"KME {message.sender} was restored from a backup at {notice.restored_at.isoformat()}"
    with db.write() as conn:
        remember(conn, message)
        retired = restores.retire_shared(conn, message.sender, notice.restored_at, actor, reason, events)
        kept = restores.keys_recorded_from(conn, message.sender)
        events.flush(conn)
        links = {
            r.link_id: {"own_pieces": r.own_pieces, "mirrored_pieces": r.mirrored_pieces, "bits": r.bits}
            for r in retired
        }
        # What the restored KME told this one about its SAEs: a revocation after its snapshot is
        # lost there and known here (``peer_sae_states.adopt_after_restore``).
        told = [
            SaeNotice(r.sae_id, r.state, r.reason or "", utc(r.updated_at)).body()
            for r in registry.sae_records(conn)
            if r.managed_by == "peer" and r.kme_id == message.sender
        ]
        data = {**notice.body(), "links": links, "keys_kept": kept, "sae_states": len(told)}
        audit_recorder.record(conn, actor, "peer.restored", message.sender, data, now)
    return {"links": links, "keys_kept": kept, "sae_states": told}


def record_told(
    db: Database, kme_id: str, notice: RestoreNotice, outcomes: dict[str, dict[str, Any]]
) -> None:
    """At the restored KME: which peers were told and what each retired (``backup.peers_told``)."""
    data = {"restored_at": notice.restored_at.isoformat(), "peers": outcomes}
    audit_recorder.append_alone(db, [("operator", "backup.peers_told", kme_id, data)])
