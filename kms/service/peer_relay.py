"""Relay at a trusted node (docs/ARCHITECTURE.md, "Relay"): the unit behind a ``keys.record`` whose
target is further down the route.

The first hop's link bits *are* the key: this KME takes them from its mirror (removing the previous
hop's one-time pad), cuts as many bits of its link to the next hop, records the keys ``pre_active``
without material (with the route so far), and returns the entry to forward: the same entry with this
hop added, the new bits' places, and each key one-time-pad encrypted with them. ``kms.peer`` sends it
and settles the pending keys on the next hop's answer (``peer_ledger.PeerLedger.settle``, audited).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kms.domain.errors import PeerRequestRefused
from kms.domain.ledger import key_refs, one_time_pad
from kms.domain.lifecycle import KeyState
from kms.service.peer_context import PeerSite, Received
from kms.service.peer_records import Entry, PeerRecords
from kms.storage import pool_repository as pool


@dataclass(frozen=True)
class RelayHop:
    """The entry to forward and where to."""

    next_kme: str
    forward: dict[str, Any]


class PeerRelay:
    def __init__(self, site: PeerSite, records: PeerRecords) -> None:
        self.site = site
        self.records = records

    def take_and_cut(self, message: Received, entry: Entry) -> RelayHop:
        """One transaction: the keys from the previous hop's link, as many bits of the next hop's."""
        b = entry.body
        at = datetime.now(UTC)
        actor = f"kme:{message.sender}"
        events = pool.EventBatch(at)
        hops = list(b.get("hops") or [])
        with self.site.db.write() as conn:
            bits = self.records.take_entry(conn, message, entry, events, actor)
            nxt = entry.route[entry.here + 1]
            cut = pool.cut_keys(
                conn,
                self.site.envelope,
                target_kme_id=nxt,
                number=len(entry.key_ids),
                size_bits=entry.size,
                min_key_size=self.site.cfg.min_key_size,
                events=events,
                actor=actor,
            )
            if cut is None:
                raise PeerRequestRefused(
                    f"not enough key on the link from {self.site.kme_id} to {nxt} to relay"
                )
            hops.append(
                {"from": self.site.kme_id, "to": nxt, "links": sorted({c.link_id or "" for c in cut})}
            )
            pool.insert_reserved_keys(
                conn,
                self.site.envelope,
                [
                    pool.CutKey(k, None, c.block_id, c.bit_offset)
                    for k, c in zip(entry.key_ids, cut, strict=True)
                ],
                size_bits=entry.size,
                master_sae_id=str(b["master_SAE_ID"]),
                slave_sae_ids=entry.slaves,
                target_kme_id=entry.target,
                ttl=timedelta(seconds=self.site.cfg.reserved_ttl_seconds),
                policy=str(b["policy"]),
                suite=b.get("suite"),
                kem_exchange_id=None,
                at=at,
                state=KeyState.PRE_ACTIVE,
                keep_material=False,
                source_kme_id=entry.origin,
                route=json.dumps(hops),
            )
            events.flush(conn)
            forward = {
                **b,
                "hops": hops,
                "keys": key_refs(entry.key_ids, cut),
                "ciphertext": [
                    base64.b64encode(one_time_pad(k_bits, c.material or b"")).decode()
                    for k_bits, c in zip(bits, cut, strict=True)
                ],
            }
        return RelayHop(nxt, forward)
