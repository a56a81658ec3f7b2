"""``sae.state``: a KME tells every other KME of the network that one of its SAEs was suspended,
resumed or revoked (DECISIONS.md D-39).

The message is signed, never MAC'd: it is a statement with consequences at the receiver (keys
destroyed) that the receiver may have to show a third party. It goes straight to adjacent KMEs and
through the trusted nodes to the others (``routed``), since a relayed key may be held at any KME of
the network. The receiver acts only on SAEs its bundle of the sender lists as the sender's own; what
it does is ``kms.service.peer_sae_states``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from kms.domain.saes import SaeState
from kms.peer.client import PeerError
from kms.peer.directory import PeerDirectory, remote_sae_fingerprint
from kms.peer.messages import MessageRejected, PeerMessage
from kms.peer.routed import RoutedMessages
from kms.service import peer_sae_states as states
from kms.service.peer_sae_states import SaeNotice
from kms.storage.database import Database

MESSAGE_TYPE = "sae.state"
MAX_NOTICES = 256


class SaeNotices:
    def __init__(
        self, db: Database, directory: PeerDirectory, routed: RoutedMessages, refresh_seconds: float = 0.1
    ) -> None:
        self.db = db
        self.directory = directory
        self.routed = routed
        # sae_registry.refresh_ms: how long every process here may still judge by the old registry.
        self.refresh_seconds = refresh_seconds

    def tell(self, notices: Sequence[SaeNotice]) -> dict[str, dict[str, Any]]:
        """Send ``notices`` to every KME in the directory; per KME what it did, or why it was not told."""
        body = {"saes": [n.body() for n in notices]}
        outcomes: dict[str, dict[str, Any]] = {}
        for kme_id in sorted(self.directory.peers):
            try:
                reply = self.routed.send(kme_id, MESSAGE_TYPE, body)
            except (PeerError, MessageRejected) as exc:
                reason = exc.reason if isinstance(exc, MessageRejected) else str(exc)
                outcomes[kme_id] = {"told": False, "error": reason[:300]}
                continue
            results = reply.get("reply", reply).get("results", [])
            outcomes[kme_id] = {"told": True, "results": results}
        return outcomes

    def resend(self, kme_id: str) -> int:
        """The leader's periodic re-send (``peering.sae_resend_seconds``): the state of every SAE of
        this KME that a ``qkms sae`` command changed, to every KME, so that a KME that was unreachable
        when told, or restored since, learns it. What changed anywhere is audited here
        (``sae.peer_told``); returns the number of SAE states some KME changed on it."""
        notices = states.notices_of(self.db, kme_id, every_changed=True)
        changed = 0
        for i in range(0, len(notices), MAX_NOTICES):
            chunk = notices[i : i + MAX_NOTICES]
            outcomes = self.tell(chunk)
            for notice in chunk:
                moved = {
                    peer: {"told": True, "results": [r]}
                    for peer, o in outcomes.items()
                    for r in o.get("results", [])
                    if r.get("sae_id") == notice.sae_id and r.get("changed")
                }
                if moved:
                    states.record_told(self.db, notice, moved)
                    changed += 1
        return changed

    def on_state(self, message: PeerMessage) -> dict[str, Any]:
        """``sae.state`` from an SAE's home KME: record it; after a revocation, wait until every process
        here judges by the new registry and sweep once more."""
        raw = message.body.get("saes")
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_NOTICES:
            raise MessageRejected(f"an sae.state message names 1 to {MAX_NOTICES} SAEs")
        notices = [SaeNotice.parse(b) for b in raw]
        for n in notices:
            if self.directory.home_of(n.sae_id) != message.sender:
                raise MessageRejected(f"SAE {n.sae_id} is not served by {message.sender}")
        fingerprints = {n.sae_id: remote_sae_fingerprint(message.sender, n.sae_id) for n in notices}
        applied = states.apply(self.db, message, message.sender, fingerprints, notices)
        revoked = [a for a in applied if a.changed and a.state is SaeState.REVOKED]
        if revoked:
            time.sleep(self.refresh_seconds + 0.05)
            late = {a.sae_id: states.sweep(self.db, message.sender, a.sae_id) for a in revoked}
            applied = [
                replace(a, keys_destroyed=a.keys_destroyed + late[a.sae_id][0],
                        redelivery_zeroised=a.redelivery_zeroised + late[a.sae_id][1])
                if a.sae_id in late else a
                for a in applied
            ]  # fmt: skip
        return {"results": [a.reply() for a in applied]}
