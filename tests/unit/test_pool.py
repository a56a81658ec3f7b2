"""The pool in-process on SQLite: bit-exact cuts, block splitting, exhaustion, lifecycle rules."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import IllegalTransition, KeyState, check_transition
from kms.ingest import split_block
from kms.storage import migrate
from kms.storage import pool_repository as pool
from kms.storage import registry_repository as registry
from kms.storage.database import Database
from kms.storage.schema import key_blocks, keys
from qkd_adapters.keyblock import KeyBlock, Provenance


@pytest.fixture
def db(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    migrate.upgrade(url)
    database = Database(url)
    with database.write() as conn:
        registry.upsert_link(conn, "L1", "KME-X", "test", {})
    return database


def _block(material: bytes, bits: int | None = None) -> KeyBlock:
    prov = Provenance(protocol="csprng-test-source", is_qkd=False, adapter="test")
    return KeyBlock("L1", "B1", material, bits or len(material) * 8, prov)


def _store(db: Database, env: Envelope, material: bytes, storage_bits: int = 1024) -> None:
    pieces = split_block(_block(material), storage_bits, 64)
    events = pool.EventBatch(datetime.now(UTC))
    with db.write() as conn:
        pool.store_block_pieces(conn, env, "L1", pieces, {}, KeyState.ACTIVE, events, "test")
        events.flush(conn)


def _reserve(db: Database, env: Envelope, number: int, size: int) -> list[pool.CutKey] | None:
    events = pool.EventBatch(datetime.now(UTC))
    try:
        with db.write() as conn:
            cut = pool.cut_keys(
                conn,
                env,
                target_kme_id="KME-X",
                number=number,
                size_bits=size,
                min_key_size=64,
                events=events,
                actor="sae:A",
            )
            if cut is None:
                raise _Short  # roll back, as the delivery service does
            pool.insert_reserved_keys(
                conn,
                env,
                cut,
                size_bits=size,
                master_sae_id="A",
                slave_sae_ids=["B"],
                target_kme_id="KME-X",
                ttl=timedelta(seconds=60),
                policy="qkd",
                suite=None,
                kem_exchange_id=None,
                at=events.at,
            )
            events.flush(conn)
    except _Short:
        return None
    return cut


class _Short(Exception):
    pass


def test_split_block_is_byte_aligned_and_drops_short_tail() -> None:
    material = os.urandom(300)
    pieces = split_block(_block(material, bits=300 * 8 - 3), storage_bits=1024, min_bits=64)
    assert [p.source_offset_bits for p in pieces] == [0, 1024, 2048]
    assert b"".join(p.material for p in pieces) == material[:299]
    assert all(len(p.material) * 8 <= 1024 for p in pieces)
    tiny = split_block(_block(os.urandom(136)), storage_bits=1024, min_bits=128)
    assert [len(p.material) for p in tiny] == [128]  # the 8-byte tail is below min_bits


def test_keys_are_cut_bit_exactly_in_order(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    material = os.urandom(256)  # two storage blocks of 1024 bits
    _store(db, env, material)
    cut = _reserve(db, env, 3, 256)
    assert cut is not None
    assert b"".join(c.material for c in cut) == material[:96]
    with db.read() as conn:
        offsets = sorted(r.bit_offset for r in conn.execute(select(keys.c.bit_offset)))
    assert offsets == [0, 256, 512]
    # The next request continues exactly where the last stopped, spilling into the next block.
    more = _reserve(db, env, 2, 512)
    assert more is not None
    assert more[0].material == material[128:192] and more[1].material == material[192:256]


def test_short_pool_returns_none_and_changes_nothing(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    assert _reserve(db, env, 5, 256) is None
    with db.read() as conn:
        assert conn.execute(select(key_blocks.c.next_bit)).scalars().all() == [0]
        assert conn.execute(select(keys.c.key_id)).all() == []


def test_exhausted_block_is_zeroised(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    assert _reserve(db, env, 4, 256) is not None
    with db.read() as conn:
        row = conn.execute(select(key_blocks.c.state, key_blocks.c.material)).one()
    assert row.state == "exhausted" and row.material is None


def test_expire_reserved_zeroises(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    assert _reserve(db, env, 1, 256) is not None
    with db.write() as conn:
        assert len(pool.expire_reserved(conn, datetime.now(UTC) + timedelta(seconds=120), "test")) == 1
    with db.read() as conn:
        row = conn.execute(select(keys.c.state, keys.c.material)).one()
    assert row.state == "expired" and row.material is None


def test_lifecycle_rules() -> None:
    check_transition(None, KeyState.PRE_ACTIVE)
    check_transition(KeyState.ACTIVE, KeyState.RESERVED)
    check_transition(KeyState.RESERVED, KeyState.CONSUMED)
    for bad in (
        (KeyState.CONSUMED, KeyState.ACTIVE),
        (KeyState.EXPIRED, KeyState.RESERVED),
        (None, KeyState.ACTIVE),
    ):
        with pytest.raises(IllegalTransition):
            check_transition(*bad)


def test_key_block_validates_and_hides_material() -> None:
    prov = Provenance(protocol="p", is_qkd=False, adapter="a")
    with pytest.raises(ValueError):
        KeyBlock("L", "B", b"\x00" * 3, 32, prov)
    block = KeyBlock("L", "B", b"\xab" * 4, 32, prov)
    assert "ab" not in repr(block).lower().replace("block", "")
