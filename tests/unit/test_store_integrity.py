"""The schema the migrations build is the one the code declares, and ``qkms db check`` finds
every broken invariant of the key store (both backends, a real KME working directory)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, select, update

from kms.config import KmsSettings
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.storage import migrate
from kms.storage import pool_repository as pool
from kms.storage.integrity import run_checks
from kms.storage.schema import Base, keys
from tests.conftest import database_url

M, S = "SAE-M", "SAE-S"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Runtime, Path]]:
    res = init_workdir(
        tmp_path / "kme",
        "KME-T",
        [M, S],
        link_source="random",
        database_url=database_url(request.param, request),
        pool_overrides={"max_pool_bits": 1 << 20},
    )
    runtime = build_runtime(KmsSettings.load(res.config_path))
    runtime.make_filler().fill_once()
    yield runtime, res.config_path
    runtime.close()


def _schema_drift(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def test_migrations_build_exactly_the_declared_schema_and_step_back(site: tuple[Runtime, Path]) -> None:
    runtime, _ = site
    url = runtime.settings.database.url
    assert migrate.current_revision(url) == migrate.head_revision()
    assert _schema_drift(url) == []
    issued = runtime.service.get_keys(runtime.registry.get(M), S, number=3)  # type: ignore[arg-type]
    ids = [k.key_id for k in issued]
    with runtime.db.read() as conn:
        assert conn.execute(select(keys.c.key_count).where(keys.c.key_id == ids[0])).scalar_one() == 3
        before = pool.key_records(conn, ids)
    runtime.db.dispose()
    migrate.downgrade(url, "0006")  # splits the run into rows, re-declares the foreign key ...
    assert migrate.current_revision(url) == "0006"
    migrate.upgrade(url)  # ... and drops it again, keeping every key and the partial indexes
    assert _schema_drift(url) == []
    with runtime.db.read() as conn:
        held = conn.execute(select(keys.c.key_id, keys.c.key_count).where(keys.c.key_id.in_(ids)))
        assert sorted(tuple(r) for r in held) == sorted((k, 1) for k in ids)
        assert pool.key_records(conn, ids) == before


def _db_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", "db", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_check_passes_a_healthy_store_and_names_each_broken_invariant(site: tuple[Runtime, Path]) -> None:
    runtime, config = site
    master = runtime.registry.get(M)
    slave = runtime.registry.get(S)
    assert master is not None and slave is not None
    issued = runtime.service.get_keys(master, S, number=6)
    runtime.service.get_keys_with_ids(slave, M, [issued[0].key_id])  # one consumed, five reserved
    run = runtime.service.get_keys(master, S, number=3)  # stays one row
    healthy = _db_check(config)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    with runtime.db.read() as conn:
        assert all(c.passed for c in run_checks(conn))

    ids = [k.key_id for k in issued]
    with runtime.db.write() as conn:
        first = conn.execute(select(keys.c.block_id, keys.c.bit_offset).where(keys.c.key_id == ids[1])).one()
        # ids[2] now claims the bits of ids[1]; ids[3] a block that does not exist; ids[4] runs off
        # the end of its block; ids[0] (consumed) holds material again.
        conn.execute(update(keys).where(keys.c.key_id == ids[2]).values(bit_offset=first.bit_offset))
        conn.execute(update(keys).where(keys.c.key_id == ids[3]).values(block_id=10**9))
        conn.execute(update(keys).where(keys.c.key_id == ids[4]).values(bit_offset=10**8))
        # (its redelivery window over: expires_at is the window's end for a consumed key).
        past = datetime.now(UTC) - timedelta(hours=1)
        conn.execute(
            update(keys).where(keys.c.key_id == ids[0]).values(material=b"\x00" * 60, expires_at=past)
        )
        # A run stored under its second member's ID instead of its first.
        conn.execute(update(keys).where(keys.c.key_id == run[0].key_id).values(key_id=run[1].key_id))
    with runtime.db.read() as conn:
        found = {c.name: c for c in run_checks(conn)}
    assert found["key block exists"].examples == (ids[3],)
    assert found["key inside its block"].examples == (ids[4],)
    assert found["no bit served twice"].violations == 1
    assert found["no bit served twice"].examples[0] in (ids[1], ids[2])
    assert found["closed keys zeroised"].examples == (ids[0],)
    assert found["key runs well formed"].examples == (run[1].key_id,)

    broken = _db_check(config)
    assert broken.returncode == 1
    assert found["run IDs consistent"].examples == (run[1].key_id,)  # the renamed run holds itself twice
    # (the CLI also opens material with the KEK: ids[0]'s planted bytes do not authenticate)
    assert broken.stdout.count("BROKEN") == 7, broken.stdout


def test_db_check_opens_material_and_accounts_for_every_consumed_key(site: tuple[Runtime, Path]) -> None:
    """The checks issue 13 added: material lengths, material that no longer opens with the KEK,
    consumption without an audit record, a key reachable through two rows."""
    runtime, _ = site
    master, slave = runtime.registry.get(M), runtime.registry.get(S)
    assert master is not None and slave is not None
    issued = runtime.service.get_keys(master, S, number=5)
    ids = [k.key_id for k in issued]
    runtime.service.get_keys_with_ids(slave, M, ids[:1])
    with runtime.db.read() as conn:
        assert all(c.passed for c in run_checks(conn, runtime.envelope))
        assert all(c.passed for c in run_checks(conn, runtime.envelope, sample=2))
    single = runtime.service.get_keys(master, S, number=1)[0].key_id
    with runtime.db.write() as conn:
        # One key's sealed material one byte short; another's replaced by a third key's (it no
        # longer authenticates under its own key_ID); a fourth consumed with no delivery record.
        conn.execute(update(keys).where(keys.c.key_id == single).values(material=b"\x01" * 59))
        moved = conn.execute(select(keys.c.material).where(keys.c.key_id == ids[3])).scalar_one()
        conn.execute(update(keys).where(keys.c.key_id == ids[2]).values(material=moved))
        conn.execute(update(keys).where(keys.c.key_id == ids[1]).values(state="consumed", material=None))
    with runtime.db.read() as conn:
        found = {c.name: c for c in run_checks(conn, runtime.envelope)}
    assert found["material length"].examples == (single,)
    assert set(found["material opens with the KEK"].examples) == {single, ids[2]}
    assert found["consumption recorded"].examples == (ids[1],)
    assert [c.name for c in found.values() if not c.passed] == [
        "material length",
        "consumption recorded",
        "material opens with the KEK",
    ]
