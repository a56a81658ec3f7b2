"""SQL for the key pool: storing blocks, cutting keys, serving and expiring them.

Every function runs inside a transaction the caller opened (``Database.write``), so a request either
happens whole or not at all. The keys a request cuts from one block are stored as one *run* row
(``key_count`` > 1, see ``kms.storage.schema.KeyRow``): one row to insert, lock and consume instead
of one per key. A run is only ever consumed, expired or moved whole; a slave that fetches part of a
run splits it into single rows first (:func:`split_run`). Reservation locks pool blocks with ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL (concurrent requests take different blocks) and falls back to a waiting lock before
declaring the pool short; on SQLite the write transaction itself is exclusive.

Why one module: its ~850 lines are on purpose, because the pool's SQL keeps one set of invariants
(block cursors, runs, sealed remainders; docs/DECISIONS.md D-12, D-18) that ``qkms db check`` proves,
and reading them side by side is what keeps them true.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from kms.crypto.envelope import Envelope
from kms.domain.key_ids import RUN_MAX, new_key_id_run, new_key_ids, run_base, run_index, run_member
from kms.domain.keys import CutKey as CutKey  # re-exported (pool.CutKey etc.): domain types
from kms.domain.keys import StoragePiece as StoragePiece
from kms.domain.keys import StoredExchange as StoredExchange
from kms.domain.keys import StoredKey as StoredKey
from kms.domain.lifecycle import KeyState, check_transition
from kms.domain.policy import POLICY_FALLBACK
from kms.storage.rawsql import Raw, joined_array
from kms.storage.schema import key_blocks, keys, links

_SQLITE_ROWS_PER_INSERT = 2000  # 4 parameters a row, well under SQLite's 32,766


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
            raw = Raw(conn)
            at = raw.ts(self.at)
            raw.executemany(
                "INSERT INTO lifecycle_events (subject_kind, subject_id, from_state, to_state, actor, reason, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r["subject_kind"],
                        r["subject_id"],
                        r["from_state"],
                        r["to_state"],
                        r["actor"],
                        r["reason"],
                        at,
                    )
                    for r in self.rows
                ],
            )
            self.rows = []


def block_aad(link_id: str, source_block_id: str, source_offset: int, next_bit: int) -> bytes:
    return f"qkms/block/{link_id}/{source_block_id}/{source_offset}/{next_bit}".encode()


def key_aad(key_id: str) -> bytes:
    return f"qkms/key/{key_id}/reserved".encode()


def utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def store_block_pieces(
    conn: Connection,
    envelope: Envelope,
    link_id: str,
    pieces: Sequence[StoragePiece],
    provenance: dict[str, Any],
    state: KeyState,
    events: EventBatch,
    actor: str,
    reason: str = "local link",
) -> int:
    """Insert pool blocks in ``state``: ``active`` for a local link, ``pre_active`` until a peer
    confirms, ``suspended`` while the link is suspended."""
    rows = []
    sealer = envelope.writer()  # one version for the whole statement (a KEK rotation may switch it)
    for piece in pieces:
        rows.append(
            {
                "link_id": link_id,
                "source_block_id": piece.source_block_id,
                "source_offset_bits": piece.source_offset_bits,
                "bit_length": len(piece.material) * 8,
                "next_bit": 0,
                "state": state.value,
                "material": sealer.seal(
                    piece.material,
                    block_aad(link_id, piece.source_block_id, piece.source_offset_bits, 0),
                ),
                "kek_id": sealer.kek_id,
                "provenance": provenance,
                "received_at": events.at,
                "owner_kme_id": piece.owner_kme_id,
                "taken": "[]" if piece.owner_kme_id else None,
            }
        )
        subject = f"{link_id}/{piece.source_block_id}@{piece.source_offset_bits}"
        events.add("block", subject, None, KeyState.PRE_ACTIVE, actor, "received from adapter")
        if state is not KeyState.PRE_ACTIVE:
            events.add("block", subject, KeyState.PRE_ACTIVE, state, actor, reason)
    if rows:
        conn.execute(insert(key_blocks), rows)
    return len(rows)


HELD_BLOCK_STATES = (KeyState.ACTIVE.value, KeyState.PRE_ACTIVE.value, KeyState.SUSPENDED.value)


def stored_bits_by_link(conn: Connection) -> dict[str, int]:
    """Unserved bits held per link (DECISIONS.md D-25): in active blocks, in blocks of a shared link
    the peer has not confirmed yet (``pre_active``) and in blocks stored while the link is suspended.
    Counting only the active ones let a link end that ran ahead of its peer, or a suspended link,
    grow without bound."""
    stmt = (
        select(
            key_blocks.c.link_id, func.coalesce(func.sum(key_blocks.c.bit_length - key_blocks.c.next_bit), 0)
        )
        .where(key_blocks.c.state.in_(HELD_BLOCK_STATES))
        .group_by(key_blocks.c.link_id)
    )
    return {row[0]: int(row[1]) for row in conn.execute(stmt)}


def last_source_block_ids(conn: Connection) -> dict[str, str]:
    """Per link, the source block ID of its newest stored row (a paired test source resumes after
    its number on a restart)."""
    newest = select(func.max(key_blocks.c.id)).group_by(key_blocks.c.link_id)
    stmt = select(key_blocks.c.link_id, key_blocks.c.source_block_id).where(key_blocks.c.id.in_(newest))
    return {str(row[0]): str(row[1]) for row in conn.execute(stmt)}


def count_available_keys(conn: Connection, target_kme_id: str, key_size: int) -> int:
    """Keys of ``key_size`` bits that the active pool toward ``target_kme_id`` could serve now.

    Floor division per block (``//``): a key never spans two blocks, so the fractions of keys left in
    several blocks add up to nothing servable. (SQLAlchemy 2's ``/`` is true division: summing
    0.75 + 0.25 reported a key that Get key then refused with 503.)"""
    stmt = (
        select(func.coalesce(func.sum((key_blocks.c.bit_length - key_blocks.c.next_bit) // key_size), 0))
        .select_from(key_blocks.join(links, links.c.id == key_blocks.c.link_id))
        .where(
            links.c.peer_kme_id == target_kme_id,
            links.c.state == "active",
            key_blocks.c.state == KeyState.ACTIVE.value,
            key_blocks.c.owner_kme_id.is_(None),
        )
    )
    return int(conn.execute(stmt).scalar_one())


def _serving_links(raw: Raw, target_kme_id: str) -> list[str]:
    """Active links whose pool serves keys toward ``target_kme_id``."""
    return [
        r[0]
        for r in raw.all(
            "SELECT id FROM links WHERE peer_kme_id = ? AND state = 'active' ORDER BY id", (target_kme_id,)
        )
    ]


def _candidate_block(raw: Raw, link_id: str, size_bits: int, skip_locked: bool) -> Any:
    # ``link_id = ?`` (not ``IN (subquery)``) so that PostgreSQL walks ix_key_blocks_pool in id order
    # and stops at the first free block, whatever its statistics say: with the subquery and stale
    # statistics it fetched and sorted every active block (~4 ms with 2,048 blocks) on each cut.
    return raw.one(
        "SELECT b.id, b.link_id, b.source_block_id, b.source_offset_bits, b.bit_length, b.next_bit, b.material,"
        " b.kek_id"
        " FROM key_blocks b"
        " WHERE b.link_id = ? AND b.state = 'active' AND b.owner_kme_id IS NULL"
        " AND b.bit_length - b.next_bit >= ?"
        " ORDER BY b.id LIMIT 1" + raw.for_update(of="b", skip_locked=skip_locked),
        (link_id, size_bits),
    )


def _first_free_block_pg(raw: Raw, target_kme_id: str, size_bits: int) -> Any:
    """PostgreSQL: the first unlocked block (links in id order, blocks in id order) toward
    ``target_kme_id`` with ``size_bits`` left, locked — what :func:`_serving_links` then
    :func:`_candidate_block` per link find, in one statement (the LATERAL subquery runs per link,
    with ``link_id = l.id``, so each walks the index and stops at its first free block)."""
    return raw.one(
        "SELECT b.id, b.link_id, b.source_block_id, b.source_offset_bits, b.bit_length, b.next_bit, b.material,"
        " b.kek_id"
        " FROM links l CROSS JOIN LATERAL (SELECT * FROM key_blocks kb WHERE kb.link_id = l.id"
        " AND kb.state = 'active' AND kb.owner_kme_id IS NULL AND kb.bit_length - kb.next_bit >= ?"
        " ORDER BY kb.id LIMIT 1 FOR UPDATE SKIP LOCKED) b"
        " WHERE l.peer_kme_id = ? AND l.state = 'active' ORDER BY l.id LIMIT 1",
        (size_bits, target_kme_id),
    )


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
    raw = Raw(conn)
    serving: list[str] | None = None
    for skip_locked in (True, False):
        if raw.pg and skip_locked:
            # One round trip per block: the serving links and, per link in id order, its first free
            # block (walking ix_key_blocks_pool), in one statement.
            sources: list[str | None] = [None]
        else:
            serving = _serving_links(raw, target_kme_id) if serving is None else serving
            sources = list(serving)
        for link_id in sources:
            while len(cut) < number:
                if link_id is None:
                    row = _first_free_block_pg(raw, target_kme_id, size_bits)
                else:
                    row = _candidate_block(raw, link_id, size_bits, skip_locked)
                if row is None:
                    break
                block = _Block(*row)
                remainder = envelope.open(
                    bytes(block.material),
                    block_aad(block.link_id, block.source_block_id, block.source_offset_bits, block.next_bit),
                    block.kek_id,
                )
                take = min(number - len(cut), len(remainder) // size_bytes, RUN_MAX)
                ids = new_key_id_run(take)
                cut.extend(
                    CutKey(
                        ids[i],
                        remainder[i * size_bytes : (i + 1) * size_bytes],
                        block.id,
                        block.next_bit + i * size_bits,
                        block.link_id,
                        block.source_block_id,
                        block.source_offset_bits + block.next_bit + i * size_bits,
                    )
                    for i in range(take)
                )
                rest = remainder[take * size_bytes :]
                _advance_block(raw, envelope, block, rest, min_key_size, events, actor)
        if len(cut) >= number:
            break
    return cut if len(cut) >= number else None


def fallback_keys(number: int) -> list[CutKey]:
    """Key IDs for PQC-fallback keys: no pool bits; the material is derived from ML-KEM."""
    return [CutKey(key_id, None) for key_id in new_key_ids(number)]


def insert_kem_exchange(
    conn: Connection,
    algorithm: str,
    target_kme_id: str,
    key_version: int,
    public_key_sha384: str,
    ciphertext: bytes,
    at: datetime,
) -> int:
    raw = Raw(conn)
    row = raw.one(
        "INSERT INTO kem_exchanges (algorithm, target_kme_id, kem_key_version, public_key_sha384, ciphertext, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (algorithm, target_kme_id, key_version, public_key_sha384, ciphertext, raw.ts(at)),
    )
    return int(row[0])


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
    at: datetime,
    state: KeyState = KeyState.RESERVED,
    keep_material: bool = True,
    source_kme_id: str | None = None,
    route: str | None = None,
) -> None:
    """Record freshly cut keys as ``reserved`` for their slaves; QKD material is sealed per key.

    Keys for a slave at another KME are recorded ``pre_active`` without material until that KME has
    recorded them (``state``, ``keep_material``); keys recorded from a peer's ledger name the master's
    KME (``source_kme_id``) and, when relayed, the route (JSON text).

    The transition itself is recorded on the row (``created_at``, the master as actor) and in the
    request's audit record, not as one event row per key: this is the hot path. Reserved keys with
    material for one local slave are stored as runs (:func:`_rows_of`); every other kind (multicast,
    PQC fallback, keys awaiting or recorded from a peer KME) one row per key.
    """
    if not cut:
        return
    raw = Raw(conn)
    now = raw.ts(at)
    expires = raw.ts(at + ttl)
    sealer = envelope.writer()  # the version sealed under is the one the rows name
    slave, additional = slave_sae_ids[0], list(slave_sae_ids[1:])
    multicast = bool(additional)
    to_seal = [c for c in cut if c.material is not None] if keep_material else []
    sealed = dict(
        zip(
            (c.key_id for c in to_seal),
            sealer.seal_many(
                [c.material for c in to_seal if c.material is not None], [key_aad(c.key_id) for c in to_seal]
            ),
            strict=True,
        )
    )
    runs = keep_material and not additional and state is KeyState.RESERVED and not source_kme_id and not route
    # Only five columns differ between the rows of one request; the rest are sent once, as scalars.
    varying = (
        _rows_of(cut, sealed, size_bits)
        if runs
        else [(c.key_id, c.block_id, c.bit_offset, sealed.get(c.key_id), 1) for c in cut]
    )
    shared = (
        size_bits,
        state.value,
        master_sae_id,
        slave,
        target_kme_id,
        policy,
        suite,
        kem_exchange_id,
        sealer.kek_id,
        now,
        expires,
        multicast,
        source_kme_id,
        route,
    )
    if raw.pg:
        _insert_keys_pg(raw, varying, shared)
    else:
        _insert_keys_sqlite(raw, varying, shared)
    if additional:
        raw.executemany(
            "INSERT INTO key_recipients (key_id, sae_id) VALUES (?, ?)",
            [(c.key_id, s) for c in cut for s in additional],
        )


# The per-row columns of an insert: key_id, block_id, bit_offset, material, key_count.
_RowValues = tuple[str, int | None, int | None, bytes | None, int]


_KEY_COLUMNS = (
    "key_id, block_id, bit_offset, material, key_count, size_bits, state, master_sae_id, slave_sae_id,"
    " target_kme_id, policy, suite, kem_exchange_id, kek_id, created_at, expires_at, multicast,"
    " source_kme_id, route"
)


def _insert_keys_pg(raw: Raw, varying: list[_RowValues], shared: tuple[Any, ...]) -> None:
    """PostgreSQL: one ``INSERT ... SELECT FROM unnest`` for the request's rows."""
    columns = _KEY_COLUMNS
    scalars = (
        "?::int, ?::varchar, ?::varchar, ?::varchar, ?::varchar, ?::varchar, ?::varchar, ?::bigint,"
        " ?::varchar, ?::timestamptz, ?::timestamptz, ?::boolean, ?::varchar, ?::json"
    )
    ids, blocks, offsets, materials, counts = (list(col) for col in zip(*varying, strict=True))
    # Only rows of one key each may take the packed form: it writes a key_count of 1, so a run
    # row there (a request straddling two blocks: 2+2 keys of equal sealed length) lost keys.
    single = all(c == 1 for c in counts)
    packed = _pack_pg(ids, blocks, offsets, materials) if single and len(varying) > 1 else None
    if packed is not None:
        # Many single keys (multicast): the per-key columns as three joined texts and one
        # concatenation of equal-length sealed materials, not four arrays to build.
        raw.execute(
            f"INSERT INTO keys ({columns}) SELECT v.k, v.b::bigint, v.o::int,"
            f" substring(?::bytea FROM (v.n::int - 1) * ? + 1 FOR ?), 1, {scalars}"
            " FROM unnest(string_to_array(?, ','), string_to_array(?, ','), string_to_array(?, ','))"
            " WITH ORDINALITY AS v(k, b, o, n)",
            [*packed[:3], *shared, *packed[3:]],
        )
    else:
        raw.execute(
            f"INSERT INTO keys ({columns}) SELECT k, b, o, m, c, {scalars}"
            " FROM unnest(?::varchar[], ?::bigint[], ?::int[], ?::bytea[], ?::int[]) AS v(k, b, o, m, c)",
            [*shared, ids, blocks, offsets, materials, counts],
        )


def _insert_keys_sqlite(raw: Raw, varying: list[_RowValues], shared: tuple[Any, ...]) -> None:
    """SQLite: a ``VALUES`` list per chunk of rows (parameters stay under SQLite's limit)."""
    columns = _KEY_COLUMNS
    for start in range(0, len(varying), _SQLITE_ROWS_PER_INSERT):
        chunk = varying[start : start + _SQLITE_ROWS_PER_INSERT]
        raw.execute(
            f"WITH v(k, b, o, m, c) AS (VALUES {', '.join(['(?, ?, ?, ?, ?)'] * len(chunk))})"
            f" INSERT INTO keys ({columns}) SELECT k, b, o, m, c, {', '.join('?' * len(shared))} FROM v",
            [*(x for row in chunk for x in row), *shared],
        )


def _rows_of(cut: Sequence[CutKey], sealed: dict[str, bytes], size_bits: int) -> list[_RowValues]:
    """The rows for ``cut``: each stretch of keys with consecutive bits of one block and the
    consecutive IDs of one run (as :func:`cut_keys` makes them) becomes one run row; any other key
    (no block, no material) a row of its own."""
    rows: list[_RowValues] = []
    members: list[bytes] = []
    first: CutKey | None = None
    for c in cut:
        material = sealed.get(c.key_id)
        if (
            first is not None
            and material is not None
            and c.block_id == first.block_id
            and c.bit_offset is not None
            and first.bit_offset is not None
            and c.bit_offset == first.bit_offset + len(members) * size_bits
            and len(members) < RUN_MAX
            and c.key_id == run_member(first.key_id, len(members))
        ):
            members.append(material)
            continue
        if first is not None:
            rows.append(_run_row(first, members))
        first, members = c, [material] if material is not None else []
        if material is None or c.block_id is None or c.bit_offset is None or c.key_id != run_base(c.key_id):
            rows.append((c.key_id, c.block_id, c.bit_offset, material, 1))
            first, members = None, []
    if first is not None:
        rows.append(_run_row(first, members))
    return rows


def _run_row(first: CutKey, members: list[bytes]) -> _RowValues:
    return (first.key_id, first.block_id, first.bit_offset, b"".join(members), len(members))


def _pack_pg(
    ids: list[Any], blocks: list[Any], offsets: list[Any], materials: list[Any]
) -> tuple[bytes, int, int, str, str, str] | None:
    """(materials concatenated, length, length, ids, blocks, offsets joined) when every key has a
    block, an offset and a sealed material of one length (QKD keys of one request); else None."""
    if not ids or any(m is None for m in materials) or len({len(m) for m in materials}) != 1:
        return None
    if any(b is None for b in blocks) or any(o is None for o in offsets):
        return None
    joined = joined_array(ids)
    if joined is None:
        return None
    length = len(materials[0])
    return (
        b"".join(materials),
        length,
        length,
        joined[0],
        ",".join(map(str, blocks)),
        ",".join(map(str, offsets)),
    )


@dataclass(frozen=True)
class _Block:
    id: int
    link_id: str
    source_block_id: str
    source_offset_bits: int
    bit_length: int
    next_bit: int
    material: bytes
    kek_id: str


def _advance_block(
    raw: Raw,
    envelope: Envelope,
    block: _Block,
    rest: bytes,
    min_key_size: int,
    events: EventBatch,
    actor: str,
) -> None:
    """Move a block's cursor past the cut bits and re-seal what is left, or retire it."""
    next_bit = block.bit_length - len(rest) * 8
    if len(rest) * 8 < min_key_size:
        subject = f"{block.link_id}/{block.source_block_id}@{block.source_offset_bits}"
        reason = (
            f"fully cut; {len(rest) * 8} trailing bits below min_key_size zeroised" if rest else "fully cut"
        )
        events.add("block", subject, KeyState.ACTIVE, KeyState.EXHAUSTED, actor, reason)
        raw.execute(
            "UPDATE key_blocks SET next_bit = ?, state = 'exhausted', material = NULL WHERE id = ?",
            (next_bit, block.id),
        )
    else:
        sealer = envelope.writer()
        sealed = sealer.seal(
            rest, block_aad(block.link_id, block.source_block_id, block.source_offset_bits, next_bit)
        )
        raw.execute(
            "UPDATE key_blocks SET next_bit = ?, material = ?, kek_id = ? WHERE id = ?",
            (next_bit, sealed, sealer.kek_id, block.id),
        )


# Not frozen: made per key on the delivery hot path, where a frozen dataclass's __init__ cost
# ~8x a slotted one's (1.6 against 0.2 us for a StoredKey). Treat instances as read-only.
def member_of(key_id: str, counts: Mapping[str, int]) -> tuple[str, int] | None:
    """Which row holds ``key_id`` and at which position, given the ``key_count`` of the rows found
    under ``key_id`` and under :func:`run_base` of it; None if neither holds it."""
    if counts.get(key_id) == 1:
        return key_id, 0
    base = run_base(key_id)
    count = counts.get(base, 0)
    index = run_index(key_id)
    return (base, index) if count > 1 and index < count else None


def rows_to_find(key_ids: Iterable[str]) -> list[str]:
    """The row key_IDs under which ``key_ids`` may be stored (each one and its run's first)."""
    return list(dict.fromkeys(x for k in key_ids for x in (k, run_base(k))))


def load_keys_for_update(conn: Connection, key_ids: Sequence[str]) -> dict[str, StoredKey]:
    """The named keys and their recipients, locked against concurrent slaves (PostgreSQL). A run
    member's material is its slice of the run's; keys not stored are left out."""
    raw = Raw(conn)

    def locked_rows(wanted: Sequence[str]) -> dict[str, Any]:
        where, params = raw.in_list("key_id", wanted)
        return {
            r[0]: r
            for r in raw.all(
                "SELECT key_id, master_sae_id, slave_sae_id, target_kme_id, state, policy, suite,"
                " kem_exchange_id, size_bits, expires_at, material, served_at, multicast, source_kme_id,"
                f" key_count FROM keys WHERE {where}" + raw.for_update(),
                params,
            )
        }

    # Runs first: the 128 key_IDs of a request share one run_base, so one index probe finds them;
    # only key_IDs no run holds (single keys) are looked up as themselves.
    found = locked_rows(list(dict.fromkeys(run_base(k) for k in key_ids)))
    counts = {i: r[14] for i, r in found.items()}
    rest = [k for k in key_ids if k not in found and member_of(k, counts) is None]
    if rest:
        found.update(locked_rows(rest))
        counts = {i: r[14] for i, r in found.items()}
    located = {k: m for k in key_ids if (m := member_of(k, counts))}
    rows = [r for r in found.values() if r[14] == 1 and r[0] in located]
    recipients: dict[str, dict[str, datetime | None]] = {r[0]: {r[2]: raw.read_ts(r[11])} for r in rows}
    multicast = [r[0] for r in rows if r[12]]
    if multicast:
        mwhere, mparams = raw.in_list("key_id", multicast)
        for key_id, sae_id, served_at in raw.all(
            f"SELECT key_id, sae_id, served_at FROM key_recipients WHERE {mwhere}", mparams
        ):
            recipients[key_id][sae_id] = raw.read_ts(served_at)
    out = {}
    for key_id, (row_id, index) in located.items():
        (
            _,
            master,
            slave,
            target,
            state,
            policy,
            suite,
            exchange,
            size,
            expires,
            material,
            served,
            _,
            src,
            count,
        ) = found[row_id]
        expires_at = raw.read_ts(expires)
        assert expires_at is not None
        out[key_id] = StoredKey(
            key_id,
            master,
            slave,
            target,
            state,
            policy,
            suite,
            exchange,
            size,
            expires_at,
            _member_material(material, count, index),
            recipients[key_id] if count == 1 else {slave: raw.read_ts(served)},
            src,
            row_id,
            count,
        )
    return out


def whole_rows(keys_: Iterable[StoredKey]) -> list[str] | None:
    """The rows holding ``keys_`` if every run among them is named whole, else None."""
    named: dict[str, int] = {}
    counts: dict[str, int] = {}
    for k in keys_:
        named[k.row_id] = named.get(k.row_id, 0) + 1
        counts[k.row_id] = k.row_count
    return None if any(named[r] != counts[r] for r in named) else list(named)


def split_run(conn: Connection, run_id: str) -> list[str]:
    """Replace the run stored under ``run_id`` by one row per member (same state and history, each
    with its own bit offset and sealed material). Returns the members' key_IDs. A slave fetching
    part of a run needs this: a row is consumed and zeroised whole."""
    split = _one_per_key(conn.execute(select(keys).where(keys.c.key_id == run_id)).mappings().one())
    conn.execute(delete(keys).where(keys.c.key_id == run_id))
    conn.execute(insert(keys), split)
    return [m["key_id"] for m in split]


def _one_per_key(row: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """A ``keys`` row as one record per key it holds (itself, or each member of its run)."""
    count = row["key_count"]
    if count == 1:
        return [dict(row)]
    return [
        {
            **row,
            "key_id": run_member(row["key_id"], i),
            "bit_offset": None if row["bit_offset"] is None else row["bit_offset"] + i * row["size_bits"],
            "material": _member_material(row["material"], count, i),
            "key_count": 1,
        }
        for i in range(count)
    ]


def _member_material(material: bytes | None, count: int, index: int) -> bytes | None:
    """Member ``index``'s sealed material: its equal slice of the row's (all of it for a single key)."""
    if material is None:
        return None
    step = len(material) // count
    return bytes(material[index * step : (index + 1) * step])


def mark_served(
    conn: Connection,
    served: Iterable[StoredKey],
    slave_sae_id: str,
    at: datetime,
    redeliver_until: datetime | None = None,
) -> list[str]:
    """Record delivery to ``slave_sae_id``; a key whose every slave is served is consumed and its
    material zeroised — or, with ``redeliver_until`` after ``at``, kept until then (its
    ``expires_at``) for a slave whose answer was lost (:func:`consuming`). Returns the key_IDs
    consumed."""
    served = list(served)
    if not served:
        return []
    per_row: dict[str, list[StoredKey]] = {}
    for k in served:
        per_row.setdefault(k.row_id, []).append(k)
    for row_id, members in per_row.items():
        if len(members) != members[0].row_count:  # part of a run: split it, then serve single rows
            split_run(conn, row_id)
            for k in members:
                k.row_id, k.row_count = k.key_id, 1
    raw = Raw(conn)
    now = raw.ts(at)
    closing, until = consuming(raw, at, redeliver_until)
    done = [
        k.key_id
        for k in served
        if all(when is not None or sae == slave_sae_id for sae, when in k.recipients.items())
    ]
    # Rows, not keys: a run (always one slave, always served whole here) is one row.
    named = list(dict.fromkeys(k.row_id for k in served if k.slave_sae_id == slave_sae_id))
    extra = [k.key_id for k in served if k.slave_sae_id != slave_sae_id]
    finished = set(done) | {k.row_id for k in served if k.row_count > 1}
    # The named slave's delivery and, when it completes the key, consumption, in one statement.
    for ids, consume in (
        ([i for i in named if i in finished], True),
        ([i for i in named if i not in finished], False),
    ):
        if ids:
            where, params = raw.in_list("key_id", ids)
            raw.execute(
                f"UPDATE keys SET served_at = ?{', ' + closing if consume else ''} WHERE {where}",
                [now, until, now, *params] if consume else [now, *params],
            )
    if extra:
        where, params = raw.in_list("key_id", extra)
        raw.execute(
            f"UPDATE key_recipients SET served_at = ? WHERE sae_id = ? AND {where}",
            [now, slave_sae_id, *params],
        )
        closing_ids = [i for i in extra if i in finished]
        if closing_ids:
            where, params = raw.in_list("key_id", closing_ids)
            raw.execute(f"UPDATE keys SET {closing} WHERE {where}", [until, now, *params])
    return done


def consuming(raw: Raw, at: datetime, redeliver_until: datetime | None) -> tuple[str, Any]:
    """The SET clause that consumes a key at ``at`` and its ``expires_at`` parameter (the clause
    then takes ``closed_at``). For a consumed key ``expires_at`` is the end of its redelivery
    window: ``redeliver_until`` when that is after ``at`` (material kept, sealed, until the sweep
    zeroises it: :func:`close_redelivery_windows`), else ``at`` itself (material zeroised now)."""
    if redeliver_until is not None and redeliver_until > at:
        return "state = 'consumed', expires_at = ?, closed_at = ?", raw.ts(redeliver_until)
    return "state = 'consumed', material = NULL, expires_at = ?, closed_at = ?", raw.ts(at)


def consume_if_unchanged(
    conn: Connection,
    row_ids: Sequence[str],
    slave_sae_id: str,
    at: datetime,
    redeliver_until: datetime | None = None,
) -> bool:
    """Serve and consume the rows (single keys or whole runs, :func:`whole_rows`) of single-slave
    keys read earlier, outside this transaction, as reserved for ``slave_sae_id``: True if every
    one of them still was (and now is consumed, material zeroised or kept for redelivery as in
    :func:`mark_served`); False if any was not — the caller then rolls back to its savepoint,
    since some rows may have been updated."""
    raw = Raw(conn)
    now = raw.ts(at)
    closing, until = consuming(raw, at, redeliver_until)
    where, params = raw.in_list("key_id", row_ids)
    cur = raw.execute(
        f"UPDATE keys SET served_at = ?, {closing} WHERE {where}"
        " AND state = 'reserved' AND served_at IS NULL AND slave_sae_id = ? AND NOT multicast"
        " AND (material IS NOT NULL OR policy = ?) AND expires_at > ?",
        [now, until, now, *params, slave_sae_id, POLICY_FALLBACK, now],
    )
    return int(cur.rowcount) == len(row_ids)


def expire_reserved(conn: Connection, now: datetime, actor: str, limit: int = 1000) -> list[str]:
    """Zeroise reserved keys whose TTL has passed, and the material of consumed keys whose
    redelivery window has (:func:`close_redelivery_windows`). Returns the expired key_IDs."""
    close_redelivery_windows(conn, now, limit)
    rows = conn.execute(
        select(keys.c.key_id, keys.c.key_count)
        .where(keys.c.state == KeyState.RESERVED.value, keys.c.expires_at < now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    conn.execute(
        update(keys)
        .where(keys.c.key_id.in_([r.key_id for r in rows]), keys.c.state == KeyState.RESERVED.value)
        .values(state=KeyState.EXPIRED.value, material=None, closed_at=now)
    )
    expired = members(rows)
    events = EventBatch(now)
    for key_id in expired:
        events.add("key", key_id, KeyState.RESERVED, KeyState.EXPIRED, actor, "TTL passed; material zeroised")
    events.flush(conn)
    return expired


# Consumed keys still holding material, by the end of their window: the partial index
# ix_keys_redelivery (migration 0010) holds exactly these rows, so the sweep and the check read only
# them. Literal predicates, so that SQLite matches the index's WHERE clause.
_HELD_CONSUMED = "state = 'consumed' AND material IS NOT NULL"


def close_redelivery_windows(conn: Connection, now: datetime, limit: int = 1000) -> int:
    """Zeroise the material of up to ``limit`` rows of consumed keys whose redelivery window ended
    by ``now`` (the rest wait for the next sweep); the metadata stays. Returns the rows zeroised."""
    raw = Raw(conn)
    rows = raw.all(
        f"SELECT key_id FROM keys WHERE {_HELD_CONSUMED} AND expires_at <= ? ORDER BY expires_at"
        f" LIMIT {int(limit)}" + raw.for_update(skip_locked=True),
        (raw.ts(now),),
    )
    if not rows:
        return 0
    where, params = raw.in_list("key_id", [r[0] for r in rows])
    raw.execute(f"UPDATE keys SET material = NULL WHERE {where} AND state = 'consumed'", params)
    return len(rows)


def consumed_material_overdue(conn: Connection, now: datetime, limit: int | None = None) -> list[str]:
    """The key_IDs (run members each) of consumed keys still holding material although their
    redelivery window ended before ``now`` — a broken promise, reported by ``qkms db check``
    (:mod:`kms.storage.integrity`). Consumed keys inside their window legitimately hold material."""
    raw = Raw(conn)
    cap = "" if limit is None else f" LIMIT {int(limit)}"
    rows = raw.all(
        # The index's order (ORDER BY key_id would walk the whole table on SQLite).
        f"SELECT key_id, key_count FROM keys WHERE {_HELD_CONSUMED} AND expires_at < ?"
        f" ORDER BY expires_at{cap}",
        (raw.ts(now),),
    )
    return sorted(members(rows))


def key_records(conn: Connection, key_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every stored key (or the named ones that are stored), each as its own record: the ``keys``
    columns, with a run member's own key_ID, bit offset and slice of sealed material and a
    ``key_count`` of 1. For inspection, tools and tests; not the delivery path."""
    stmt = select(keys).order_by(keys.c.key_id)
    if key_ids is not None:
        stmt = stmt.where(keys.c.key_id.in_(rows_to_find(key_ids)))
    out = {k["key_id"]: k for row in conn.execute(stmt).mappings() for k in _one_per_key(row)}
    if key_ids is not None:
        out = {k: out[k] for k in key_ids if k in out}
    return out


def members(rows: Iterable[Any]) -> list[str]:
    """The key_IDs held by ``(key_id, key_count)`` rows, in order."""
    return [run_member(key_id, i) if count > 1 else key_id for key_id, count in rows for i in range(count)]


def load_exchanges(conn: Connection, ids: Iterable[int]) -> dict[int, StoredExchange]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    raw = Raw(conn)
    where, params = raw.in_list("id", wanted)
    rows = raw.all(
        f"SELECT id, algorithm, kem_key_version, ciphertext FROM kem_exchanges WHERE {where}", params
    )
    return {r[0]: StoredExchange(r[1], r[2], bytes(r[3])) for r in rows}
