"""The pool in-process on SQLite: bit-exact cuts, block splitting, exhaustion, lifecycle rules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from kms.crypto.envelope import Envelope
from kms.domain.key_ids import run_member
from kms.domain.lifecycle import IllegalTransition, KeyState, check_transition
from kms.runtime.filler import split_block
from kms.storage import migrate
from kms.storage import pool_repository as pool
from kms.storage import registry_repository as registry
from kms.storage.database import Database
from kms.storage.integrity import run_checks
from kms.storage.schema import key_blocks, keys
from qkd_adapters.keyblock import KeyBlock, Provenance
from tests.conftest import database_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Database]:
    url = database_url(request.param, request) or f"sqlite:///{tmp_path / 'pool.db'}"
    migrate.upgrade(url)
    database = Database(url)
    with database.write() as conn:
        registry.upsert_link(conn, "L1", "KME-X", "test", {})
    yield database
    database.dispose()


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
        offsets = sorted(r["bit_offset"] for r in pool.key_records(conn).values())
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


def test_a_request_from_one_block_is_one_run_row(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    material = os.urandom(256)  # two storage blocks of 1024 bits
    _store(db, env, material)
    cut = _reserve(db, env, 6, 256)  # four keys from the first block, two from the second
    assert cut is not None
    ids = [c.key_id for c in cut]
    assert ids[:4] == [run_member(ids[0], i) for i in range(4)]
    assert ids[4:] == [run_member(ids[4], i) for i in range(2)]
    with db.read() as conn:
        rows = conn.execute(
            select(keys.c.key_id, keys.c.key_count, keys.c.bit_offset).order_by(keys.c.key_id)
        )
        assert sorted((r.key_id, r.key_count, r.bit_offset) for r in rows) == sorted(
            [(ids[0], 4, 0), (ids[4], 2, 0)]
        )
        records = pool.key_records(conn, ids)
    assert list(records) == ids
    assert [r["bit_offset"] for r in records.values()] == [0, 256, 512, 768, 0, 256]
    # Each member's slice of the run's material is that key, sealed under its own key_ID.
    assert [env.open(r["material"], pool.key_aad(k)) for k, r in records.items()] == [c.material for c in cut]


def test_serving_part_of_a_run_splits_it_and_loses_nothing(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    cut = _reserve(db, env, 4, 256)
    assert cut is not None
    ids = [c.key_id for c in cut]
    now = datetime.now(UTC)
    with db.write() as conn:
        stored = pool.load_keys_for_update(conn, [ids[2], ids[0]])
        assert [stored[k].row_id for k in (ids[2], ids[0])] == [ids[0], ids[0]]
        assert pool.whole_rows(stored.values()) is None
        assert env.open(stored[ids[2]].material or b"", pool.key_aad(ids[2])) == cut[2].material
        assert pool.mark_served(conn, stored.values(), "B", now) == [ids[2], ids[0]]
    with db.read() as conn:
        assert conn.execute(select(keys.c.key_count)).scalars().all() == [1, 1, 1, 1]
        records = pool.key_records(conn, ids)
        # The repository alone: the service appends the delivery record, so that check is left out.
        assert all(c.passed for c in run_checks(conn) if c.name != "consumption recorded")
    assert [records[k]["state"] for k in ids] == ["consumed", "reserved", "consumed", "reserved"]
    assert records[ids[0]]["material"] is None and records[ids[2]]["material"] is None
    assert env.open(records[ids[3]]["material"], pool.key_aad(ids[3])) == cut[3].material
    # The rest, now single rows, is served as usual.
    with db.write() as conn:
        rest = pool.load_keys_for_update(conn, [ids[1], ids[3]])
        assert pool.whole_rows(rest.values()) == [ids[1], ids[3]]
        assert env.open(rest[ids[1]].material or b"", pool.key_aad(ids[1])) == cut[1].material
        pool.mark_served(conn, rest.values(), "B", now)
    with db.read() as conn:
        assert {r["state"] for r in pool.key_records(conn, ids).values()} == {"consumed"}


def test_a_whole_run_is_consumed_in_one_row(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    cut = _reserve(db, env, 3, 256)
    assert cut is not None
    ids = [c.key_id for c in cut]
    with db.write() as conn:
        stored = pool.load_keys_for_update(conn, ids)
        assert pool.whole_rows(stored.values()) == [ids[0]]
        assert pool.consume_if_unchanged(conn, [ids[0]], "B", datetime.now(UTC))
        # Already consumed: a second attempt changes nothing and says so.
        assert not pool.consume_if_unchanged(conn, [ids[0]], "B", datetime.now(UTC))
    with db.read() as conn:
        row = conn.execute(select(keys.c.key_count, keys.c.state, keys.c.material)).one()
    assert (row.key_count, row.state, row.material) == (3, "consumed", None)


def test_an_expired_run_names_every_key(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    cut = _reserve(db, env, 3, 256)
    assert cut is not None
    with db.write() as conn:
        expired = pool.expire_reserved(conn, datetime.now(UTC) + timedelta(seconds=120), "test")
    assert expired == [c.key_id for c in cut]
    with db.read() as conn:
        records = pool.key_records(conn)
    assert {(r["state"], r["material"]) for r in records.values()} == {("expired", None)}


def test_a_key_id_that_is_no_run_member_is_not_found(db: Database) -> None:
    env = Envelope(os.urandom(32), "k")
    _store(db, env, os.urandom(128))
    cut = _reserve(db, env, 2, 256)
    assert cut is not None
    beyond = run_member(cut[0].key_id, 2)  # the run holds members 0 and 1 only
    with db.read() as conn:
        assert pool.load_keys_for_update(conn, [beyond, cut[1].key_id]).keys() == {cut[1].key_id}
        assert pool.key_records(conn, [beyond]) == {}
