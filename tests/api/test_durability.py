"""A KME refuses a PostgreSQL that can forget commits it acknowledged (issue 13's known gap after
finding 7): with ``synchronous_commit = off`` a crash once left the same key bytes under two key_IDs.
The settings are read back through the KME's own connections (per-database overrides count), and
the KME must exit 4 before it listens. The suite's own cluster runs without durability for speed and
its KMEs are told to accept that (``tests/support/postgres.py``); here a durable cluster is used."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import init_workdir
from kms.storage.database import Database
from kms.storage.durability import durability_problems
from tests.support.postgres import PostgresServer, postgres_available

pytestmark = pytest.mark.postgres
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@pytest.fixture(scope="module")
def durable_pg() -> Iterator[PostgresServer]:
    ok, why = postgres_available()
    if not ok:
        pytest.skip(f"PostgreSQL server binaries not found: {why}")
    server = PostgresServer(extra_settings=DURABLE)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _problems(pg: PostgresServer, name: str, **settings: str) -> tuple[str, list[str]]:
    url = pg.create_database(name)
    engine = create_engine(pg.dsn("postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for setting, value in settings.items():
            conn.execute(text(f'ALTER DATABASE "{name}" SET {setting} = {value}'))
    engine.dispose()
    db = Database(url)
    try:
        return url, durability_problems(db)
    finally:
        db.dispose()


def test_a_durable_server_passes_and_local_synchronous_commit_too(durable_pg: PostgresServer) -> None:
    assert _problems(durable_pg, "qkms_durable_default")[1] == []
    assert _problems(durable_pg, "qkms_durable_local", synchronous_commit="local")[1] == []


def test_each_unsafe_setting_is_named(pg_server: PostgresServer) -> None:
    _, problems = _problems(pg_server, "qkms_durable_throwaway")  # fsync, synchronous_commit, fpw off
    assert len(problems) == 3
    for setting in DURABLE:
        assert any(f"{setting} = off" in p for p in problems), problems


def test_a_kme_refuses_synchronous_commit_off(
    durable_pg: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, problems = _problems(durable_pg, "qkms_durable_off", synchronous_commit="off")
    assert len(problems) == 1 and "synchronous_commit = off" in problems[0]
    monkeypatch.setenv("QKMS_DATABASE__REQUIRE_DURABLE_COMMITS", "true")  # the product's default
    result = init_workdir(tmp_path / "kme", "KME-D", ["SAE-1", "SAE-2"], port=free_port(), database_url=url)
    proc = KmeProcess(result.config_path, KmsSettings.load(result.config_path).kme.port)
    try:
        with pytest.raises(RuntimeError) as refused:
            proc.start(timeout=60)
    finally:
        proc.stop()
    message = str(refused.value)
    assert "exited with 4" in message and "database_not_durable" in message, message
