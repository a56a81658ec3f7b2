"""PostgreSQL stopped under load (``pg_ctl stop -m fast``, then ``-m immediate``: a crash) and started
again on the same port, with ``qkms serve --workers 2`` in front of it: while the database is down
the KME answers every call with a 503 Error body, and afterwards it serves again by itself — no
restart — with every promise kept."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.ledger import Ledger, Pair, etsi_error_problem
from tests.chaos.load import Endpoint, LoadThread, Route, run_until_served, settle, stop_load
from tests.chaos.procs import assert_audit_verify, assert_db_check, chaos_seed, redelivery_seconds, wait_for
from tests.kme_harness import RunningKme, running_kme
from tests.support.postgres import PostgresServer, postgres_available

WORKERS = 2
PAIRS = (Pair("SAE-M", "SAE-S"), Pair("SAE-T", "SAE-U"))
OUTAGES = ("fast", "immediate")


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of this test's own: stopping the session's shared one would hit other tests' KMEs."""
    ok, why = postgres_available()
    if not ok:
        pytest.skip(why)
    # synchronous_commit on, as in production: with it off (the shared test server's speed setting)
    # a crash loses commits already acknowledged, and the KME would cut those keys' bits again.
    with PostgresServer(extra_settings={"synchronous_commit": "on"}) as server:
        yield server


def _probe_while_down(kme: RunningKme, ledger: Ledger) -> int:
    """Every kind of call while the database is down: each must be a 503 ETSI Error."""
    calls = [
        ("GET", "/api/v1/keys/SAE-S/status", None),
        ("POST", "/api/v1/keys/SAE-S/enc_keys", {"number": 1}),
        ("POST", "/api/v1/keys/SAE-S/dec_keys", {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}),
    ]
    answered = 0
    with Endpoint.of(kme.process.base_url, kme.workdir, "SAE-M").client() as client:
        for method, path, body in calls * 2:
            try:
                resp = client.request(method, path, json=body)
            except httpx.TransportError as exc:
                ledger.problem(f"{method} {path} with the database down: {type(exc).__name__}, not a 503")
                continue
            bad = etsi_error_problem(resp)
            if resp.status_code != 503 or bad:
                ledger.problem(f"{method} {path} with the database down: {resp.status_code} {bad or ''}")
            answered += 1
    return answered


def _serves_again(kme: RunningKme) -> bool:
    with Endpoint.of(kme.process.base_url, kme.workdir, "SAE-M").client() as client:
        try:
            return client.get("/api/v1/keys/SAE-S/status").status_code == 200
        except httpx.TransportError:
            return False


@pytest.mark.chaos
@pytest.mark.postgres
def test_postgres_restarted_under_load(own_pg: PostgresServer, tmp_path: Path) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    ledger = Ledger(seed, ambiguous_503=True)
    outages: Counter[str] = Counter()
    url = own_pg.create_database("qkms_outage")
    with running_kme(
        tmp_path / "kme", url, saes=("SAE-M", "SAE-S", "SAE-T", "SAE-U"), workers=WORKERS, fill_keys=256
    ) as kme:
        config = kme.process.config_path
        at = kme.process.base_url
        routes = {
            p: Route(p, Endpoint.of(at, kme.workdir, p.master), Endpoint.of(at, kme.workdir, p.slave))
            for p in PAIRS
        }
        stop = threading.Event()
        threads = [LoadThread(r, ledger, random.Random(rng.random()), stop) for r in routes.values()]
        probes = 0
        for t in threads:
            t.start()
        try:
            for mode in OUTAGES:
                time.sleep(rng.uniform(0.5, 1.5))
                own_pg.halt(mode)
                outages[f"postgres {mode}"] += 1
                probes += _probe_while_down(kme, ledger)
                time.sleep(rng.uniform(0.2, 1.0))
                own_pg.resume()
                wait_for(lambda: _serves_again(kme), "the KME serving again after PostgreSQL came back")
                run_until_served(threads, ledger, more=20, timeout=30)
        finally:
            stop_load(threads, stop)
        settle(routes, ledger)
        kme.process.stop()
        print(f"chaos postgres outage: probes={probes} {ledger.summary(outages)}")
        assert probes == 6 * len(OUTAGES)
        assert ledger.counts["enc 200"] >= 40 and ledger.counts["dec 200"] > 0, ledger.summary(outages)
        failures = ledger.failures(redelivery_seconds(config))
        assert not failures, "\n".join(failures[:20])
        assert_db_check(config, f"after the outages (seed {seed})")
        assert_audit_verify(config, f"after the outages (seed {seed})")
