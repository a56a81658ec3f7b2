"""The KME's identity-key versions kept in the database: ``KmeIdentity``'s store
(``kms.crypto.identity.IdentityKeyStore``). Creation, rotation and destruction are each one
transaction; rotation and destruction are audited (``identity.rotated``, ``identity.destroyed``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from kms.crypto.identity import KeyMaker, PublicKeyInfo
from kms.service import audit_recorder
from kms.storage import identity_repository as keys
from kms.storage.database import Database


class IdentityKeys:
    """``kme_keys`` for one KME (reads open their own short read transaction)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def active(self, purpose: str) -> PublicKeyInfo | None:
        with self.db.read() as conn:
            return keys.active_key(conn, purpose)

    def public_keys(self) -> list[PublicKeyInfo]:
        with self.db.read() as conn:
            return keys.public_keys(conn)

    def sealed_seed(self, purpose: str, version: int) -> bytes | None:
        with self.db.read() as conn:
            return keys.sealed_seed(conn, purpose, version)

    def create_missing(self, purposes: Sequence[str], make: KeyMaker) -> None:
        """Version 1 of each purpose that has no active key (first start)."""
        with self.db.write() as conn:
            for purpose in purposes:
                if keys.active_key(conn, purpose) is None:
                    keys.insert_key(conn, make(purpose, keys.next_version(conn, purpose)), datetime.now(UTC))

    def rotate(self, purpose: str, make: KeyMaker, actor: str) -> int:
        """Retire the active version and store a new one; returns its number."""
        now = datetime.now(UTC)
        with self.db.write() as conn:
            keys.retire_active(conn, purpose, now)
            version = keys.next_version(conn, purpose)
            keys.insert_key(conn, make(purpose, version), datetime.now(UTC))
            audit_recorder.record(conn, actor, "identity.rotated", purpose, {"version": version}, at=now)
        return version

    def destroy_retired(self, purpose: str, version: int, actor: str) -> bool:
        now = datetime.now(UTC)
        with self.db.write() as conn:
            done = keys.destroy_retired(conn, purpose, version)
            if done:
                audit_recorder.record(
                    conn, actor, "identity.destroyed", purpose, {"version": version}, at=now
                )
        return done
