"""Shared blocks in-process on SQLite: piece ownership, mirrors that hand out each range once,
settling and sweeping keys cut for a peer."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import KeyState
from kms.ingest import split_block
from kms.storage import migrate
from kms.storage import peer_repository as peers
from kms.storage import pool_repository as pool
from kms.storage import registry_repository as registry
from kms.storage.database import Database
from kms.storage.peer_repository import BitRange, LedgerConflict
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


def test_pieces_alternate_between_the_two_ends_and_both_ends_agree() -> None:
    at_a = split_block(block(), 1024, 64, "KME-A", "KME-B")
    at_b = split_block(block(), 1024, 64, "KME-B", "KME-A")
    assert [p.owner_kme_id for p in at_a] == [None, "KME-B", None, "KME-B"]
    assert [p.owner_kme_id for p in at_b] == ["KME-A", None, "KME-A", None]
    assert [p.material for p in at_a] == [p.material for p in at_b]


def store_as_b(db: Database, env: Envelope) -> None:
    events = pool.EventBatch(datetime.now(UTC))
    with db.write() as conn:
        pieces = split_block(block(), 1024, 64, "KME-B", "KME-A")
        pool.store_block_pieces(conn, env, "L-AB", pieces, {}, KeyState.ACTIVE, events, "test")
        events.flush(conn)


def take(db: Database, env: Envelope, ranges: list[BitRange]) -> list[bytes]:
    events = pool.EventBatch(datetime.now(UTC))
    with db.write() as conn:
        got = peers.take_mirrored(conn, env, "L-AB", "KME-A", ranges, 64, events, "kme:KME-A")
        events.flush(conn)
    return [bits for bits, _, _ in got]


def test_mirror_hands_out_the_named_bits_once(db: Database, env: Envelope) -> None:
    store_as_b(db, env)
    first = take(db, env, [BitRange("B1", 0, 256), BitRange("B1", 2048 + 512, 256)])
    assert first == [MATERIAL[0:32], MATERIAL[320:352]]
    with pytest.raises(LedgerConflict, match="already used"):
        take(db, env, [BitRange("B1", 128, 256)])  # overlaps the first range
    with pytest.raises(LedgerConflict, match="not cut by KME-A"):
        take(db, env, [BitRange("B1", 1024, 256)])  # B's own piece
    with pytest.raises(LedgerConflict, match="byte-aligned"):
        take(db, env, [BitRange("B1", 260, 256)])
    assert take(db, env, [BitRange("B1", 256, 256)]) == [MATERIAL[32:64]]


def test_a_mirror_is_retired_when_every_usable_range_is_taken(db: Database, env: Envelope) -> None:
    store_as_b(db, env)
    take(db, env, [BitRange("B1", 0, 512), BitRange("B1", 512, 480)])  # 32 bits left < 64
    with db.read() as conn:
        from kms.storage.rawsql import Raw

        state, material = Raw(conn).one(
            "SELECT state, material FROM key_blocks WHERE source_offset_bits = 0 AND link_id = 'L-AB'"
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
