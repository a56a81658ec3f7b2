"""The PostgreSQL test tooling itself: real server, fresh databases, loopback only, full cleanup."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.postgres import PostgresServer, postgres_available, postgres_server

pytestmark = pytest.mark.postgres

_AVAILABLE, _REASON = postgres_available()
_skip_unless_pg = pytest.mark.skipif(
    not _AVAILABLE and os.environ.get("QKMS_REQUIRE_POSTGRES") != "1", reason=_REASON
)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    # The module gets its own server so that stopping it in one test cannot affect shared fixtures.
    yield from postgres_server()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on ``port``, from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            if len(addr_hex) == 8:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1]))
            else:
                raw = bytes.fromhex(addr_hex)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_available_reports_reason() -> None:
    ok, reason = postgres_available()
    assert isinstance(ok, bool)
    assert reason


@_skip_unless_pg
def test_default_database_and_query(server: PostgresServer) -> None:
    assert server.dsn() == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/qkms"
    engine = sa.create_engine(server.dsn())
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "qkms"
            version = conn.execute(sa.text("SHOW server_version_num")).scalar_one()
            assert int(version) >= 150000
            assert conn.execute(sa.text("SHOW fsync")).scalar_one() == "off"
            assert int(conn.execute(sa.text("SHOW max_connections")).scalar_one()) >= 100
    finally:
        engine.dispose()


@_skip_unless_pg
def test_two_fresh_databases_are_isolated(server: PostgresServer) -> None:
    dsn_a = server.create_database("fixture_a")
    dsn_b = server.create_database("fixture_b")
    assert dsn_a.endswith("/fixture_a") and dsn_b.endswith("/fixture_b")
    assert server.create_database("fixture_a") == dsn_a  # idempotent
    eng_a, eng_b = sa.create_engine(dsn_a), sa.create_engine(dsn_b)
    try:
        with eng_a.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY, v text)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'a')"))
        with eng_a.connect() as conn:
            assert conn.execute(sa.text("SELECT v FROM t")).scalar_one() == "a"
        with eng_b.connect() as conn:
            exists = conn.execute(sa.text("SELECT to_regclass('public.t')")).scalar_one()
            assert exists is None
    finally:
        eng_a.dispose()
        eng_b.dispose()
    with pytest.raises(ValueError):
        server.create_database('bad"; DROP DATABASE qkms; --')


@_skip_unless_pg
def test_listens_on_loopback_only(server: PostgresServer) -> None:
    engine = sa.create_engine(server.dsn())
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW listen_addresses")).scalar_one() == "127.0.0.1"
            sock_dir = conn.execute(sa.text("SHOW unix_socket_directories")).scalar_one()
    finally:
        engine.dispose()
    assert Path(sock_dir) == server.socket_dir
    assert str(server.socket_dir).startswith(str(server.base_dir))
    assert (server.socket_dir / f".s.PGSQL.{server.port}").is_socket()
    if Path("/proc/net/tcp").exists():
        assert _listening_addresses(server.port) == {"127.0.0.1"}
    # Not reachable over IPv6 loopback either.
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                result = s.connect_ex(("::1", server.port))
            except OSError:  # no IPv6 loopback configured at all
                result = -1
            assert result != 0


@_skip_unless_pg
def test_stop_removes_everything() -> None:
    srv = PostgresServer(max_connections=20)
    with srv:
        base = srv.base_dir
        port = srv.port
        assert int((srv.data_dir / "PG_VERSION").read_text().strip()) >= 15
        engine = sa.create_engine(srv.create_database("scratch"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 41 + 1")).scalar_one() == 42
        engine.dispose()
    assert not srv.running
    assert not base.exists()
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0
    srv.stop()  # idempotent


@_skip_unless_pg
def test_stop_with_open_connection_is_fast() -> None:
    """-m fast must not wait for clients to disconnect (a leaked pool must not hang the suite)."""
    import time

    srv = PostgresServer().start()
    engine = sa.create_engine(srv.dsn())
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    t0 = time.monotonic()
    base = srv.base_dir
    srv.stop()
    assert time.monotonic() - t0 < 20
    assert not base.exists()
    with pytest.raises(sa.exc.OperationalError):
        conn.execute(sa.text("SELECT 1"))
    conn.invalidate()
    engine.dispose()


@_skip_unless_pg
def test_binaries_run_as_unprivileged_user() -> None:
    srv = PostgresServer()
    with srv:
        owner = srv.data_dir.stat().st_uid
        assert owner != 0
        if os.geteuid() != 0:
            assert owner == os.geteuid()
