"""SQL for the blocks a KME shares with a peer KME: block confirmation, mirrored pieces, rebalancing.

A block shared with a peer KME is split piece by piece between the two ends (``owner_kme_id``): each
KME cuts keys only from its own pieces and holds a *mirror* of the peer's, from which it takes
exactly the bit ranges the peer's ledger names. A mirror zeroises the ranges it has handed out and
remembers them (``taken``), so a range can never be recorded twice. An end that runs short claims
untouched pieces of the other's (``claimable_pieces``, ``grant_pieces``, ``take_over_pieces``).
The replay guard and the keys pending at a peer are ``peer_repository``'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import KeyState
from kms.storage.pool_repository import EventBatch, block_aad
from kms.storage.rawsql import Raw


class LedgerConflict(ValueError):
    """A ledger entry names bits this KME cannot hand out (unknown, not the peer's, or taken)."""


@dataclass
class SharedBlock:
    block_id: str
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (source offset, bits)
    states: set[str] = field(default_factory=set)
    sync: Mapping[str, Any] = field(default_factory=dict)


def pending_blocks(conn: Connection, link_id: str, limit: int = 64) -> list[SharedBlock]:
    """Blocks of a peer link still ``pre_active`` here (not yet confirmed by the peer), oldest first."""
    raw = Raw(conn)
    ids = [
        r[0]
        for r in raw.all(
            "SELECT source_block_id, MIN(id) FROM key_blocks WHERE link_id = ? AND state = 'pre_active'"
            " GROUP BY source_block_id ORDER BY MIN(id) LIMIT ?",
            (link_id, limit),
        )
    ]
    return list(blocks_by_id(conn, link_id, ids).values())


def blocks_by_id(conn: Connection, link_id: str, block_ids: Sequence[str]) -> dict[str, SharedBlock]:
    if not block_ids:
        return {}
    raw = Raw(conn)
    where, params = raw.in_list("source_block_id", block_ids)
    out: dict[str, SharedBlock] = {}
    for block_id, offset, bits, state in raw.all(
        "SELECT source_block_id, source_offset_bits, bit_length, state FROM key_blocks"
        f" WHERE link_id = ? AND {where} ORDER BY source_offset_bits",
        [link_id, *params],
    ):
        block = out.setdefault(block_id, SharedBlock(block_id))
        block.pieces.append((int(offset), int(bits)))
        block.states.add(state)
    # The sync metadata is the same on every piece of a block: read it from the first piece only.
    for block_id, provenance in raw.all(
        f"SELECT source_block_id, provenance FROM key_blocks WHERE link_id = ? AND {where}"
        " AND source_offset_bits = 0",
        [link_id, *params],
    ):
        prov = provenance if isinstance(provenance, dict) else json.loads(provenance)
        out[block_id].sync = prov.get("sync") or {}
    return out


def activate_blocks(
    conn: Connection, link_id: str, block_ids: Sequence[str], actor: str, events: EventBatch
) -> int:
    """``pre_active`` -> ``active`` for the pieces of blocks the peer has confirmed it holds."""
    if not block_ids:
        return 0
    raw = Raw(conn)
    where, params = raw.in_list("source_block_id", block_ids)
    rows = raw.all(
        f"SELECT id, source_block_id, source_offset_bits FROM key_blocks WHERE link_id = ? AND {where}"
        " AND state = 'pre_active'" + raw.for_update(),
        [link_id, *params],
    )
    for _, block_id, offset in rows:
        events.add(
            "block",
            f"{link_id}/{block_id}@{offset}",
            KeyState.PRE_ACTIVE,
            KeyState.ACTIVE,
            actor,
            "peer confirmed",
        )
    if rows:
        iwhere, iparams = raw.in_list("id", [r[0] for r in rows])
        raw.execute(f"UPDATE key_blocks SET state = 'active' WHERE {iwhere}", iparams)
    return len(rows)


def discard_unconfirmed(
    conn: Connection, received_before: Any, actor: str, events: EventBatch, limit: int = 4096
) -> dict[str, int]:
    """Shared blocks still ``pre_active`` that were received before ``received_before``: destroyed,
    their material dropped. The peer never confirmed them (its device lost them, or it was gone too
    long); kept, they would hold the link's pool limit forever. Returns pieces destroyed per link."""
    raw = Raw(conn)
    rows = raw.all(
        "SELECT id, link_id, source_block_id, source_offset_bits FROM key_blocks"
        " WHERE state = 'pre_active' AND received_at < ? LIMIT ?" + raw.for_update(skip_locked=True),
        (raw.ts(received_before), limit),
    )
    per_link: dict[str, int] = {}
    for _, link_id, block_id, offset in rows:
        events.add(
            "block",
            f"{link_id}/{block_id}@{offset}",
            KeyState.PRE_ACTIVE,
            KeyState.DESTROYED,
            actor,
            "never confirmed by the peer",
        )
        per_link[link_id] = per_link.get(link_id, 0) + 1
    if rows:
        where, params = raw.in_list("id", [r[0] for r in rows])
        raw.execute(f"UPDATE key_blocks SET state = 'destroyed', material = NULL WHERE {where}", params)
    return per_link


@dataclass(frozen=True)
class BitRange:
    block_id: str
    offset: int  # bit offset in the source block
    size: int


def take_mirrored(
    conn: Connection,
    envelope: Envelope,
    link_id: str,
    owner_kme_id: str,
    wanted: Sequence[BitRange],
    min_key_size: int,
    events: EventBatch,
    actor: str,
) -> list[tuple[bytes, int, int]]:
    """Hand out the named ranges of the peer's pieces: (bits, piece row id, offset in the piece) each.

    Raises ``LedgerConflict`` if a range is not inside an active piece that ``owner_kme_id`` cuts,
    is not byte-aligned, or overlaps a range already handed out. The caller rolls back on error.
    """
    raw = Raw(conn)
    pieces: dict[int, _Mirror] = {}
    located: list[tuple[_Mirror, int, int]] = []
    for r in wanted:
        if r.offset % 8 or r.size % 8 or r.size <= 0:
            raise LedgerConflict(f"range {r.block_id}@{r.offset}+{r.size} is not byte-aligned")
        row = raw.one(
            "SELECT id, source_offset_bits, bit_length, state, owner_kme_id, taken, material FROM key_blocks"
            " WHERE link_id = ? AND source_block_id = ? AND source_offset_bits <= ?"
            " AND source_offset_bits + bit_length >= ?" + raw.for_update(),
            (link_id, r.block_id, r.offset, r.offset + r.size),
        )
        if row is None:
            raise LedgerConflict(f"no piece of block {r.block_id} holds bits {r.offset}..{r.offset + r.size}")
        piece = pieces.get(row[0])
        if piece is None:
            piece = _Mirror(int(row[0]), r.block_id, int(row[1]), int(row[2]), row[3], row[4], row[5], row[6])
            if piece.owner != owner_kme_id:
                raise LedgerConflict(f"block {r.block_id}@{piece.offset} is not cut by {owner_kme_id}")
            if piece.state != KeyState.ACTIVE.value or piece.sealed is None:
                raise LedgerConflict(f"block {r.block_id}@{piece.offset} is {piece.state}, not active")
            piece.open(envelope, link_id)
            pieces[piece.id] = piece
        located.append((piece, r.offset - piece.offset, r.size))
    out = [(piece.take(rel, size), piece.id, rel) for piece, rel, size in located]
    for piece in pieces.values():
        piece.store(raw, envelope, link_id, min_key_size, events, actor)
    return out


@dataclass
class _Mirror:
    id: int
    block_id: str
    offset: int
    bits: int
    state: str
    owner: str | None
    taken_json: str | None
    sealed: bytes | None
    material: bytearray = field(default_factory=bytearray)
    taken: list[list[int]] = field(default_factory=list)

    def open(self, envelope: Envelope, link_id: str) -> None:
        assert self.sealed is not None
        self.material = bytearray(
            envelope.open(bytes(self.sealed), block_aad(link_id, self.block_id, self.offset, 0))
        )
        self.taken = json.loads(self.taken_json or "[]")

    def take(self, rel: int, size: int) -> bytes:
        start, end = rel, rel + size
        if any(start < t_end and t_start < end for t_start, t_end in self.taken):
            raise LedgerConflict(
                f"bits {self.offset + start}..{self.offset + end} of {self.block_id} were already used"
            )
        self.taken.append([start, end])
        bits = bytes(self.material[start // 8 : end // 8])
        self.material[start // 8 : end // 8] = bytes(size // 8)  # zeroise what is handed out
        return bits

    def store(
        self, raw: Raw, envelope: Envelope, link_id: str, min_key_size: int, events: EventBatch, actor: str
    ) -> None:
        merged = _merge(self.taken)
        free = self.bits - sum(e - s for s, e in merged)
        if free < min_key_size:
            events.add(
                "block",
                f"{link_id}/{self.block_id}@{self.offset}",
                KeyState.ACTIVE,
                KeyState.EXHAUSTED,
                actor,
                "peer cut every usable range",
            )
            raw.execute(
                "UPDATE key_blocks SET state = 'exhausted', material = NULL, taken = ? WHERE id = ?",
                (json.dumps(merged), self.id),
            )
        else:
            sealer = envelope.writer()  # the row names the version it is sealed under
            sealed = sealer.seal(bytes(self.material), block_aad(link_id, self.block_id, self.offset, 0))
            raw.execute(
                "UPDATE key_blocks SET material = ?, taken = ?, kek_id = ? WHERE id = ?",
                (sealed, json.dumps(merged), sealer.kek_id, self.id),
            )


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def claimable_pieces(
    conn: Connection, link_id: str, peer_kme_id: str, max_bits: int
) -> list[tuple[str, int]]:
    """Pieces of the peer's that this KME mirrors untouched (nothing recorded from them yet), oldest
    first, up to ``max_bits``: candidates to ask the peer for when this end runs short."""
    raw = Raw(conn)
    out: list[tuple[str, int]] = []
    total = 0
    for block_id, offset, bits in raw.all(
        "SELECT source_block_id, source_offset_bits, bit_length FROM key_blocks WHERE link_id = ?"
        " AND owner_kme_id = ? AND state = 'active' AND taken = '[]' ORDER BY id LIMIT 256",
        (link_id, peer_kme_id),
    ):
        if total + int(bits) > max_bits:
            break
        out.append((str(block_id), int(offset)))
        total += int(bits)
    return out


def grant_pieces(
    conn: Connection,
    link_id: str,
    claimer: str,
    pieces: Sequence[tuple[str, int]],
    actor: str,
    events: EventBatch,
) -> list[tuple[str, int]]:
    """Hand untouched pieces of this KME's to ``claimer`` (it becomes their cutter; this KME keeps a
    mirror). Only pieces this KME has not cut from are granted, under a row lock, so a bit can never
    be cut by both."""
    raw = Raw(conn)
    granted: list[tuple[str, int]] = []
    for block_id, offset in pieces:
        row = raw.one(
            "SELECT id FROM key_blocks WHERE link_id = ? AND source_block_id = ? AND source_offset_bits = ?"
            " AND owner_kme_id IS NULL AND state = 'active' AND next_bit = 0" + raw.for_update(),
            (link_id, block_id, offset),
        )
        if row is None:
            continue
        raw.execute("UPDATE key_blocks SET owner_kme_id = ?, taken = '[]' WHERE id = ?", (claimer, row[0]))
        events.add(
            "block",
            f"{link_id}/{block_id}@{offset}",
            KeyState.ACTIVE,
            KeyState.ACTIVE,
            actor,
            f"granted to {claimer}",
        )
        granted.append((block_id, offset))
    return granted


def take_over_pieces(
    conn: Connection,
    link_id: str,
    peer_kme_id: str,
    pieces: Sequence[tuple[str, int]],
    actor: str,
    events: EventBatch,
) -> int:
    """The peer granted these mirrored pieces: this KME cuts them from now on."""
    raw = Raw(conn)
    n = 0
    for block_id, offset in pieces:
        n += raw.execute(
            "UPDATE key_blocks SET owner_kme_id = NULL, taken = NULL WHERE link_id = ? AND source_block_id = ?"
            " AND source_offset_bits = ? AND owner_kme_id = ? AND state = 'active' AND taken = '[]'",
            (link_id, block_id, offset, peer_kme_id),
        ).rowcount
        events.add(
            "block",
            f"{link_id}/{block_id}@{offset}",
            KeyState.ACTIVE,
            KeyState.ACTIVE,
            actor,
            "granted by the peer",
        )
    return n
