"""Hybrid and PQC-fallback policies over the real server, checked against an independent derivation."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, select

from kms.crypto.envelope import Envelope, load_kek_file
from kms.crypto.hybrid import LABEL_FALLBACK, LABEL_HYBRID, SALT
from kms.crypto.pqc.base import KemAlgorithm
from kms.crypto.pqc.registry import get_kem_provider
from kms.storage import pool_repository as pool
from kms.storage.schema import kem_exchanges, keys, kme_keys
from tests.conftest import database_url
from tests.kme_harness import running_kme

M, S, T = "SAE-M", "SAE-S", "SAE-T"


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(SALT, ikm, hashlib.sha384).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha384).digest()
        out, i = out + block, i + 1
    return out[:length]


def _recompute(workdir: Path, url: str, key_id: str) -> bytes:
    """Derive a delivered key from the database and the KEK alone, without the service's code path."""
    env = Envelope(load_kek_file(workdir / "kek.bin"), "kek-1")
    engine = create_engine(url)
    with engine.connect() as conn:
        key = SimpleNamespace(**pool.key_records(conn, [key_id])[key_id])  # a run member too
        ex = conn.execute(select(kem_exchanges).where(kem_exchanges.c.id == key.kem_exchange_id)).one()
        kk = conn.execute(
            select(kme_keys).where(kme_keys.c.purpose == "kem", kme_keys.c.version == ex.kem_key_version)
        ).one()
    engine.dispose()
    seed = env.open(kk.sealed_seed, f"qkms/kme-key/kem/{kk.version}".encode())
    secret = get_kem_provider().decapsulate(KemAlgorithm(kk.algorithm), seed, ex.ciphertext)
    length = key.size_bits // 8
    ctx = b"".join(
        _lp(f)
        for f in (
            key.suite.encode(),
            key_id.encode(),
            b"KME-T",
            key.target_kme_id.encode(),
            key.master_sae_id.encode(),
            key.slave_sae_id.encode(),
            hashlib.sha384(kk.public_key).digest(),
            hashlib.sha384(ex.ciphertext).digest(),
            (length * 8).to_bytes(4, "big"),
        )
    )
    if key.policy == "pqc_fallback":
        return _hkdf(secret, _lp(LABEL_FALLBACK) + ctx, length)
    qkd = env.open(key.material, f"qkms/key/{key_id}/reserved".encode())
    assert qkd != b"" and len(qkd) == length
    return _hkdf(secret + qkd, _lp(LABEL_HYBRID) + ctx, length)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_hybrid_keys_match_an_independent_derivation(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = database_url(backend, request)
    policy = {"mode": "hybrid", "pqc_fallback": False, "kem": "ML-KEM-768"}
    with running_kme(tmp_path / "kme", url, saes=(M, S, T), policy=policy, fill_keys=64) as kme:
        status = kme.client(M).get(f"/api/v1/keys/{S}/status").json()
        assert status["status_extension"]["qkms_policy"] == "hybrid"
        got = (
            kme.client(M)
            .post(
                f"/api/v1/keys/{S}/enc_keys", json={"number": 3, "size": 512, "additional_slave_SAE_IDs": [T]}
            )
            .json()["keys"]
        )
        expected = {k["key_ID"]: base64.b64decode(k["key"]) for k in got}
        db_url = kme.settings.database.url
        for key_id, material in expected.items():
            assert _recompute(kme.workdir, db_url, key_id) == material
        ids = {"key_IDs": [{"key_ID": k} for k in expected]}
        for slave in (S, T):
            fetched = kme.client(slave).post(f"/api/v1/keys/{M}/dec_keys", json=ids).json()["keys"]
            assert {k["key_ID"]: base64.b64decode(k["key"]) for k in fetched} == expected


def test_pqc_fallback_when_no_qkd_key_and_503_without_it(tmp_path: Path) -> None:
    policy = {
        "mode": "qkd",
        "pqc_fallback": False,
        "kem": "ML-KEM-768",
        "rules": [{"master": M, "slave": S, "mode": "hybrid", "pqc_fallback": True}],
    }
    with running_kme(tmp_path / "kme", None, saes=(M, S, T), policy=policy, with_links=False) as kme:
        # M -> S may fall back to ML-KEM; M -> T (default policy) may not.
        assert kme.client(M).get(f"/api/v1/keys/{T}/enc_keys").status_code == 503
        status = kme.client(M).get(f"/api/v1/keys/{S}/status").json()
        assert status["stored_key_count"] == 0 and status["status_extension"]["qkms_pqc_fallback"] is True
        got = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 2, "size": 256}).json()["keys"]
        fetched = (
            kme.client(S)
            .post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in got]})
            .json()["keys"]
        )
        assert {k["key_ID"]: k["key"] for k in fetched} == {k["key_ID"]: k["key"] for k in got}
        for k in got:
            assert _recompute(kme.workdir, kme.settings.database.url, k["key_ID"]) == base64.b64decode(
                k["key"]
            )
        engine = create_engine(kme.settings.database.url)
        with engine.connect() as conn:
            rows = conn.execute(select(keys.c.policy, keys.c.block_id, keys.c.suite)).all()
        engine.dispose()
        assert {(r.policy, r.block_id, r.suite) for r in rows} == {
            ("pqc_fallback", None, "ML-KEM-768/HKDF-SHA-384")
        }
