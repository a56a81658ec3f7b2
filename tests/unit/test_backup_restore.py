"""Backup and restore that cannot double-serve (issue 16 part 3, docs/DECISIONS.md D-28), on SQLite
and PostgreSQL with a real KME process: snapshot while serving, serve more keys, restore, and prove
that no key served after the snapshot (nor any key or pool bit the snapshot held) is served again,
that the store checks clean and that the audit chain still verifies against its cut-back anchors.
Bad input: a backup of another KME, a tampered file and a restore over a running KME are each
refused with one line and change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from kms.provision.workdir import init_workdir
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
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},
    )


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stdout, done.stderr
    assert all(w in lines[0] for w in words), lines[0]


def _store_digest(url: str) -> str:
    """A digest of every key and block row: proves a refused restore changed nothing."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT key_id, state, material FROM keys ORDER BY key_id")).all()
            blocks = conn.execute(text("SELECT id, state, next_bit FROM key_blocks ORDER BY id")).all()
        return hashlib.sha256(repr((rows, blocks)).encode()).hexdigest()
    finally:
        engine.dispose()


def _get(kme: RunningKme, number: int) -> list[dict[str, str]]:
    answer = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": number})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["keys"])


def _fetch(kme: RunningKme, keys: list[dict[str, str]]) -> int:
    ids = [{"key_ID": k["key_ID"]} for k in keys]
    return kme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids}).status_code


def _relabel(backup: Path, other_workdir: Path, tmp_path: Path, backend: str) -> Path:
    """A forgery: another KME's backup claiming this KME's ID (and backend), MAC'd again with the
    other KEK, which its manifest names as the KEK to check it with."""
    from kms.crypto.envelope import Envelope
    from kms.service import backup_archive

    archive = backup_archive.read(backup)
    member = backup_archive.DATABASE[archive.manifest["backend"]]
    as_member = backup_archive.DATABASE[backend]
    digests = {**archive.manifest["digests"], as_member: archive.manifest["digests"][member]}
    raw = backup_archive.manifest_bytes(
        {**archive.manifest, "kme_id": "KME-T", "backend": backend, "digests": digests}
    )
    mac = Envelope((other_workdir / "kek.bin").read_bytes(), "kek-1").mac(raw, "kek-1")
    parts = tmp_path / "forgery"
    parts.mkdir()
    backup_archive.extract(archive, member, parts / as_member)
    backup_archive.extract(archive, backup_archive.CONFIG, parts / backup_archive.CONFIG)
    forged = tmp_path / "forged.qkmsbackup"
    backup_archive.write(forged, raw, mac, (as_member, parts / as_member), parts / backup_archive.CONFIG)
    return forged


def test_backup_serve_restore_serves_nothing_twice(kme: RunningKme, tmp_path: Path) -> None:
    config, url = kme.process.config_path, kme.settings.database.url
    before = _get(kme, 6)  # reserved when the snapshot is taken, fetched only after it
    backup = tmp_path / "kme.qkmsbackup"
    taken = _qkms(config, "backup", "--out", str(backup))
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert backup.stat().st_mode & 0o777 == 0o600

    after = _get(kme, 6)  # not in the snapshot at all
    assert _fetch(kme, before) == 200 and _fetch(kme, after) == 200
    unfetched = _get(kme, 4)  # reserved after the snapshot, never fetched
    served = {k["key"] for k in before + after + unfetched}

    # Refused while the KME runs; then a tampered file and another KME's backup: nothing changes.
    _one_line_error(_qkms(config, "restore", str(backup)), "stop it before restoring")
    kme.process.stop()  # (a clean stop ends redelivery windows: the digest is taken after it)
    digest = _store_digest(url)
    tampered = tmp_path / "tampered.qkmsbackup"
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the database snapshot
    tampered.write_bytes(bytes(data))
    _one_line_error(_qkms(config, "restore", str(tampered)), "tampered")
    other = tmp_path / "other"
    init_workdir(other, "KME-OTHER", [M, S], port=0, link_source=None)
    other_backup = tmp_path / "other.qkmsbackup"
    assert _qkms(other / "qkms.toml", "backup", "--out", str(other_backup)).returncode == 0
    _one_line_error(_qkms(config, "restore", str(other_backup)), "KME-OTHER", "not of this KME")
    # The same file relabelled as ours and re-MAC'd under the other KME's KEK (which its manifest
    # names): the MAC is checked only under KEKs this KME holds, so it is refused.
    _one_line_error(
        _qkms(
            config,
            "restore",
            str(
                _relabel(
                    other_backup, other, tmp_path, "sqlite" if url.startswith("sqlite") else "postgresql"
                )
            ),
        ),
        "authenticate",
    )
    _one_line_error(_qkms(config, "restore", str(tmp_path / "missing")), "not found")
    assert _store_digest(url) == digest

    restored = _qkms(config, "restore", str(backup))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "db check: clean; audit verify: intact" in restored.stdout, restored.stdout

    engine = create_engine(url)
    with engine.connect() as conn:
        records = {
            a: json.loads(d)
            for a, d in conn.execute(
                text(
                    "SELECT action, data FROM audit_records WHERE action IN ('backup.restored', 'backup.fenced')"
                )
            )
        }
        live = conn.execute(
            text("SELECT COUNT(*) FROM keys WHERE state IN ('reserved', 'suspended') OR material IS NOT NULL")
        ).scalar_one()
        usable_blocks = conn.execute(
            text("SELECT COUNT(*) FROM key_blocks WHERE state IN ('active', 'pre_active', 'suspended')")
        ).scalar_one()
    engine.dispose()
    assert live == 0 and usable_blocks == 0
    assert records["backup.fenced"]["keys"] >= len(before) and records["backup.fenced"]["blocks"] > 0
    assert records["backup.restored"]["backup"] == backup.name
    # The server signed checkpoints after the snapshot (at least at its clean stop): the restore
    # names them as given up and keeps the anchor file that holds them.
    lost = records["backup.restored"]["lost_checkpoints"]
    assert lost is not None and lost[0] <= lost[1], records["backup.restored"]
    kept = records["backup.restored"]["anchor_file_kept_as"]
    assert kept and (config.parent / "audit-anchors" / kept).is_file()

    kme.process.start()
    # Nothing served after the snapshot is served again: not the keys reserved before it, not those
    # made after it, fetched or not.
    for keys in (before, after, unfetched):
        assert _fetch(kme, keys) != 200
    kme.process.wait_for_keys(kme.client(M), S, minimum=16)
    fresh = _get(kme, 16)
    assert not served & {k["key"] for k in fresh}
    assert _fetch(kme, fresh) == 200
    for args in (("db", "check"), ("audit", "verify")):
        done = _qkms(config, *args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_restore_on_a_new_host_adopts_the_verified_chain(kme: RunningKme, tmp_path: Path) -> None:
    """The store and the anchor file are lost (the certificates and the KEK are kept, as a host
    rebuilt from its configuration management): the restore brings the store back fenced, adopts
    the restored chain's checkpoints as anchors (recorded), and the KME serves again."""
    config, url = kme.process.config_path, kme.settings.database.url
    reserved = _get(kme, 4)
    backup = tmp_path / "kme.qkmsbackup"
    assert _qkms(config, "backup", "--out", str(backup)).returncode == 0
    kme.process.stop()
    if url.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm"):
            Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
    else:
        from sqlalchemy.engine import make_url

        engine = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)'))
        engine.dispose()
    for anchors in (config.parent / "audit-anchors").iterdir():
        anchors.unlink()
    restored = _qkms(config, "restore", str(backup))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "there was no" in restored.stdout and "audit verify: intact" in restored.stdout, restored.stdout
    engine = create_engine(url)
    with engine.connect() as conn:
        data = conn.execute(
            text("SELECT data FROM audit_records WHERE action = 'backup.restored'")
        ).scalar_one()
    engine.dispose()
    assert json.loads(data)["anchors_adopted"] is True
    kme.process.start()
    assert _fetch(kme, reserved) != 200
    kme.process.wait_for_keys(kme.client(M), S, minimum=4)
    assert _fetch(kme, _get(kme, 4)) == 200
