"""AES-256-GCM envelope: round trip, AAD binding, tamper detection, KEK loading rules."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from kms.crypto.envelope import (
    Envelope,
    KekError,
    MaterialIntegrityError,
    generate_kek_file,
    load_kek_env,
    load_kek_file,
)


def test_round_trip_and_fresh_nonces() -> None:
    env = Envelope(os.urandom(32), "k1")
    a, b = env.seal(b"secret bits", b"aad"), env.seal(b"secret bits", b"aad")
    assert a != b and b"secret bits" not in a
    assert env.open(a, b"aad") == env.open(b, b"aad") == b"secret bits"


def test_seal_many_gives_each_record_its_own_nonce_and_aad() -> None:
    env = Envelope(os.urandom(32), "k1")
    plaintexts = [bytes([i]) * 32 for i in range(64)]
    aads = [f"qkms/key/{i}/reserved".encode() for i in range(64)]
    sealed = env.seal_many(plaintexts, aads)
    assert len({s[:12] for s in sealed}) == 64  # distinct nonces
    assert [env.open(s, a) for s, a in zip(sealed, aads, strict=True)] == plaintexts
    with pytest.raises(MaterialIntegrityError):
        env.open(sealed[0], aads[1])
    assert env.seal_many([], []) == []
    with pytest.raises(ValueError):
        env.seal_many(plaintexts, aads[:-1])


def test_wrong_aad_wrong_kek_or_tamper_fail() -> None:
    env = Envelope(os.urandom(32), "k1")
    sealed = env.seal(b"x" * 32, b"qkms/key/1/reserved")
    with pytest.raises(MaterialIntegrityError):
        env.open(sealed, b"qkms/key/2/reserved")
    with pytest.raises(MaterialIntegrityError):
        Envelope(os.urandom(32), "k2").open(sealed, b"qkms/key/1/reserved")
    flipped = sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
    with pytest.raises(MaterialIntegrityError) as err:
        env.open(flipped, b"qkms/key/1/reserved")
    assert "x" * 8 not in str(err.value)


def test_kek_file_created_0600_and_permissive_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek.bin"
    generate_kek_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(load_kek_file(path)) == 32
    path.chmod(0o644)
    with pytest.raises(KekError, match="group or others"):
        load_kek_file(path)
    with pytest.raises(FileExistsError):
        generate_kek_file(path)


def test_kek_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("QKMS_TEST_KEK", base64.b64encode(key).decode())
    assert load_kek_env("QKMS_TEST_KEK") == key
    monkeypatch.setenv("QKMS_TEST_KEK", "not base64!")
    with pytest.raises(KekError):
        load_kek_env("QKMS_TEST_KEK")
    monkeypatch.setenv("QKMS_TEST_KEK", base64.b64encode(b"short").decode())
    with pytest.raises(KekError, match="32 bytes"):
        load_kek_env("QKMS_TEST_KEK")
    with pytest.raises(KekError, match="not set"):
        load_kek_env("QKMS_TEST_KEK_MISSING")
