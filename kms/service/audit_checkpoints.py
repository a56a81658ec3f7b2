"""Signing audit checkpoints: the use case the server's checkpoint thread, the CLI and the start-up
check call, off the delivery hot path.

Each checkpoint extends the checkpoint chain (``kms.domain.audit_chain.Checkpoint``), is inserted in
a transaction of its own and is appended to the anchor file after its commit. Before signing, the
writer checks (``kms.audit.integrity``) that the database still holds what it signed and anchored
before — the last anchored checkpoint, unchanged, and the record it pins — so a KME whose database
was rewritten under it refuses to sign the rewrite (``AuditIntegrityError``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from kms.audit.anchors import Anchor, AnchorBook, AnchorFile, anchor_path
from kms.audit.chain import TailWindow
from kms.audit.integrity import AuditIntegrityError, anchored_in_database, pinned_problems, unanchored
from kms.config import KmsSettings
from kms.crypto.identity import KmeIdentity
from kms.domain.audit_chain import GENESIS, Checkpoint
from kms.storage import audit_repository as audit
from kms.storage.database import Database


def anchor_file(settings: KmsSettings) -> AnchorFile:
    """The KME's own anchor file (``[audit] anchor_dir``)."""
    return AnchorFile(anchor_path(settings.config_dir, settings.audit.anchor_dir, settings.kme.id))


def tail_window(settings: KmsSettings) -> TailWindow:
    """How many records, over how long, may follow the last checkpoint (``[audit]``)."""
    return TailWindow(settings.audit.max_unsigned_records, settings.audit.max_unsigned_seconds)


class CheckpointWriter:
    def __init__(self, db: Database, identity: KmeIdentity, kme_id: str, anchors: AnchorFile | None) -> None:
        self.db = db
        self.identity = identity
        self.kme_id = kme_id
        self.anchors = anchors

    @classmethod
    def for_settings(cls, db: Database, identity: KmeIdentity, settings: KmsSettings) -> CheckpointWriter:
        """Anchoring in the KME's own anchor file."""
        return cls(db, identity, settings.kme.id, anchor_file(settings))

    def due(self, min_records: int, max_age_seconds: float) -> bool:
        """Unsigned records: at least ``min_records``, or any once the last checkpoint is that old."""
        with self.db.read() as conn:
            seq, _ = audit.head(conn)
            last = audit.last_chained_checkpoint(conn)
        signed = last.upto_seq if last else 0
        if seq <= signed:
            return False
        if seq - signed >= min_records or last is None:
            return True
        at = datetime.fromisoformat(last.at)
        return (datetime.now(UTC) - at).total_seconds() >= max_age_seconds

    def write(self) -> Checkpoint | None:
        """Sign and anchor the head if it moved; None if there was nothing to sign (or another
        process just did)."""
        with self._book() as book:
            with self.db.read() as conn:
                audit.snapshot(conn)
                seq, head_hash = audit.head(conn)
                last = audit.last_chained_checkpoint(conn)
                if book is not None:
                    self._catch_up(conn, book, last)
                signed = last.upto_seq if last else 0
                if seq < signed:
                    raise AuditIntegrityError(
                        [
                            f"the audit head is seq {seq}, below checkpoint #{last.number if last else 0}'s seq {signed}"
                        ]
                    )
                if seq == signed:
                    return None
                if last is not None:
                    problems = pinned_problems(
                        last, audit.record_at(conn, last.upto_seq), audit.record_at(conn, last.upto_seq + 1)
                    )
                    if problems:
                        raise AuditIntegrityError(problems)
            cp = self._sign(last, seq, head_hash)
            try:
                with self.db.write() as conn:
                    current = audit.last_chained_checkpoint(conn)
                    if (current.number if current else 0) != (last.number if last else 0):
                        return None  # another process of this KME signed first
                    audit.insert_checkpoint(conn, cp)
            except IntegrityError:
                return None  # the same race on PostgreSQL, settled by the unique number
            if book is not None:
                book.append([Anchor.of(cp, self._public_key(cp.key_version))])
            return cp

    @contextmanager
    def _book(self) -> Iterator[AnchorBook | None]:
        if self.anchors is None:
            yield None
            return
        with self.anchors.locked() as book:
            yield book

    def _public_key(self, version: int) -> bytes:
        return self.identity.public_key("sign", version).public_key

    def _sign(self, last: Checkpoint | None, seq: int, head_hash: str) -> Checkpoint:
        while True:
            info = self.identity.active_public("sign")
            unsigned = Checkpoint(
                (last.number + 1) if last else 1,
                last.hash() if last else GENESIS.hex(),
                (last.upto_seq + 1) if last else 1,
                seq,
                head_hash,
                self.kme_id,
                info.version,
                info.algorithm,
                datetime.now(UTC).isoformat(),
                "",
            )
            version, _, signature = self.identity.sign(unsigned.message(), unsigned.context)
            if version == info.version:  # else rotated in between: sign again with the version named inside
                return dataclasses.replace(unsigned, signature=signature.hex())

    def _catch_up(self, conn: Connection, book: AnchorBook, last: Checkpoint | None) -> None:
        """The last anchor must still be in the database, unchanged; checkpoints committed after it
        (a crash between commit and anchor) are checked and anchored now."""
        path, anchored = str(book.path), book.last
        anchored_in_database(path, anchored, last)
        if anchored is None:
            return
        newer = audit.chained_checkpoints(conn, anchored.number - 1)
        pending = unanchored(path, anchored, newer, self.identity.verify)
        book.append([Anchor.of(cp, self._public_key(cp.key_version)) for cp in pending])


def write_checkpoint(
    db: Database, identity: KmeIdentity, kme_id: str, anchors: AnchorFile | None = None
) -> Checkpoint | None:
    return CheckpointWriter(db, identity, kme_id, anchors).write()
