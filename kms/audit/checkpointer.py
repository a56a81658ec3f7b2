"""Signs audit checkpoints with the KME's ML-DSA key, off the delivery hot path, and anchors them.

Each checkpoint extends the checkpoint chain (``kms.audit.chain.Checkpoint``) and is appended to the
anchor file after its commit. Before signing, the writer checks that the database still holds what
it signed and anchored before — the last anchored checkpoint, unchanged, and the record it pins — so
a KME whose database was rewritten under it refuses to sign the rewrite (``AuditIntegrityError``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from kms.audit.anchors import Anchor, AnchorBook, AnchorFile
from kms.audit.chain import GENESIS, Checkpoint, chain_problems
from kms.crypto.identity import KmeIdentity
from kms.storage import audit_repository as audit
from kms.storage.database import Database


class AuditIntegrityError(RuntimeError):
    """The database's audit no longer matches what this KME signed and anchored; each problem named."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class CheckpointWriter:
    def __init__(self, db: Database, identity: KmeIdentity, kme_id: str, anchors: AnchorFile | None) -> None:
        self.db = db
        self.identity = identity
        self.kme_id = kme_id
        self.anchors = anchors

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
                    _check_pinned(conn, last)
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
        anchored = book.last
        if anchored is None:
            if last is not None:
                raise AuditIntegrityError(
                    [
                        f"the anchor file {book.path} is empty but the database holds checkpoints up to"
                        f" #{last.number}: restore the anchor file, or run `qkms audit verify` and then"
                        " `qkms audit adopt-anchors` if the file was lost"
                    ]
                )
            return
        if last is None or last.number < anchored.number:
            raise AuditIntegrityError(
                [
                    f"checkpoint #{anchored.number} (seq {anchored.from_seq}..{anchored.upto_seq}) is anchored in"
                    f" {book.path} but the database's last checkpoint is #{last.number if last else 0} (deleted)"
                ]
            )
        newer = audit.chained_checkpoints(conn, anchored.number - 1)
        if not newer or newer[0].hash() != anchored.hash:
            raise AuditIntegrityError(
                [f"checkpoint #{anchored.number} differs from its anchor in {book.path} (altered or forged)"]
            )
        problems = chain_problems(newer[1:], after=newer[0])
        for cp in newer[1:]:
            if not self.identity.verify(
                cp.key_version, cp.message(), bytes.fromhex(cp.signature), cp.context
            ):
                problems.append(f"checkpoint #{cp.number} has an invalid signature (forged or altered)")
        if problems:
            raise AuditIntegrityError(problems)
        book.append([Anchor.of(cp, self._public_key(cp.key_version)) for cp in newer[1:]])


def _check_pinned(conn: Connection, last: Checkpoint) -> None:
    """The record the last checkpoint pins is still there, unchanged, and the next one chains to it."""
    rec = audit.record_at(conn, last.upto_seq)
    if rec is None or rec.hash != last.head_hash:
        raise AuditIntegrityError(
            [
                f"record seq {last.upto_seq} no longer matches checkpoint #{last.number} (rewritten or truncated)"
            ]
        )
    nxt = audit.record_at(conn, last.upto_seq + 1)
    if nxt is not None and nxt.prev_hash != last.head_hash:
        raise AuditIntegrityError(
            [
                f"record seq {nxt.seq} does not chain to seq {last.upto_seq}, pinned by checkpoint #{last.number}"
            ]
        )


def write_checkpoint(
    db: Database, identity: KmeIdentity, kme_id: str, anchors: AnchorFile | None = None
) -> Checkpoint | None:
    return CheckpointWriter(db, identity, kme_id, anchors).write()
