"""SQL for the key pool: storing blocks, cutting keys, serving and expiring them.

Every function runs inside a transaction the caller opened (``Database.write``), so a request either
happens whole or not at all. Reservation locks pool blocks with ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL (concurrent requests take different blocks) and falls back to a waiting lock before
declaring the pool short; on SQLite the write transaction itself is exclusive.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, insert, select, update

from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import KeyState, check_transition
from kms.storage.schema import kem_exchanges, key_blocks, key_recipients, keys, lifecycle_events, links


@dataclass(frozen=True, repr=False)
class CutKey:
    """A key cut from the pool (or, for a PQC-fallback key, no pool bits: block_id None)."""

    key_id: str
    material: bytes | None
    block_id: int | None = None
    bit_offset: int | None = None


@dataclass
class EventBatch:
    """Lifecycle events collected during one transaction and inserted with one statement."""

    at: datetime
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        kind: str,
        subject_id: str,
        current: KeyState | None,
        target: KeyState,
        actor: str,
        reason: str | None = None,
    ) -> None:
        if current != target:
            check_transition(current, target)
        self.rows.append(
            {
                "subject_kind": kind,
                "subject_id": subject_id,
                "from_state": current.value if current else None,
                "to_state": target.value,
                "actor": actor,
                "reason": reason,
                "at": self.at,
            }
        )

    def flush(self, conn: Connection) -> None:
        if self.rows:
            conn.execute(insert(lifecycle_events), self.rows)
            self.rows = []


def block_aad(link_id: str, source_block_id: str, source_offset: int, next_bit: int) -> bytes:
    return f"qkms/block/{link_id}/{source_block_id}/{source_offset}/{next_bit}".encode()


def key_aad(key_id: str) -> bytes:
    return f"qkms/key/{key_id}/reserved".encode()


def utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True, repr=False)
class StoragePiece:
    source_block_id: str
    source_offset_bits: int
    material: bytes


def store_block_pieces(
    conn: Connection,
    envelope: Envelope,
    link_id: str,
    pieces: Sequence[StoragePiece],
    provenance: dict[str, Any],
    state: KeyState,
    events: EventBatch,
    actor: str,
) -> int:
    """Insert pool blocks in ``state``: ``active`` for a local link, ``pre_active`` until a peer
    confirms, ``suspended`` while the link is suspended."""
    rows = []
    for piece in pieces:
        rows.append(
            {
                "link_id": link_id,
                "source_block_id": piece.source_block_id,
                "source_offset_bits": piece.source_offset_bits,
                "bit_length": len(piece.material) * 8,
                "next_bit": 0,
                "state": state.value,
                "material": envelope.seal(
                    piece.material,
                    block_aad(link_id, piece.source_block_id, piece.source_offset_bits, 0),
                ),
                "kek_id": envelope.kek_id,
                "provenance": provenance,
                "received_at": events.at,
            }
        )
        subject = f"{link_id}/{piece.source_block_id}@{piece.source_offset_bits}"
        events.add("block", subject, None, KeyState.PRE_ACTIVE, actor, "received from adapter")
        if state is not KeyState.PRE_ACTIVE:
            events.add("block", subject, KeyState.PRE_ACTIVE, state, actor, "local link")
    if rows:
        conn.execute(insert(key_blocks), rows)
    return len(rows)


def stored_bits_by_link(conn: Connection) -> dict[str, int]:
    """Unserved bits held in active blocks, per link."""
    stmt = (
        select(
            key_blocks.c.link_id, func.coalesce(func.sum(key_blocks.c.bit_length - key_blocks.c.next_bit), 0)
        )
        .where(key_blocks.c.state == KeyState.ACTIVE.value)
        .group_by(key_blocks.c.link_id)
    )
    return {row[0]: int(row[1]) for row in conn.execute(stmt)}


def count_available_keys(conn: Connection, target_kme_id: str, key_size: int) -> int:
    """Keys of ``key_size`` bits that the active pool toward ``target_kme_id`` could serve now."""
    stmt = (
        select(func.coalesce(func.sum((key_blocks.c.bit_length - key_blocks.c.next_bit) / key_size), 0))
        .select_from(key_blocks.join(links, links.c.id == key_blocks.c.link_id))
        .where(
            links.c.peer_kme_id == target_kme_id,
            links.c.state == "active",
            key_blocks.c.state == KeyState.ACTIVE.value,
        )
    )
    return int(conn.execute(stmt).scalar_one())


def _candidate_block(conn: Connection, target_kme_id: str, size_bits: int, skip_locked: bool) -> Any:
    stmt = (
        select(
            key_blocks.c.id,
            key_blocks.c.link_id,
            key_blocks.c.source_block_id,
            key_blocks.c.source_offset_bits,
            key_blocks.c.bit_length,
            key_blocks.c.next_bit,
            key_blocks.c.material,
        )
        .select_from(key_blocks.join(links, links.c.id == key_blocks.c.link_id))
        .where(
            links.c.peer_kme_id == target_kme_id,
            links.c.state == "active",
            key_blocks.c.state == KeyState.ACTIVE.value,
            key_blocks.c.bit_length - key_blocks.c.next_bit >= size_bits,
        )
        .order_by(key_blocks.c.id)
        .limit(1)
        .with_for_update(skip_locked=skip_locked, of=key_blocks)
    )
    return conn.execute(stmt).first()


def cut_keys(
    conn: Connection,
    envelope: Envelope,
    *,
    target_kme_id: str,
    number: int,
    size_bits: int,
    min_key_size: int,
    events: EventBatch,
    actor: str,
) -> list[CutKey] | None:
    """Cut ``number`` keys of ``size_bits`` from the pool, or return None if the pool is short.

    On None the caller must roll back (or to a savepoint): blocks may already have been cut.
    """
    size_bytes = size_bits // 8
    cut: list[CutKey] = []
    for skip_locked in (True, False):
        while len(cut) < number:
            block = _candidate_block(conn, target_kme_id, size_bits, skip_locked)
            if block is None:
                break
            remainder = envelope.open(
                block.material,
                block_aad(block.link_id, block.source_block_id, block.source_offset_bits, block.next_bit),
            )
            take = min(number - len(cut), len(remainder) // size_bytes)
            cut.extend(
                CutKey(
                    str(uuid.uuid4()),
                    remainder[i * size_bytes : (i + 1) * size_bytes],
                    block.id,
                    block.next_bit + i * size_bits,
                )
                for i in range(take)
            )
            _advance_block(conn, envelope, block, remainder[take * size_bytes :], min_key_size, events, actor)
        if len(cut) >= number:
            break
    return cut if len(cut) >= number else None


def fallback_keys(number: int) -> list[CutKey]:
    """Key IDs for PQC-fallback keys: no pool bits; the material is derived from ML-KEM."""
    return [CutKey(str(uuid.uuid4()), None) for _ in range(number)]


def insert_kem_exchange(
    conn: Connection,
    algorithm: str,
    target_kme_id: str,
    key_version: int,
    public_key_sha384: str,
    ciphertext: bytes,
    at: datetime,
) -> int:
    result = conn.execute(
        insert(kem_exchanges).values(
            algorithm=algorithm,
            target_kme_id=target_kme_id,
            kem_key_version=key_version,
            public_key_sha384=public_key_sha384,
            ciphertext=ciphertext,
            created_at=at,
        )
    )
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


def insert_reserved_keys(
    conn: Connection,
    envelope: Envelope,
    cut: Sequence[CutKey],
    *,
    size_bits: int,
    master_sae_id: str,
    slave_sae_ids: Sequence[str],
    target_kme_id: str,
    ttl: timedelta,
    policy: str,
    suite: str | None,
    kem_exchange_id: int | None,
    events: EventBatch,
) -> None:
    """Record freshly cut keys as ``reserved`` for their slaves; QKD material is sealed per key."""
    now = events.at
    actor = f"sae:{master_sae_id}"
    key_rows = []
    for c in cut:
        key_rows.append(
            {
                "key_id": c.key_id,
                "block_id": c.block_id,
                "bit_offset": c.bit_offset,
                "size_bits": size_bits,
                "state": KeyState.RESERVED.value,
                "master_sae_id": master_sae_id,
                "slave_sae_id": slave_sae_ids[0],
                "target_kme_id": target_kme_id,
                "policy": policy,
                "suite": suite,
                "kem_exchange_id": kem_exchange_id,
                "material": envelope.seal(c.material, key_aad(c.key_id)) if c.material is not None else None,
                "kek_id": envelope.kek_id,
                "created_at": now,
                "expires_at": now + ttl,
            }
        )
        events.add(
            "key", c.key_id, KeyState.ACTIVE, KeyState.RESERVED, actor, f"{policy} for {slave_sae_ids[0]}"
        )
    conn.execute(insert(keys), key_rows)
    conn.execute(
        insert(key_recipients), [{"key_id": c.key_id, "sae_id": s} for c in cut for s in slave_sae_ids]
    )


def _advance_block(
    conn: Connection,
    envelope: Envelope,
    block: Any,
    rest: bytes,
    min_key_size: int,
    events: EventBatch,
    actor: str,
) -> None:
    """Move a block's cursor past the cut bits and re-seal what is left, or retire it."""
    next_bit = block.bit_length - len(rest) * 8
    values: dict[str, Any] = {"next_bit": next_bit}
    if len(rest) * 8 < min_key_size:
        values["state"] = KeyState.EXHAUSTED.value
        values["material"] = None
        subject = f"{block.link_id}/{block.source_block_id}@{block.source_offset_bits}"
        reason = (
            f"fully cut; {len(rest) * 8} trailing bits below min_key_size zeroised" if rest else "fully cut"
        )
        events.add("block", subject, KeyState.ACTIVE, KeyState.EXHAUSTED, actor, reason)
    else:
        values["material"] = envelope.seal(
            rest, block_aad(block.link_id, block.source_block_id, block.source_offset_bits, next_bit)
        )
    conn.execute(update(key_blocks).where(key_blocks.c.id == block.id).values(**values))


@dataclass(frozen=True, repr=False)
class StoredKey:
    key_id: str
    master_sae_id: str
    slave_sae_id: str
    target_kme_id: str
    state: str
    policy: str
    suite: str | None
    kem_exchange_id: int | None
    size_bits: int
    expires_at: datetime
    material: bytes | None
    recipients: dict[str, datetime | None]


def load_keys_for_update(conn: Connection, key_ids: Sequence[str]) -> dict[str, StoredKey]:
    """The named keys and their recipients, locked against concurrent slaves (PostgreSQL)."""
    rows = conn.execute(
        select(
            keys.c.key_id,
            keys.c.master_sae_id,
            keys.c.slave_sae_id,
            keys.c.target_kme_id,
            keys.c.state,
            keys.c.policy,
            keys.c.suite,
            keys.c.kem_exchange_id,
            keys.c.size_bits,
            keys.c.expires_at,
            keys.c.material,
        )
        .where(keys.c.key_id.in_(key_ids))
        .with_for_update()
    ).all()
    recipients: dict[str, dict[str, datetime | None]] = {r.key_id: {} for r in rows}
    for rec in conn.execute(
        select(key_recipients.c.key_id, key_recipients.c.sae_id, key_recipients.c.served_at).where(
            key_recipients.c.key_id.in_(key_ids)
        )
    ):
        recipients[rec.key_id][rec.sae_id] = rec.served_at
    return {
        r.key_id: StoredKey(
            r.key_id,
            r.master_sae_id,
            r.slave_sae_id,
            r.target_kme_id,
            r.state,
            r.policy,
            r.suite,
            r.kem_exchange_id,
            r.size_bits,
            utc(r.expires_at),
            r.material,
            recipients[r.key_id],
        )
        for r in rows
    }


def mark_served(
    conn: Connection,
    served: Iterable[StoredKey],
    slave_sae_id: str,
    events: EventBatch,
) -> None:
    """Record delivery to ``slave_sae_id``; a key whose every slave is served is consumed and zeroised."""
    served = list(served)
    if not served:
        return
    conn.execute(
        update(key_recipients)
        .where(
            and_(
                key_recipients.c.key_id.in_([k.key_id for k in served]),
                key_recipients.c.sae_id == slave_sae_id,
            )
        )
        .values(served_at=events.at)
    )
    actor = f"sae:{slave_sae_id}"
    done: list[str] = []
    for key in served:
        pending = [s for s, at in key.recipients.items() if at is None and s != slave_sae_id]
        if pending:
            events.add(
                "key", key.key_id, KeyState.RESERVED, KeyState.RESERVED, actor, f"served to {slave_sae_id}"
            )
        else:
            done.append(key.key_id)
            events.add("key", key.key_id, KeyState.RESERVED, KeyState.CONSUMED, actor, "every slave served")
    if done:
        conn.execute(
            update(keys)
            .where(keys.c.key_id.in_(done))
            .values(state=KeyState.CONSUMED.value, material=None, closed_at=events.at)
        )


def expire_reserved(conn: Connection, now: datetime, actor: str, limit: int = 1000) -> list[str]:
    """Zeroise reserved keys whose TTL has passed. Returns the expired key_IDs."""
    expired = [
        r.key_id
        for r in conn.execute(
            select(keys.c.key_id)
            .where(keys.c.state == KeyState.RESERVED.value, keys.c.expires_at < now)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ]
    if not expired:
        return []
    conn.execute(
        update(keys)
        .where(keys.c.key_id.in_(expired), keys.c.state == KeyState.RESERVED.value)
        .values(state=KeyState.EXPIRED.value, material=None, closed_at=now)
    )
    events = EventBatch(now)
    for key_id in expired:
        events.add("key", key_id, KeyState.RESERVED, KeyState.EXPIRED, actor, "TTL passed; material zeroised")
    events.flush(conn)
    return expired


@dataclass(frozen=True)
class StoredExchange:
    algorithm: str
    kem_key_version: int
    ciphertext: bytes


def load_exchanges(conn: Connection, ids: Iterable[int]) -> dict[int, StoredExchange]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = conn.execute(
        select(
            kem_exchanges.c.id,
            kem_exchanges.c.algorithm,
            kem_exchanges.c.kem_key_version,
            kem_exchanges.c.ciphertext,
        ).where(kem_exchanges.c.id.in_(wanted))
    )
    return {r.id: StoredExchange(r.algorithm, r.kem_key_version, bytes(r.ciphertext)) for r in rows}
