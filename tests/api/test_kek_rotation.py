"""Online KEK rotation (issue 16 part 2, docs/DECISIONS.md D-27) against a serving KME, on SQLite and
PostgreSQL: a real ``qkms kek rotate`` process is killed with SIGKILL mid-way, run again (it resumes),
and afterwards every record is sealed under the new version, ``db check`` and ``audit verify`` are
clean, keys reserved before the rotation are still delivered with the same material, and the old
version can be retired (its file destroyed) only once nothing is sealed under it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import database_url
from tests.kme_harness import RunningKme, running_kme

M, S = "SAE-M", "SAE-S"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kme(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningKme]:
    with running_kme(tmp_path / "kme", database_url(request.param, request), saes=(M, S)) as running:
        yield running


def _qkms(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "400"},
    )


def _sealed_by_version(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            out: dict[str, int] = {}
            for table, column in (
                ("keys", "material"),
                ("key_blocks", "material"),
                ("kme_keys", "sealed_seed"),
            ):
                sql = f"SELECT kek_id, COUNT(*) FROM {table} WHERE {column} IS NOT NULL GROUP BY kek_id"
                for kek_id, n in conn.execute(text(sql)):
                    out[kek_id] = out.get(kek_id, 0) + int(n)
            return out
    finally:
        engine.dispose()


def _keyring(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {k: s for k, s in conn.execute(text("SELECT kek_id, state FROM kek_versions"))}
    finally:
        engine.dispose()


def test_rotation_killed_mid_way_resumes_and_the_old_version_retires(kme: RunningKme) -> None:
    config, url = kme.process.config_path, kme.settings.database.url
    reserved = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 8}).json()["keys"]
    before = _sealed_by_version(url)
    assert set(before) == {"kek-1"} and before["kek-1"] > 10, before

    # One row per batch and pauses make the rotation slow enough (several seconds) to be killed in
    # the middle, after the check below that a second rotation is refused meanwhile.
    cmd = [
        sys.executable,
        "-m",
        "kms",
        "kek",
        "rotate",
        "--batch",
        "1",
        "--pause",
        "0.25",
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = _sealed_by_version(url)
        if counts.get("kek-2", 0) >= 3 and counts.get("kek-1", 0) > 0:
            break
        assert proc.poll() is None, "the rotation ended before it could be killed"
        time.sleep(0.05)
    # Held still (SIGSTOP) half-way, so that however slowly the next command starts the rotation is
    # still under way: a second rotation (or a retirement) meanwhile is refused with one line.
    os.kill(proc.pid, signal.SIGSTOP)
    second = _qkms(config, "kek", "rotate")
    assert second.returncode == 2 and "another `qkms kek` command" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    mid = _sealed_by_version(url)
    assert mid.get("kek-1", 0) > 0 and mid.get("kek-2", 0) > 0, mid  # killed half-way
    assert _keyring(url) == {"kek-1": "draining", "kek-2": "active"}

    # Half-way, the store is consistent (each row opens under the version it names) and serves.
    check = _qkms(config, "db", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 2}).status_code == 200
    refused = _qkms(config, "kek", "retire", "kek-1")
    assert (
        refused.returncode == 2
        and "still seals" in refused.stderr
        and len(refused.stderr.strip().splitlines()) == 1
    )

    resumed = _qkms(config, "kek", "rotate")
    assert resumed.returncode == 0 and "resuming the rotation to KEK version kek-2" in resumed.stdout, (
        resumed.stdout
    )
    after = _sealed_by_version(url)
    assert set(after) == {"kek-2"}, after
    assert _keyring(url) == {"kek-1": "drained", "kek-2": "active"}

    # Keys reserved under kek-1 are delivered, re-sealed, with the material the master got.
    ids = [{"key_ID": k["key_ID"]} for k in reserved]
    fetched = kme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids})
    assert fetched.status_code == 200
    assert {k["key_ID"]: k["key"] for k in fetched.json()["keys"]} == {
        k["key_ID"]: k["key"] for k in reserved
    }

    old_file = Path(str(kme.settings.kek.file))
    assert old_file.exists()
    retired = _qkms(config, "kek", "retire", "kek-1")
    assert retired.returncode == 0, retired.stdout + retired.stderr
    assert not old_file.exists()
    assert _keyring(url) == {"kek-1": "retired", "kek-2": "active"}
    # The KME keeps serving on kek-2 alone, and the store and the audit check clean.
    assert kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 2}).status_code == 200
    for args in (("db", "check"), ("audit", "verify")):
        done = _qkms(config, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    engine = create_engine(url)
    with engine.connect() as conn:
        actions = [
            r[0]
            for r in conn.execute(
                text("SELECT action FROM audit_records WHERE action LIKE 'kek.%' ORDER BY seq")
            )
        ]
    engine.dispose()
    assert actions == ["kek.rotation_started", "kek.rotation_finished", "kek.retired"]

    # A restart loads kek-2 from the keyring, though the configuration still names the destroyed file.
    kme.process.stop()
    kme.process.start()
    assert kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 2}).status_code == 200
