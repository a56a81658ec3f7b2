"""The MAC keys neighbours established with this KME (DECISIONS.md D-35), for every process of it.

A ``session.key`` message lands on one process of a KME; the next messages under that key may land
on any other (``--workers N`` share the port; scale-out processes share the database). The key is
therefore stored sealed under the KEK in one transaction with the message's replay record, and each
process keeps the keys it has opened in memory. A KEK rotation re-seals stored keys like any sealed
record. A key that cannot be found or opened (older than a day, a database restored) is simply
unknown: the sender establishes a new one.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from kms.crypto.envelope import Envelope, MaterialIntegrityError
from kms.service.peer_context import Received, remember
from kms.storage import peer_mac_repository as repo
from kms.storage.database import Database

KEY_LIFETIME = timedelta(hours=24)  # stored keys older than this are forgotten (senders renew hourly)


class PeerMacKeys:
    def __init__(self, db: Database, envelope: Envelope) -> None:
        self.db = db
        self.envelope = envelope
        self._cache: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def accept(self, message: Received, key_id: str, key: bytes) -> None:
        """Keep a key a neighbour established (the ``session.key`` message remembered with it)."""
        at = datetime.now(UTC)
        writer = self.envelope.writer()
        row = repo.row_id(message.sender, key_id)
        sealed = writer.seal(key, repo.mac_key_aad(row))
        with self.db.write() as conn:
            remember(conn, message)
            repo.store_key(conn, row, sealed, writer.kek_id, at)
            repo.forget_created_before(conn, at - KEY_LIFETIME)
        with self._lock:
            self._cache[(message.sender, key_id)] = key

    def lookup(self, sender: str, key_id: str) -> bytes | None:
        with self._lock:
            key = self._cache.get((sender, key_id))
        if key is not None:
            return key
        row = repo.row_id(sender, key_id)
        with self.db.read() as conn:
            found = repo.load_key(conn, row)
        if found is None:
            return None
        try:
            key = self.envelope.open(found[0], repo.mac_key_aad(row), found[1])
        except MaterialIntegrityError:
            return None
        with self._lock:
            self._cache[(sender, key_id)] = key
        return key
