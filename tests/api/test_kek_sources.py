"""KEK rotation from each kind of source (file, environment variable, PKCS#11 token) and its bad
inputs (issue 16 part 2, docs/DECISIONS.md D-27), through the real ``qkms`` CLI on a KME's store: a
KEK that is not the recorded version, a missing or malformed new KEK and an unknown version are each
refused with one line and change nothing."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from kms.lab.launcher import free_port
from tests.support.softhsm import SoftHsm, softhsm_available, softhsm_required


def _qkms(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", *args, "--config", str(work / "qkms.toml")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "400", **(env or {})},
    )


def _init(work: Path, *extra: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kms", "init", "--dir", str(work), "--kme-id", "KME-K", "--sae", "A", "--sae", "B",
         "--link-source", "random", "--port", str(free_port()), *extra],
        capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _keyring(work: Path) -> dict[str, tuple[str, str]]:
    engine = create_engine(f"sqlite:///{work / 'qkms.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT kek_id, state, source FROM kek_versions"))
            return {k: (s, src) for k, s, src in rows}
    finally:
        engine.dispose()


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in done.stdout + done.stderr


@pytest.fixture
def work(tmp_path: Path) -> Path:
    _init(tmp_path / "kme")
    assert _qkms(tmp_path / "kme", "kek", "status").returncode == 0  # records kek-1 in the keyring
    return tmp_path / "kme"


def test_a_kek_that_is_not_the_recorded_version_changes_nothing(work: Path) -> None:
    kek = work / "kek.bin"
    kek.write_bytes(os.urandom(32))
    before = sorted(p.name for p in work.iterdir())
    _one_line_error(_qkms(work, "kek", "rotate"), "kek-1", "wrong key")
    assert _keyring(work) == {"kek-1": ("active", "file")}
    assert sorted(p.name for p in work.iterdir()) == before  # no new KEK file either


def test_a_wrong_kek_on_a_fresh_keyring_is_refused_too(tmp_path: Path) -> None:
    work = tmp_path / "kme"
    _init(work)
    engine = create_engine(f"sqlite:///{work / 'qkms.db'}")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM kek_versions"))  # as a database from before migration 0014
    engine.dispose()
    (work / "kek.bin").write_bytes(os.urandom(32))
    _one_line_error(_qkms(work, "kek", "status"), "does not open", "wrong key")
    assert _keyring(work) == {}


def test_new_kek_from_the_environment_and_bad_ones(work: Path) -> None:
    _one_line_error(
        _qkms(work, "kek", "rotate", "--env-var", "QKMS_TEST_NEW_KEK"), "QKMS_TEST_NEW_KEK", "not set"
    )
    short = {"QKMS_TEST_NEW_KEK": base64.b64encode(os.urandom(16)).decode()}
    _one_line_error(_qkms(work, "kek", "rotate", "--env-var", "QKMS_TEST_NEW_KEK", env=short), "32 bytes")
    _one_line_error(_qkms(work, "kek", "retire", "kek-9"), "no KEK version")
    assert _keyring(work) == {"kek-1": ("active", "file")}

    good = {"QKMS_TEST_NEW_KEK": base64.b64encode(os.urandom(32)).decode()}
    done = _qkms(work, "kek", "rotate", "--env-var", "QKMS_TEST_NEW_KEK", env=good)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _keyring(work) == {"kek-1": ("drained", "file"), "kek-2": ("active", "env")}
    # The next rotation from an environment KEK must name its successor.
    _one_line_error(_qkms(work, "kek", "rotate", env=good), "--env-var")
    for args in (("db", "check"), ("audit", "verify")):
        checked = _qkms(work, *args, env=good)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    # Without the variable, the store cannot be opened: one line, not a stack trace.
    _one_line_error(_qkms(work, "kek", "status"), "QKMS_TEST_NEW_KEK")


@pytest.fixture
def token(tmp_path: Path) -> Iterator[tuple[SoftHsm, object]]:
    ok, why = softhsm_available()
    if not ok:
        if softhsm_required():
            pytest.fail(f"SoftHSM2 is required but unavailable: {why}")
        pytest.skip(f"SoftHSM2 not installed: {why}")
    hsm = SoftHsm(tmp_path).start()
    try:
        yield hsm, hsm.init_token("qkms-kek")
    finally:
        hsm.stop()


def test_rotation_with_a_pkcs11_token(token: tuple[SoftHsm, object], tmp_path: Path) -> None:
    hsm, tok = token
    env = {"QKMS_PKCS11_PIN": tok.pin, "SOFTHSM2_CONF": str(hsm.conf)}  # type: ignore[attr-defined]
    work = tmp_path / "kme"
    _init(work, "--pkcs11-module", str(tok.module), "--pkcs11-token", tok.label, env=env)  # type: ignore[attr-defined]
    done = _qkms(work, "kek", "rotate", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _keyring(work) == {"kek-1": ("drained", "pkcs11"), "kek-2": ("active", "pkcs11")}
    wrapped = sorted(p.name for p in work.iterdir() if "wrapped" in p.name)
    assert len(wrapped) == 2 and "kek.wrapped" in wrapped
    retired = _qkms(work, "kek", "retire", "kek-1", env=env)
    assert retired.returncode == 0, retired.stdout + retired.stderr
    assert not (work / "kek.wrapped").exists()
    checked = _qkms(work, "db", "check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_db_check_flags_a_row_naming_a_retired_version(work: Path) -> None:
    assert _qkms(work, "kek", "rotate").returncode == 0
    assert _qkms(work, "kek", "retire", "kek-1").returncode == 0
    assert _qkms(work, "db", "check").returncode == 0
    engine = create_engine(f"sqlite:///{work / 'qkms.db'}")
    with engine.begin() as conn:  # as a straggler that sealed under kek-1 after the rotation ended
        conn.execute(text("UPDATE kme_keys SET kek_id = 'kek-1' WHERE id = (SELECT MIN(id) FROM kme_keys)"))
    engine.dispose()
    check = _qkms(work, "db", "check")
    assert check.returncode == 1
    line = next(row for row in check.stdout.splitlines() if "has not retired" in row)
    assert "BROKEN" in line and "(kek-1)" in line, check.stdout


def test_a_row_that_does_not_open_stops_the_rotation_with_one_line(work: Path) -> None:
    engine = create_engine(f"sqlite:///{work / 'qkms.db'}")
    with engine.begin() as conn:  # a tampered sealed seed
        conn.execute(
            text(
                "UPDATE kme_keys SET sealed_seed = zeroblob(length(sealed_seed)) WHERE id = (SELECT MIN(id) FROM kme_keys)"
            )
        )
    engine.dispose()
    _one_line_error(_qkms(work, "kek", "rotate"), "does not open under KEK version kek-1", "db check")
    # The rotation stays unfinished (kek-2 active, kek-1 draining) and cannot retire kek-1.
    assert _keyring(work) == {"kek-1": ("draining", "file"), "kek-2": ("active", "file")}
    _one_line_error(_qkms(work, "kek", "retire", "kek-1"), "still seals")
