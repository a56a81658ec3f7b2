"""The ledger a KME keeps for its peers (DECISIONS.md D-20): the units behind ``keys.record``,
``keys.record.batch`` and ``keys.cancel`` when the keys are for slaves here.

A ledger entry names, for each key_ID, bits of a piece the sender cuts; this KME takes exactly those
bits from its mirror of the piece (refusing any range already taken, zeroising what it hands out)
and records the keys ``reserved`` for its slaves, audited as ``keys.recorded`` — in one transaction
that also remembers the message against replay. A ``keys.cancel`` withdraws what the sender
discarded (``keys.withdrawn``). Relaying an entry at a trusted node is ``peer_relay``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from kms.domain.errors import PeerRequestRefused
from kms.domain.ledger import check_entry, one_time_pad, route_position
from kms.domain.policy import POLICY_FALLBACK
from kms.service import audit_recorder
from kms.service.group_commit import Unit, run_unit
from kms.service.peer_context import PeerSite, Received, check_link, remember
from kms.storage import mirror_repository as mirrors
from kms.storage import peer_repository as peers
from kms.storage import pool_repository as pool
from kms.storage.database import savepoint
from kms.storage.mirror_repository import BitRange

# What refuses one entry of a batch without refusing the others (LedgerConflict is a ValueError).
ENTRY_ERRORS = (PeerRequestRefused, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class Entry:
    """A checked ``keys.record`` entry: its body, route and this KME's place on it."""

    body: Mapping[str, Any]
    route: list[str]
    here: int
    key_ids: list[str]
    slaves: list[str]
    size: int

    @property
    def final(self) -> bool:
        return self.here == len(self.route) - 1

    @property
    def origin(self) -> str:
        return self.route[0]

    @property
    def target(self) -> str:
        return self.route[-1]


class PeerRecords:
    def __init__(self, site: PeerSite) -> None:
        self.site = site

    def check(self, sender: str, b: Mapping[str, Any]) -> Entry:
        """The pure checks of a ``keys.record`` entry, before any transaction."""
        route = [str(k) for k in b["route"]]
        here = route_position(route, self.site.kme_id, sender)
        key_ids, slaves, size = check_entry(self.site.registry, self.site.cfg.max_key_per_request, b)
        ciphertexts = b.get("ciphertext")
        if ciphertexts is not None and len(ciphertexts) != len(b["keys"]):
            raise PeerRequestRefused("one ciphertext per key is required on a relayed hop")
        return Entry(b, route, here, key_ids, slaves, size)

    def record(self, message: Received, entry: Entry) -> dict[str, Any]:
        """The entry's target is here: take its bits and record its keys for the slaves here."""
        b = entry.body
        at = datetime.now(UTC)
        actor = f"kme:{message.sender}"
        events = pool.EventBatch(at)
        hops = list(b.get("hops") or [])
        with self.site.db.write() as conn:
            bits = self.take_entry(conn, message, entry, events, actor)
            self.record_final(conn, b, entry.key_ids, bits, entry.size, entry.origin, entry.slaves, hops, at)
            events.flush(conn)
            audit_recorder.record(
                conn,
                actor,
                "keys.recorded",
                f"{b['master_SAE_ID']}->{entry.slaves[0]}",
                {
                    "key_IDs": entry.key_ids,
                    "origin": entry.origin,
                    "route": entry.route,
                    "slaves": entry.slaves,
                },
                at,
            )
        return {"recorded": len(entry.key_ids)}

    def record_batch(self, message: Received, entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Entries for slaves here, from the adjacent master KME, in a transaction of their own."""
        return run_unit(self.site.db, self.record_batch_unit(message, entries))

    def record_batch_unit(
        self, message: Received, entries: Sequence[Mapping[str, Any]]
    ) -> Unit[list[dict[str, Any]]]:
        """The unit of work of a ``keys.record.batch``, for the API's group commit
        (``kms.service.batcher``) or a transaction of its own: remembers the message, records each
        entry on its own savepoint so that one refused entry does not refuse the others, and returns
        one result per entry with one audit entry per recorded one."""

        def unit(conn: Connection) -> tuple[list[dict[str, Any]], list[audit_recorder.AuditEntry]]:
            at = datetime.now(UTC)
            actor = f"kme:{message.sender}"
            events = pool.EventBatch(at)
            results: list[dict[str, Any]] = []
            records: list[audit_recorder.AuditEntry] = []
            remember(conn, message)
            for b in entries:
                mark = len(events.rows)
                try:
                    with savepoint(conn):
                        key_ids, slaves = self._record_adjacent(conn, message.sender, b, events, actor, at)
                    results.append({"ok": True})
                    subject = f"{b['master_SAE_ID']}->{slaves[0]}"
                    records.append(
                        (actor, "keys.recorded", subject, {"key_IDs": key_ids, "origin": message.sender})
                    )
                except ENTRY_ERRORS as exc:
                    del events.rows[mark:]
                    reason = exc.reason if isinstance(exc, PeerRequestRefused) else str(exc)
                    results.append({"ok": False, "error": reason[:300]})
            events.flush(conn)
            return results, records

        return unit

    def _record_adjacent(
        self,
        conn: Connection,
        sender: str,
        b: Mapping[str, Any],
        events: pool.EventBatch,
        actor: str,
        at: datetime,
    ) -> tuple[list[str], list[str]]:
        """One entry of a batch, in the caller's savepoint: (key_IDs, slaves)."""
        if [str(k) for k in b["route"]] != [sender, self.site.kme_id]:
            raise PeerRequestRefused("a batched entry must go from the sender straight to this KME")
        key_ids, slaves, size = check_entry(self.site.registry, self.site.cfg.max_key_per_request, b)
        if b.get("policy") == POLICY_FALLBACK:
            if not b.get("kem"):
                raise PeerRequestRefused("a PQC-fallback entry needs an ML-KEM ciphertext")
            bits: list[bytes | None] = [None] * len(key_ids)
        else:
            bits = list(self.take(conn, sender, list(b["keys"]), size, events, actor))
        self.record_final(conn, b, key_ids, bits, size, sender, slaves, [], at)
        return key_ids, slaves

    def withdraw(
        self,
        message: Received,
        origin: str,
        key_ids: list[str],
        voided: tuple[str, str, int, str] | None,
    ) -> tuple[list[str], bool]:
        """Withdraw keys the sender discarded. If the cancel names the request that carried them and
        that request has not arrived yet, it is voided: remembered as seen, so that when it does
        arrive it is refused as a replay instead of recording keys its sender already discarded.
        Returns (the key_IDs withdrawn, whether the request was voided)."""
        at = datetime.now(UTC)
        actor = f"kme:{message.sender}"
        with self.site.db.write() as conn:
            remember(conn, message)
            overtook = voided is not None and peers.void_message(conn, message.sender, *voided, at)
            gone = peers.destroy_recorded(conn, origin, message.sender, key_ids, actor, at)
            if gone or overtook:
                detail: dict[str, Any] = {"key_IDs": gone}
                if overtook:
                    detail["never_recorded"] = key_ids
                audit_recorder.record(conn, actor, "keys.withdrawn", "peer", detail, at)
        return gone, overtook

    # -- within a unit's transaction ----------------------------------------------------------------
    def take_entry(
        self, conn: Connection, message: Received, entry: Entry, events: pool.EventBatch, actor: str
    ) -> list[bytes]:
        """Remember the message, take the entry's bits from the mirror and, on a relayed hop, remove
        the one-time pad the sender put on them: the keys themselves."""
        remember(conn, message)
        bits = self.take(conn, message.sender, entry.body["keys"], entry.size, events, actor)
        ciphertexts = entry.body.get("ciphertext")
        if ciphertexts is not None:
            bits = [one_time_pad(k, base64.b64decode(c)) for k, c in zip(bits, ciphertexts, strict=True)]
        return bits

    def take(
        self,
        conn: Connection,
        sender: str,
        entries: Sequence[Mapping[str, Any]],
        size: int,
        events: pool.EventBatch,
        actor: str,
    ) -> list[bytes]:
        """Exactly the bits each key ref names, from this KME's mirror of the sender's pieces."""
        by_link: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            by_link.setdefault(str(e["link_id"]), []).append(i)
        out: list[bytes] = [b""] * len(entries)
        for link_id, idx in by_link.items():
            state = check_link(conn, link_id, sender)
            if state != "active":
                raise PeerRequestRefused(f"link {link_id} is {state} here")
            got = mirrors.take_mirrored(
                conn,
                self.site.envelope,
                link_id,
                sender,
                [BitRange(str(entries[i]["block_id"]), int(entries[i]["offset"]), size) for i in idx],
                self.site.cfg.min_key_size,
                events,
                actor,
            )
            for i, (bits, _, _) in zip(idx, got, strict=True):
                out[i] = bits
        return out

    def record_final(
        self,
        conn: Connection,
        b: Mapping[str, Any],
        key_ids: list[str],
        bits: Sequence[bytes | None],
        size: int,
        origin: str,
        slaves: list[str],
        hops: list[Any],
        at: datetime,
    ) -> None:
        """Store the keys ``reserved`` for the slaves here (with their ML-KEM exchange and route)."""
        exchange_id = None
        kem = b.get("kem")
        if kem:
            own = self.site.identity.public_key("kem", int(kem["key_version"]))
            if hashlib.sha384(own.public_key).hexdigest() != kem["public_key_sha384"]:
                raise PeerRequestRefused("the ML-KEM ciphertext was made for another public key of this KME")
            exchange_id = pool.insert_kem_exchange(
                conn,
                own.algorithm,
                self.site.kme_id,
                own.version,
                kem["public_key_sha384"],
                base64.b64decode(kem["ciphertext"]),
                at,
            )
        pool.insert_reserved_keys(
            conn,
            self.site.envelope,
            [pool.CutKey(k, m) for k, m in zip(key_ids, bits, strict=True)],
            size_bits=size,
            master_sae_id=str(b["master_SAE_ID"]),
            slave_sae_ids=slaves,
            target_kme_id=self.site.kme_id,
            ttl=timedelta(seconds=self.site.cfg.reserved_ttl_seconds),
            policy=str(b["policy"]),
            suite=b.get("suite"),
            kem_exchange_id=exchange_id,
            at=at,
            source_kme_id=origin,
            route=json.dumps(hops) if len(hops) > 1 else None,
        )
