"""Every file the KME creates is owner-only: after ``qkms init``, after serving, and when the database
file is created by the server or by a migration rather than by init (finding 6 of issue 13)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text

from kms.provision.workdir import init_workdir
from kms.storage import migrate
from kms.storage.database import Database
from tests.kme_harness import running_kme

M, S = "SAE-M", "SAE-S"
USUAL_UMASK = 0o022  # what most systems give a process: files 0644 unless the KME says otherwise


def loose_entries(root: Path) -> list[str]:
    """Every file or directory under ``root`` (itself included) that group or others may use."""
    loose = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(root)} {oct(mode)}")
    return loose


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_qkms_init_creates_an_owner_only_site(tmp_path: Path) -> None:
    site = tmp_path / "site"
    args = ["init", "--dir", str(site), "--kme-id", "KME-A", "--sae", M, "--sae", S]
    subprocess.run(
        [sys.executable, "-m", "kms", *args, "--auditor", "AUD-1", "--link-source", "none"],
        check=True,
        capture_output=True,
        preexec_fn=lambda: os.umask(USUAL_UMASK),
    )
    assert mode_of(site / "qkms.toml") == 0o600
    assert mode_of(site / "qkms.db") == 0o600
    assert mode_of(site / "kek.bin") == 0o600
    assert mode_of(site) == 0o700
    assert loose_entries(site) == []


def test_init_into_an_existing_open_directory_closes_it(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    site.chmod(0o755)
    with umask(USUAL_UMASK):
        init_workdir(site, "KME-A", [M, S], link_source=None)
        assert os.umask(USUAL_UMASK) == USUAL_UMASK  # init as a library leaves the caller's umask
    assert loose_entries(site) == []


def test_database_created_by_the_server_is_owner_only_with_its_wal_and_shm(tmp_path: Path) -> None:
    path = tmp_path / "data" / "server.db"
    with umask(USUAL_UMASK):
        db = Database(f"sqlite:///{path}", background_checkpoints=True)
        try:
            with db.write() as conn:
                conn.execute(text("CREATE TABLE t (x INTEGER)"))
                conn.execute(text("INSERT INTO t VALUES (1)"))
            wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
            assert wal.exists() and shm.exists()
            assert [mode_of(p) for p in (path, wal, shm)] == [0o600, 0o600, 0o600]
        finally:
            db.dispose()
    assert mode_of(path.parent) == 0o700


def test_database_created_by_a_migration_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "migrated.db"
    with umask(USUAL_UMASK):
        migrate.upgrade(f"sqlite:///{path}")
    assert loose_entries(tmp_path) == []
    assert mode_of(path) == 0o600


def test_a_database_left_readable_by_an_older_version_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with umask(USUAL_UMASK):
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.commit()
        assert mode_of(path) == 0o644  # as SQLite creates it on its own
        db = Database(f"sqlite:///{path}")
        try:
            assert [mode_of(p) for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))] == [0o600] * 3
        finally:
            db.dispose()
            conn.close()


def test_a_served_site_has_no_file_that_group_or_others_can_use(tmp_path: Path) -> None:
    """The family check: walk the whole site directory while it serves and after a clean stop."""
    site = tmp_path / "site"
    with umask(USUAL_UMASK), running_kme(site, saes=(M, S), fill_keys=32) as kme:
        kme.process.wait_for_keys(kme.client(M), S, 8)
        keys = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 4}).json()["keys"]
        ids = [{"key_ID": k["key_ID"]} for k in keys]
        assert kme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids}).status_code == 200
        assert (site / "qkms.db-wal").exists()
        assert loose_entries(site) == []
    assert (site / "qkms.db").exists()
    assert loose_entries(site) == []
