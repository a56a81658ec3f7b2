"""Fair shares (issue 16 part 4, DECISIONS.md D-30) over a real `qkms serve` and real mTLS: a greedy
SAE asking for 128 x 4096-bit keys in a tight loop, whose slave never fetches, is held to its quota
with ETSI 503 Errors while a polite pair keeps being served; refusals are audited without flooding.
(Latency under this load is a benchmark's, not a test's: benchmarks/bench_fair_share.py.)
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from kms.storage.schema import audit_records, keys
from tests.conftest import database_url
from tests.kme_harness import RunningKme, running_kme

QUOTAS = {
    "QKMS_QUOTAS__PAIR_BITS_PER_SECOND": "100000",
    "QKMS_QUOTAS__BURST_SECONDS": "10",
    "QKMS_QUOTAS__MAX_RESERVED_KEYS_PER_MASTER": "256",
    "QKMS_QUOTAS__RESERVED_REFRESH_MS": "100",
}
SAES = ("SAE-G", "SAE-H", "SAE-P", "SAE-Q", "SAE-R", "SAE-S")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    mp = pytest.MonkeyPatch()
    for name, value in QUOTAS.items():
        mp.setenv(name, value)  # the server process inherits them (pydantic-settings reads QKMS_*)
    try:
        workdir: Path = tmp_path_factory.mktemp(f"quota-{request.param}")
        with running_kme(workdir, database_url(request.param, request), saes=SAES, fill_keys=2048) as running:
            yield running
    finally:
        mp.undo()


def rows(kme: RunningKme, stmt: Any) -> list[Any]:
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt))
    finally:
        engine.dispose()


def test_greedy_sae_is_held_to_its_share_while_a_polite_pair_is_served(kme: RunningKme) -> None:
    greedy = kme.client("SAE-G")
    stop = threading.Event()
    answers: Counter[int] = Counter()
    messages: set[str] = set()

    def hog() -> None:
        while not stop.is_set():
            resp = greedy.post("/api/v1/keys/SAE-H/enc_keys", json={"number": 128, "size": 4096})
            answers[resp.status_code] += 1
            if resp.status_code == 503:
                messages.add(resp.json()["message"])

    thread = threading.Thread(target=hog)
    thread.start()
    polite = Counter()
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            got = kme.client("SAE-P").post("/api/v1/keys/SAE-Q/enc_keys", json={"number": 1})
            ok = got.status_code == 200
            if ok:
                key_id = got.json()["keys"][0]["key_ID"]
                fetched = kme.client("SAE-Q").post(
                    "/api/v1/keys/SAE-P/dec_keys", json={"key_IDs": [{"key_ID": key_id}]}
                )
                ok = fetched.status_code == 200
            polite[ok] += 1
    finally:
        stop.set()
        thread.join()

    assert polite[True] / (polite[True] + polite[False]) >= 0.99, polite
    # The greedy master got at most its cap of unfetched keys (2 x 128), then only 503 quota Errors.
    assert 1 <= answers[200] <= 2 and answers[503] >= 10 and set(answers) <= {200, 503}, answers
    assert all(m.endswith("retry later") or "retry once they are fetched" in m for m in messages), messages
    assert any(m.startswith("SAE SAE-G holds 256 keys its slaves have not fetched") for m in messages), (
        messages
    )
    held = rows(
        kme,
        select(func.sum(keys.c.key_count)).where(keys.c.master_sae_id == "SAE-G", keys.c.state == "reserved"),
    )
    assert held[0][0] <= 256
    # Audited once per rule (and window), each with the count of the refusals not recorded one by one.
    records = rows(
        kme,
        select(audit_records.c.data).where(
            audit_records.c.action == "quota.refused", audit_records.c.subject == "SAE-G"
        ),
    )
    assert 1 <= len(records) <= 2 < answers[503], (len(records), answers)
    assert {json.loads(r.data)["rule"] for r in records} <= {"reserved keys", "pair bits/s"}
    # The pool was not drained for everyone: the polite pair's Get status still counts plenty of keys.
    status = kme.client("SAE-P").get("/api/v1/keys/SAE-Q/status").json()
    assert status["stored_key_count"] > 1000


def test_fetched_keys_free_the_masters_cap(kme: RunningKme) -> None:
    master, slave = kme.client("SAE-R"), kme.client("SAE-S")
    first = [master.post("/api/v1/keys/SAE-S/enc_keys", json={"number": 128}) for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    refused = master.post("/api/v1/keys/SAE-S/enc_keys", json={"number": 1})
    assert refused.status_code == 503
    assert refused.json() == {
        "message": "SAE SAE-R holds 256 keys its slaves have not fetched; at most 256 may wait (quota): retry once they are fetched"
    }
    ids = [{"key_ID": k["key_ID"]} for k in first[0].json()["keys"]]
    assert slave.post("/api/v1/keys/SAE-R/dec_keys", json={"key_IDs": ids}).status_code == 200
    deadline = time.monotonic() + 10  # each process re-reads the counts every reserved_refresh_ms
    while (got := master.post("/api/v1/keys/SAE-S/enc_keys", json={"number": 1})).status_code == 503:
        assert time.monotonic() < deadline, got.json()
        time.sleep(0.05)
    assert got.status_code == 200
