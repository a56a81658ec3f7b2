"""Lifecycle over the real server: consumed keys zeroised, unfetched keys expire, material encrypted at rest."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from kms.runtime.assembly import build_runtime
from kms.service.audit_queries import AuditService
from kms.storage.schema import key_blocks, keys
from tests.conftest import database_url
from tests.kme_harness import running_kme

M, S = "SAE-M", "SAE-S"


def _rows(url: str, stmt: object) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt))  # type: ignore[call-overload]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_lifecycle_consume_and_expire(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = database_url(backend, request)
    # No redelivery window: the consumed key is zeroised at once (tests/api/test_redelivery.py
    # covers material kept for the window, then zeroised by the sweep).
    pool = {"reserved_ttl_seconds": 1.0, "expiry_sweep_seconds": 0.2, "redelivery_seconds": 0}
    with running_kme(tmp_path / "kme", url, saes=(M, S), pool=pool, fill_keys=64) as kme:
        db_url = kme.settings.database.url
        consumed, expiring = (
            kme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0] for _ in range(2)
        )
        assert (
            kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": consumed["key_ID"]}).status_code
            == 200
        )

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = _rows(db_url, select(keys.c.state).where(keys.c.key_id == expiring["key_ID"]))[0][0]  # type: ignore[index]
            if state == "expired":
                break
            time.sleep(0.2)
        assert state == "expired"
        resp = kme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": expiring["key_ID"]})
        assert resp.status_code == 400
        assert resp.json()["details"] == [{"key_ID": expiring["key_ID"], "reason": "key is expired"}]

        rows = {
            r.key_id: r  # type: ignore[attr-defined]
            for r in _rows(
                db_url, select(keys).where(keys.c.key_id.in_([consumed["key_ID"], expiring["key_ID"]]))
            )
        }
        assert rows[consumed["key_ID"]].state == "consumed"  # type: ignore[attr-defined]
        assert rows[consumed["key_ID"]].material is None  # type: ignore[attr-defined]
        assert rows[expiring["key_ID"]].material is None  # type: ignore[attr-defined]

        # Every transition, with time and actor, as the provenance view reports it.
        rt = build_runtime(kme.settings, sync_registry=False)
        try:
            audit = AuditService(rt.db, rt.identity, "KME-T")
            history = {
                k: [(t["from"], t["to"], t["actor"]) for t in audit.provenance(k)["transitions"]]  # type: ignore[index]
                for k in (consumed["key_ID"], expiring["key_ID"])
            }
        finally:
            rt.close()
        assert history[consumed["key_ID"]] == [
            ("active", "reserved", f"sae:{M}"),
            ("reserved", "consumed", f"sae:{S}"),
        ]
        assert history[expiring["key_ID"]] == [
            ("active", "reserved", f"sae:{M}"),
            ("reserved", "expired", "kme:KME-T/expiry"),
        ]


def test_material_is_never_stored_in_the_clear(tmp_path: Path) -> None:
    """The SQLite file never contains a delivered key's bytes, before or after delivery."""
    with running_kme(tmp_path / "kme", None, saes=(M, S), fill_keys=64) as kme:
        keys_out = (
            kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 8, "size": 512}).json()["keys"]
        )
        raw_keys = [base64.b64decode(k["key"]) for k in keys_out]
        db_file = Path(kme.settings.database.url.removeprefix("sqlite:///"))
        files = [db_file, db_file.with_name(db_file.name + "-wal")]
        blob = b"".join(f.read_bytes() for f in files if f.exists())
        assert len(blob) > 100_000
        assert not any(k[:16] in blob for k in raw_keys)
        kme.client(S).post(
            f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys_out]}
        )
        blob = b"".join(f.read_bytes() for f in files if f.exists())
        assert not any(k[:16] in blob for k in raw_keys)
        log = kme.process.log_tail(10_000).encode()
        assert not any(k[:8] in log or base64.b64encode(k)[:12] in log for k in raw_keys)


def test_block_remainder_is_resealed_after_each_cut(tmp_path: Path) -> None:
    with running_kme(tmp_path / "kme", None, saes=(M, S), fill_keys=64) as kme:
        url = kme.settings.database.url
        kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": 4, "size": 256})
        first = _rows(
            url,
            select(key_blocks.c.id, key_blocks.c.next_bit, key_blocks.c.material).where(
                key_blocks.c.next_bit > 0
            ),
        )
        assert first, "a block was cut"
        block_id, next_bit, sealed = first[0]  # type: ignore[misc]
        assert next_bit % 256 == 0
        total = _rows(url, select(key_blocks.c.bit_length).where(key_blocks.c.id == block_id))[0][0]  # type: ignore[index]
        # Only the unserved remainder is held: nonce (12) + remaining bytes + tag (16).
        assert len(sealed) == 12 + (total - next_bit) // 8 + 16


def test_empty_pool_answers_503_and_status_shows_zero(tmp_path: Path) -> None:
    with running_kme(tmp_path / "kme", None, saes=(M, S), with_links=False) as kme:
        status = kme.client(M).get(f"/api/v1/keys/{S}/status").json()
        assert status["stored_key_count"] == 0
        resp = kme.client(M).get(f"/api/v1/keys/{S}/enc_keys")
        assert resp.status_code == 503
        assert "pool" in resp.json()["message"]
