"""Shared blocks in-process on SQLite: piece ownership, mirrors that hand out each range once,
settling and sweeping keys cut for a peer."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import KeyState
from kms.runtime.filler import piece_parity, split_block
from kms.storage import migrate
from kms.storage import mirror_repository as mirrors
from kms.storage import peer_repository as peers
from kms.storage import pool_repository as pool
from kms.storage import registry_repository as registry
from kms.storage.database import Database
from kms.storage.mirror_repository import BitRange, LedgerConflict
from qkd_adapters.keyblock import KeyBlock, Provenance


@pytest.fixture
def db(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'peer.db'}"
    migrate.upgrade(url)
    database = Database(url)
    with database.write() as conn:
        registry.upsert_link(conn, "L-AB", "KME-B", "test", {})
    return database


@pytest.fixture
def env() -> Envelope:
    return Envelope(os.urandom(32), "kek-test")


MATERIAL = os.urandom(512)  # 4096 bits: four pieces of 1024 bits


def block() -> KeyBlock:
    return KeyBlock("L-AB", "B1", MATERIAL, len(MATERIAL) * 8, Provenance("test", False, "test"))


def test_each_piece_has_exactly_one_cutter_and_both_ends_agree() -> None:
    at_a = split_block(block(), 1024, 64, "KME-A", "KME-B")
    at_b = split_block(block(), 1024, 64, "KME-B", "KME-A")
    owners = [piece_parity("B1", p.source_offset_bits) for p in at_a]
    assert [p.owner_kme_id for p in at_a] == [None if o == 0 else "KME-B" for o in owners]
    assert [p.owner_kme_id for p in at_b] == ["KME-A" if o == 0 else None for o in owners]
    assert [p.material for p in at_a] == [p.material for p in at_b]


def test_single_piece_blocks_are_shared_out_between_both_ends() -> None:
    """Blocks no larger than a storage piece must not all go to one end."""
    mine = [
        split_block(
            KeyBlock("L-AB", f"blk-{i}", MATERIAL[:128], 1024, Provenance("test", False, "test")),
            1024,
            64,
            "KME-A",
            "KME-B",
        )[0].owner_kme_id
        for i in range(200)
    ]
    assert 60 < mine.count(None) < 140


def store_as_b(db: Database, env: Envelope) -> None:
    events = pool.EventBatch(datetime.now(UTC))
    with db.write() as conn:
        pieces = split_block(block(), 1024, 64, "KME-B", "KME-A")
        pool.store_block_pieces(conn, env, "L-AB", pieces, {}, KeyState.ACTIVE, events, "test")
        events.flush(conn)


def take(db: Database, env: Envelope, ranges: list[BitRange]) -> list[bytes]:
    events = pool.EventBatch(datetime.now(UTC))
    with db.write() as conn:
        got = mirrors.take_mirrored(conn, env, "L-AB", "KME-A", ranges, 64, events, "kme:KME-A")
        events.flush(conn)
    return [bits for bits, _, _ in got]


def a_piece(owner: int = 0) -> int:
    """Offset of the first piece of B1 that KME-A (parity 0) or KME-B (parity 1) cuts."""
    return next(o for o in range(0, 4096, 1024) if piece_parity("B1", o) == owner)


def test_mirror_hands_out_the_named_bits_once(db: Database, env: Envelope) -> None:
    store_as_b(db, env)
    base = a_piece(0)
    first = take(db, env, [BitRange("B1", base, 256), BitRange("B1", base + 512, 256)])
    assert first == [MATERIAL[base // 8 : base // 8 + 32], MATERIAL[base // 8 + 64 : base // 8 + 96]]
    with pytest.raises(LedgerConflict, match="already used"):
        take(db, env, [BitRange("B1", base + 128, 256)])  # overlaps the first range
    with pytest.raises(LedgerConflict, match="not cut by KME-A"):
        take(db, env, [BitRange("B1", a_piece(1), 256)])  # B's own piece
    with pytest.raises(LedgerConflict, match="byte-aligned"):
        take(db, env, [BitRange("B1", base + 260, 256)])
    assert take(db, env, [BitRange("B1", base + 256, 256)]) == [MATERIAL[base // 8 + 32 : base // 8 + 64]]


def test_a_mirror_is_retired_when_every_usable_range_is_taken(db: Database, env: Envelope) -> None:
    store_as_b(db, env)
    base = a_piece(0)
    take(db, env, [BitRange("B1", base, 512), BitRange("B1", base + 512, 480)])  # 32 bits left < 64
    with db.read() as conn:
        from kms.storage.rawsql import Raw

        state, material = Raw(conn).one(
            "SELECT state, material FROM key_blocks WHERE source_offset_bits = ? AND link_id = 'L-AB'",
            (base,),
        )
    assert state == "exhausted" and material is None


def insert_pending(db: Database, env: Envelope, at: datetime) -> list[str]:
    cut = [pool.CutKey(f"00000000-0000-4000-8000-00000000000{i}", os.urandom(32)) for i in range(2)]
    with db.write() as conn:
        pool.insert_reserved_keys(
            conn,
            env,
            cut,
            size_bits=256,
            master_sae_id="M",
            slave_sae_ids=["S"],
            target_kme_id="KME-B",
            ttl=timedelta(seconds=60),
            policy="qkd",
            suite=None,
            kem_exchange_id=None,
            at=at,
            state=KeyState.PRE_ACTIVE,
            keep_material=False,
        )
    return [c.key_id for c in cut]


def states(db: Database, ids: list[str]) -> list[tuple[str, object]]:
    from kms.storage.rawsql import Raw

    with db.read() as conn:
        raw = Raw(conn)
        where, params = raw.in_list("key_id", ids)
        return [
            tuple(r)
            for r in raw.all(f"SELECT state, material FROM keys WHERE {where} ORDER BY key_id", params)
        ]


def test_pending_keys_hold_no_material_and_settle_once(db: Database, env: Envelope) -> None:
    ids = insert_pending(db, env, datetime.now(UTC))
    assert states(db, ids) == [("pre_active", None)] * 2
    with db.write() as conn:
        assert peers.close_pending_keys(conn, ids, KeyState.CONSUMED, "t", "ok", datetime.now(UTC)) == 2
        assert peers.close_pending_keys(conn, ids, KeyState.DESTROYED, "t", "late", datetime.now(UTC)) == 0
    assert states(db, ids) == [("consumed", None)] * 2


def test_stale_pending_keys_are_destroyed(db: Database, env: Envelope) -> None:
    old = insert_pending(db, env, datetime.now(UTC) - timedelta(minutes=5))
    with db.write() as conn:
        gone = peers.destroy_stale_pending(conn, datetime.now(UTC) - timedelta(minutes=1), "sweep")
    assert sorted(gone) == sorted(old)
    assert states(db, old) == [("destroyed", None)] * 2


def test_a_replayed_nonce_or_sequence_is_refused(db: Database) -> None:
    now = datetime.now(UTC)
    with db.write() as conn:
        assert peers.remember_message(conn, "KME-A", "n" * 32, "s1", 1, "topology", now)
        assert not peers.remember_message(conn, "KME-A", "n" * 32, "s1", 2, "topology", now)
        assert not peers.remember_message(conn, "KME-A", "m" * 32, "s1", 1, "topology", now)
        assert peers.remember_message(conn, "KME-B", "n" * 32, "s1", 1, "topology", now)
        assert peers.prune_messages(conn, now + timedelta(seconds=1)) == 2


def site_db(tmp_path: Path, name: str, me: str, peer: str, env: Envelope) -> Database:
    url = f"sqlite:///{tmp_path / f'{name}.db'}"
    migrate.upgrade(url)
    database = Database(url)
    events = pool.EventBatch(datetime.now(UTC))
    with database.write() as conn:
        registry.upsert_link(conn, "L-AB", peer, "test", {})
        pieces = split_block(block(), 1024, 64, me, peer)
        pool.store_block_pieces(conn, env, "L-AB", pieces, {}, KeyState.ACTIVE, events, "test")
        events.flush(conn)
    return database


def test_untouched_pieces_move_to_the_end_that_runs_short(tmp_path: Path, env: Envelope) -> None:
    db_a = site_db(tmp_path, "a", "KME-A", "KME-B", env)
    db_b = site_db(tmp_path, "b", "KME-B", "KME-A", env)
    b_pieces = [o for o in range(0, 4096, 1024) if piece_parity("B1", o) == 1]
    # B has cut from its first piece: only the untouched ones may change hands.
    events = pool.EventBatch(datetime.now(UTC))
    with db_b.write() as conn:
        cut = pool.cut_keys(
            conn,
            env,
            target_kme_id="KME-A",
            number=1,
            size_bits=256,
            min_key_size=64,
            events=events,
            actor="t",
        )
    assert cut is not None and cut[0].source_bit == b_pieces[0]
    with db_a.read() as conn:
        wanted = mirrors.claimable_pieces(conn, "L-AB", "KME-B", 1 << 20)
    assert wanted == [("B1", o) for o in b_pieces]
    with db_b.write() as conn:
        granted = mirrors.grant_pieces(conn, "L-AB", "KME-A", wanted, "t", pool.EventBatch(datetime.now(UTC)))
    assert granted == [("B1", o) for o in b_pieces[1:]]
    with db_a.write() as conn:
        assert mirrors.take_over_pieces(
            conn, "L-AB", "KME-B", granted, "t", pool.EventBatch(datetime.now(UTC))
        ) == len(granted)
    with db_a.read() as conn:
        levels = {lv.link_id: lv for lv in peers.link_levels(conn)}
    assert levels["L-AB"].own_bits == 1024 * (4 - 1)  # A's own piece(s) plus the granted ones
    # B now mirrors the granted pieces: it hands out their bits to A's ledger, and never cuts them.
    if granted:
        got = take_mirrored_as(db_b, env, "KME-A", [BitRange("B1", granted[0][1], 256)])
        assert got == [MATERIAL[granted[0][1] // 8 : granted[0][1] // 8 + 32]]


def take_mirrored_as(db: Database, env: Envelope, owner: str, ranges: list[BitRange]) -> list[bytes]:
    events = pool.EventBatch(datetime.now(UTC))
    with db.write() as conn:
        got = mirrors.take_mirrored(conn, env, "L-AB", owner, ranges, 64, events, "t")
    return [bits for bits, _, _ in got]
