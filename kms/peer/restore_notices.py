"""``store.restored``: a KME restored from a backup tells each adjacent peer (DECISIONS.md D-39).

Signed, never MAC'd (a restored KME may hold no MAC keys, and the peer destroys pool pieces on its
word). Only adjacent peers hold pieces of blocks shared with the restored KME; what the peer does
is ``kms.service.peer_restored``.
"""

from __future__ import annotations

from typing import Any

from kms.peer.client import PeerClient, PeerError
from kms.peer.directory import PeerDirectory
from kms.peer.messages import PeerMessage
from kms.service import peer_restored
from kms.service.peer_restored import RestoreNotice
from kms.storage.database import Database

MESSAGE_TYPE = "store.restored"


def tell(client: PeerClient, directory: PeerDirectory, notice: RestoreNotice) -> dict[str, dict[str, Any]]:
    """Send ``notice`` to every adjacent KME; per KME what it retired, or why it was not told."""
    outcomes: dict[str, dict[str, Any]] = {}
    for peer in sorted(directory.adjacent(), key=lambda p: p.kme_id):
        try:
            reply = client.call(peer.kme_id, MESSAGE_TYPE, notice.body())
        except PeerError as exc:
            outcomes[peer.kme_id] = {"told": False, "error": str(exc)[:300]}
            continue
        outcomes[peer.kme_id] = {"told": True, **reply.body}
    return outcomes


class RestoredPeers:
    """The receiving end: a handler for ``PeerNetwork``'s dispatcher."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def on_restored(self, message: PeerMessage) -> dict[str, Any]:
        return peer_restored.apply(self.db, message, RestoreNotice.parse(message.body))
