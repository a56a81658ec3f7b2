"""Redelivery windows across a stop (issue 13, a gap left after finding 7): a KME stopped with
consumed keys inside their window used to keep that material for good, so ``qkms db check`` on the
stopped KME — or after it — reported "closed keys zeroised" violations on a healthy store. Now a
clean stop ends every window (audited ``keys.redelivery_closed``, signed by the final checkpoint)
and the first sweep at start ends the windows a crash left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from kms.lab.launcher import KmeProcess
from tests.kme_harness import RunningKme, running_kme

M, S = "SAE-M", "SAE-S"
POOL = {"expiry_sweep_seconds": 0.2}


def _qkms(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )


def _consume(kme: RunningKme, number: int = 4) -> None:
    answer = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": number}).json()
    ids = [{"key_ID": k["key_ID"]} for k in answer["keys"]]
    assert kme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids}).status_code == 200


def _held(kme: RunningKme) -> int:
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            sql = "SELECT COUNT(*) FROM keys WHERE state = 'consumed' AND material IS NOT NULL"
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


def test_a_clean_stop_ends_every_window_and_the_stopped_store_checks_clean(tmp_path: Path) -> None:
    window = 8.0
    with running_kme(tmp_path / "kme", saes=(M, S), pool={**POOL, "redelivery_seconds": window}) as kme:
        _consume(kme)
        consumed_at = time.monotonic()
        assert _held(kme) > 0  # inside the window: material kept for a lost answer
        config = kme.process.config_path
    assert time.monotonic() - consumed_at < window, "the stop took longer than the window"
    assert _held(kme) == 0
    time.sleep(max(0.0, consumed_at + window + 0.5 - time.monotonic()))  # the window is over now
    check = _qkms(config, "db", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    verify = _qkms(config, "audit", "verify")
    assert verify.returncode == 0 and "0 records after the last checkpoint" in verify.stdout, verify.stdout
    engine = create_engine(kme.settings.database.url)
    with engine.connect() as conn:
        closed = conn.execute(
            text("SELECT COUNT(*) FROM audit_records WHERE action = 'keys.redelivery_closed'")
        ).scalar_one()
    engine.dispose()
    assert closed == 1


def check_result(table: str, check: str) -> str:
    """The result column of the ``qkms db check`` row naming ``check`` (the table pads its columns to
    the longest check's text, so the row is found by its words, not by a fixed spacing)."""
    rows = [line for line in table.splitlines() if check in line]
    assert len(rows) == 1, table
    return rows[0].split("│")[2].strip()


def test_windows_a_crash_left_end_at_the_next_start(tmp_path: Path) -> None:
    with running_kme(tmp_path / "kme", saes=(M, S), pool={**POOL, "redelivery_seconds": 1.0}) as kme:
        _consume(kme)
        kme.process.kill()  # no clean stop: the material stays
        assert _held(kme) > 0
        time.sleep(1.5)  # the window ends while the KME is down
        stopped = _qkms(kme.process.config_path, "db", "check")
        assert stopped.returncode == 1 and check_result(stopped.stdout, "redelivery window") == "BROKEN", (
            stopped.stdout
        )
        restarted = KmeProcess(kme.process.config_path, kme.settings.kme.port).start()
        try:
            deadline = time.monotonic() + 10
            while _held(kme) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _held(kme) == 0
        finally:
            restarted.stop()
