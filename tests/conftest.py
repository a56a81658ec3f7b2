"""Shared fixtures: a real PostgreSQL server for the session, and KME processes per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kme_harness import RunningKme, running_kme
from tests.support.postgres import PostgresServer, postgres_available


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    ok, why = postgres_available()
    if not ok:
        if os.environ.get("QKMS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (QKMS_REQUIRE_POSTGRES=1) but unavailable: {why}")
        pytest.skip(f"PostgreSQL server binaries not found: {why}")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


_db_counter = iter(range(1_000_000))


def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None means the default SQLite file in the KME's working directory."""
    if backend == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database(f"qkms_{next(_db_counter)}")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    """One KME per module and backend, its pool filled by the random test source."""
    workdir: Path = tmp_path_factory.mktemp(f"kme-{request.param}")
    with running_kme(workdir, database_url(request.param, request)) as running:
        yield running
