"""Scale-out: one KME served by two separate ``qkms serve`` processes on one database — PostgreSQL,
or the same SQLite file (writers take turns through a file lock).

The processes share nothing but the database (and the config): 32 concurrent masters spread over
both get keys, every key is then fetched by its slave through the *other* process, and a third look
finds it gone. The processes must agree: no key_ID or key material twice, no pool bits in two keys,
one filler (advisory lock or file lock) for the KME, and the same Get status from either process
when idle.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths
from kms.storage import pool_repository as pool
from tests.conftest import database_url

PAIRS = 8
MASTERS = tuple(f"SAE-M{i}" for i in range(PAIRS))
SLAVES = tuple(f"SAE-S{i}" for i in range(PAIRS))
CLIENTS = 32
ROUNDS = 5
PER_REQUEST = 4
TOTAL = CLIENTS * ROUNDS * PER_REQUEST
KEY_BITS = 256


@dataclass
class ScaledKme:
    workdir: Path
    settings: KmsSettings
    processes: list[KmeProcess]

    def client(self, process: int, sae_id: str) -> httpx.Client:
        cert, key = sae_credential_paths(self.workdir, sae_id)
        return self.processes[process].client(self.workdir / "pki" / "ca.pem", cert, key)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def scaled_kme(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ScaledKme]:
    url = database_url(request.param, request)
    # A pool of about twice the demand, in small storage blocks, so the masters compete for blocks.
    pool = {"max_pool_bits": 2 * TOTAL * KEY_BITS, "storage_block_bits": 8192, "key_size": KEY_BITS}
    result = init_workdir(
        tmp_path / "kme",
        "KME-SCALE",
        [*MASTERS, *SLAVES],
        port=free_port(),
        database_url=url,
        link_source="random",
        pool_overrides=pool,
    )
    settings = KmsSettings.load(result.config_path)
    # The same config twice: the second process only overrides the port (`qkms serve --port`).
    processes = [
        KmeProcess(result.config_path, settings.kme.port),
        KmeProcess(result.config_path, free_port()),
    ]
    try:
        for p in processes:
            p.start()
        kme = ScaledKme(tmp_path / "kme", settings, processes)
        with kme.client(1, MASTERS[0]) as c:
            processes[1].wait_for_keys(c, SLAVES[0], minimum=TOTAL, timeout=90)
        yield kme
    finally:
        for p in processes:
            p.stop()


@dataclass(frozen=True)
class Issued:
    client: int
    process: int  # the process that served the master
    master: str
    slave: str
    key_id: str
    material: bytes


def _lane(client: int) -> tuple[int, str, str]:
    """Client -> (process, master, slave): each master on both processes, 16 clients per process."""
    pair = client % PAIRS
    return (client // PAIRS) % 2, MASTERS[pair], SLAVES[pair]


def test_two_processes_one_database_32_concurrent_masters(scaled_kme: ScaledKme) -> None:
    kme = scaled_kme
    start = threading.Barrier(CLIENTS)

    def master_job(client: int) -> list[Issued]:
        process, master, slave = _lane(client)
        out = []
        with kme.client(process, master) as c:
            c.get(f"/api/v1/keys/{slave}/status").raise_for_status()  # connected before the race
            start.wait(timeout=60)
            for _ in range(ROUNDS):
                resp = c.post(f"/api/v1/keys/{slave}/enc_keys", json={"number": PER_REQUEST})
                assert resp.status_code == 200, resp.text
                keys = resp.json()["keys"]
                assert len(keys) == PER_REQUEST
                out += [
                    Issued(client, process, master, slave, k["key_ID"], base64.b64decode(k["key"]))
                    for k in keys
                ]
        return out

    with ThreadPoolExecutor(max_workers=CLIENTS) as ex:
        batches = list(ex.map(master_job, range(CLIENTS)))
    issued = [k for batch in batches for k in batch]

    assert len(issued) == TOTAL
    assert len({k.key_id for k in issued}) == TOTAL, "a key_ID was issued twice"
    assert len({k.material for k in issued}) == TOTAL, "two keys carry the same material"
    assert all(len(k.material) * 8 == KEY_BITS for k in issued)
    assert {k.process for k in issued} == {0, 1}

    # No two keys share pool bits, whichever process cut them.
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            records = pool.key_records(conn)  # one record per key, run members included
    finally:
        engine.dispose()
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in records.values():
        spans[r["block_id"]].append((r["bit_offset"], r["bit_offset"] + r["size_bits"]))
    for block in spans.values():
        block.sort()
        for (_, end), (begin, _) in itertools.pairwise(block):
            assert end <= begin, "two keys overlap in the pool"

    # Each slave fetches its keys through the other process than the one that served its master.
    def slave_job(batch: list[Issued]) -> None:
        first = batch[0]
        with kme.client(1 - first.process, first.slave) as c:
            body = {"key_IDs": [{"key_ID": k.key_id} for k in batch]}
            resp = c.post(f"/api/v1/keys/{first.master}/dec_keys", json=body)
            assert resp.status_code == 200, resp.text
            got = {k["key_ID"]: base64.b64decode(k["key"]) for k in resp.json()["keys"]}
            assert got == {k.key_id: k.material for k in batch}

    with ThreadPoolExecutor(max_workers=CLIENTS) as ex:
        list(ex.map(slave_job, batches))

    # ... and consumed once: a retry through either process inside the redelivery window (a lost
    # answer) gets the same key again, never another one.
    def refetch_job(batch: list[Issued]) -> None:
        first = batch[0]
        clients = [kme.client(p, first.slave) for p in (0, 1)]
        try:
            for i, k in enumerate(batch):
                c = clients[i % 2]
                resp = c.post(f"/api/v1/keys/{k.master}/dec_keys", json={"key_IDs": [{"key_ID": k.key_id}]})
                assert resp.status_code == 200, f"{k.key_id}: {resp.status_code}"
                assert base64.b64decode(resp.json()["keys"][0]["key"]) == k.material
        finally:
            for c in clients:
                c.close()

    with ThreadPoolExecutor(max_workers=CLIENTS) as ex:
        list(ex.map(refetch_job, batches))

    # One filler for the KME: the processes elected one leader through the advisory (file) lock.
    logs = [p.log_tail(lines=100_000) for p in kme.processes]
    assert sum("filler_leader" in log for log in logs) == 1, "expected exactly one filler leader"

    # Get status is the database's view, the same from either process once the filler is idle.
    for master, slave in zip(MASTERS[:2], SLAVES[:2], strict=True):
        _assert_same_status(kme, master, slave)


def _status(kme: ScaledKme, process: int, master: str, slave: str) -> dict[str, Any]:
    with kme.client(process, master) as c:
        resp = c.get(f"/api/v1/keys/{slave}/status")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _assert_same_status(kme: ScaledKme, master: str, slave: str, timeout: float = 60.0) -> None:
    """Reads A, B, A: when both reads of A agree the pool did not move in between, so B must agree."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[int, int, int]] = []
    while time.monotonic() < deadline:
        a1 = _status(kme, 0, master, slave)
        b = _status(kme, 1, master, slave)
        a2 = _status(kme, 0, master, slave)
        seen.append((a1["stored_key_count"], b["stored_key_count"], a2["stored_key_count"]))
        if a1 == a2:
            assert b == a1, f"the processes disagree on an idle pool: {a1} vs {b}"
            assert b["stored_key_count"] > 0
            return
        time.sleep(0.5)
    raise AssertionError(f"the pool never settled (stored_key_count reads: {seen[-5:]})")
