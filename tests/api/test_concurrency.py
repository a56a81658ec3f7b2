"""32 concurrent masters against one pool: unique key_IDs, disjoint pool bits, each key served once."""

from __future__ import annotations

import itertools
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine

from kms.runtime.assembly import build_runtime
from kms.service.audit_queries import AuditService
from kms.storage import pool_repository
from tests.conftest import database_url
from tests.kme_harness import running_kme

MASTERS = tuple(f"SAE-M{i:02d}" for i in range(32))
SLAVE = "SAE-SLAVE"
ROUNDS = 6
PER_REQUEST = 4


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_32_concurrent_masters(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = database_url(backend, request)
    saes = (*MASTERS, SLAVE)
    # A small pool (about 2x the demand) so masters really compete for the same blocks.
    pool = {"max_pool_bits": 2 * 32 * ROUNDS * PER_REQUEST * 256, "storage_block_bits": 8192}
    with running_kme(tmp_path / "kme", url, saes=saes, pool=pool, fill_keys=32 * ROUNDS * PER_REQUEST) as kme:
        clients = {m: kme.client(m) for m in MASTERS}
        slave_client = kme.client(SLAVE)

        def master_job(master: str) -> list[tuple[str, str, str]]:
            out = []
            for _ in range(ROUNDS):
                resp = clients[master].post(f"/api/v1/keys/{SLAVE}/enc_keys", json={"number": PER_REQUEST})
                assert resp.status_code == 200, resp.text
                out += [(master, k["key_ID"], k["key"]) for k in resp.json()["keys"]]
            return out

        with ThreadPoolExecutor(max_workers=32) as pool_exec:
            results = [k for batch in pool_exec.map(master_job, MASTERS) for k in batch]

        ids = [key_id for _, key_id, _ in results]
        assert len(ids) == 32 * ROUNDS * PER_REQUEST
        assert len(set(ids)) == len(ids), "a key_ID was issued twice"
        assert len({material for *_, material in results}) == len(ids), "two keys carry the same material"

        # No two keys share pool bits: their (block, offset, size) intervals are disjoint.
        engine = create_engine(kme.settings.database.url)
        with engine.connect() as conn:
            records = pool_repository.key_records(conn)  # one record per key, run members included
        engine.dispose()
        assert set(ids) <= records.keys()
        by_block: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for r in records.values():
            by_block[r["block_id"]].append((r["bit_offset"], r["bit_offset"] + r["size_bits"]))
        for spans in by_block.values():
            spans.sort()
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert end <= start, "two keys overlap in the pool"

        # Every key is retrievable exactly once by its slave, identical to what the master got.
        by_master: dict[str, dict[str, str]] = defaultdict(dict)
        for master, key_id, material in results:
            by_master[master][key_id] = material
        for master, expected in by_master.items():
            body = {"key_IDs": [{"key_ID": k} for k in expected]}
            resp = slave_client.post(f"/api/v1/keys/{master}/dec_keys", json=body)
            assert resp.status_code == 200
            assert {k["key_ID"]: k["key"] for k in resp.json()["keys"]} == expected
            # A retry inside the redelivery window (a lost answer) gets the same keys, consumed once.
            again = slave_client.post(f"/api/v1/keys/{master}/dec_keys", json=body)
            assert again.status_code == 200
            assert {k["key_ID"]: k["key"] for k in again.json()["keys"]} == expected

        # The audit trail stayed one unbroken chain under concurrent appends.
        rt = build_runtime(kme.settings, sync_registry=False)
        try:
            audit = AuditService(rt.db, rt.identity, "KME-T")
            report = audit.verify()
            records = audit.events(limit=100_000)["records"]
        finally:
            rt.close()
        assert report.ok, report.problems
        reserved = [k for r in records if r["action"] == "keys.reserved" for k in r["data"]["key_IDs"]]
        assert sorted(reserved) == sorted(ids)
        consumed = [k for r in records if r["action"] == "keys.delivered" for k in r["data"]["consumed"]]
        assert sorted(consumed) == sorted(ids), "a key was consumed twice or not at all"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_slaves_cannot_double_fetch(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Many simultaneous dec_keys calls for one key: exactly one consumes it, the rest are
    audited redeliveries of the same bytes (the redelivery window, docs/SECURITY.md)."""
    url = database_url(backend, request)
    with running_kme(tmp_path / "kme", url, saes=("SAE-A", "SAE-B"), fill_keys=64) as kme:
        key_ids = [
            k["key_ID"]
            for k in kme.client("SAE-A")
            .post("/api/v1/keys/SAE-B/enc_keys", json={"number": 8})
            .json()["keys"]
        ]
        cert_paths = kme.client("SAE-B")  # warm the slave's credentials
        assert isinstance(cert_paths, httpx.Client)

        def fetch(key_id: str) -> tuple[int, str]:
            from kms.provision.workdir import sae_credential_paths

            cert, key = sae_credential_paths(kme.workdir, "SAE-B")
            with kme.process.client(kme.ca, cert, key) as c:
                resp = c.get("/api/v1/keys/SAE-A/dec_keys", params={"key_ID": key_id})
                return resp.status_code, resp.json()["keys"][0]["key"] if resp.status_code == 200 else ""

        with ThreadPoolExecutor(max_workers=16) as ex:
            for key_id in key_ids:
                answers = list(ex.map(fetch, [key_id] * 6))
                # One consumes it; the others are retries inside the redelivery window: same bytes.
                assert {code for code, _ in answers} == {200}
                assert len({material for _, material in answers}) == 1
        rt = build_runtime(kme.settings, sync_registry=False)
        try:
            records = AuditService(rt.db, rt.identity, "KME-T").events(limit=100_000)["records"]
        finally:
            rt.close()
        consumed = [k for r in records if r["action"] == "keys.delivered" for k in r["data"]["consumed"]]
        redelivered = [k for r in records if r["action"] == "keys.redelivered" for k in r["data"]["key_IDs"]]
        assert sorted(consumed) == sorted(key_ids), "a key was consumed twice or not at all"
        assert sorted(redelivered) == sorted(key_ids * 5)
