"""The ledger this KME keeps for its peers (DECISIONS.md D-20): ``keys.record``,
``keys.record.batch`` and ``keys.cancel`` as messages.

An entry for slaves here is recorded by ``kms.service.peer_records``; at a trusted node the entry is
not for a local slave: ``kms.service.peer_relay`` takes the key from the previous hop's link and pads
it with as many bits of the next hop's, and this module forwards it and settles the pending keys on
the next hop's answer (``forward``: ``LedgerMaster.send_and_settle``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kms.domain.errors import ServiceUnavailable
from kms.domain.ledger import MAX_BATCH_ENTRIES, voided_request
from kms.peer.messages import MessageRejected, PeerMessage
from kms.service.group_commit import Unit
from kms.service.peer_records import PeerRecords
from kms.service.peer_relay import PeerRelay

Forward = Callable[[str, dict[str, Any], list[str], str, str], None]
"""Send an entry to the next hop and settle its pending keys (peer, entry, key_IDs, actor, subject)."""


class LedgerPeer:
    def __init__(
        self, records: PeerRecords, relay: PeerRelay, forward: Forward, max_key_per_request: int
    ) -> None:
        self.records = records
        self.relay = relay
        self.forward = forward
        self.max_key_per_request = max_key_per_request

    def on_record(self, message: PeerMessage) -> dict[str, Any]:
        entry = self.records.check(message.sender, message.body)
        if entry.final:
            return self.records.record(message, entry)
        hop = self.relay.take_and_cut(message, entry)
        actor = f"kme:{message.sender}"
        try:
            self.forward(
                hop.next_kme, hop.forward, entry.key_ids, actor, f"relay {entry.origin}->{entry.target}"
            )
        except ServiceUnavailable as exc:
            raise MessageRejected(f"relay to {hop.next_kme} failed: {exc.message}") from None
        return {"recorded": len(entry.key_ids), "relayed_to": hop.next_kme}

    def on_record_batch(self, message: PeerMessage) -> dict[str, Any]:
        """Entries for slaves here, from the adjacent master KME; one result per entry."""
        return {"results": self.records.record_batch(message, _batch_entries(message))}

    def record_batch_unit(self, message: PeerMessage) -> Unit[list[dict[str, Any]]]:
        """``keys.record.batch`` as a unit of work for the API's group commit: the peer endpoint
        runs it with the SAEs' own requests (``kms.api.routes.peer``); its value is the results."""
        return self.records.record_batch_unit(message, _batch_entries(message))

    def on_cancel(self, message: PeerMessage) -> dict[str, Any]:
        """Withdraw keys the sender discarded, and void the request that carried them if it has not
        arrived yet (``PeerRecords.withdraw``)."""
        key_ids = [str(uuid.UUID(str(k))) for k in message.body["key_IDs"]][: self.max_key_per_request]
        voided = voided_request(message.body.get("message"))
        gone, overtook = self.records.withdraw(message, str(message.body["origin"]), key_ids, voided)
        return {"withdrawn": len(gone), "voided": overtook}


def _batch_entries(message: PeerMessage) -> list[Any]:
    entries = list(message.body["entries"])
    if not entries or len(entries) > MAX_BATCH_ENTRIES:
        raise MessageRejected("a batch holds 1 to 256 entries")
    return entries
