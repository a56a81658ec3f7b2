"""``qkms serve --workers 2`` under load, on SQLite and PostgreSQL: SIGKILL a worker (the supervisor
starts another) and the whole server (then start it again), at seeded random points, several times.
Afterwards nothing was served twice, every key a master received reached its slave with the same
bytes or is an accounted-for loss, and ``qkms db check`` / ``qkms audit verify`` pass."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos.ledger import Ledger, Pair
from tests.chaos.load import Endpoint, LoadThread, Route, run_until_served, settle, stop_load
from tests.chaos.procs import (
    assert_audit_verify,
    assert_db_check,
    chaos_seed,
    kill_server,
    kill_worker,
    redelivery_seconds,
    restart_server,
)
from tests.conftest import database_url
from tests.kme_harness import RunningKme, running_kme

WORKERS = 2
PAIRS = (Pair("SAE-M", "SAE-S"), Pair("SAE-T", "SAE-U"), Pair("SAE-V", "SAE-W"))
KILLS = ("worker", "worker", "worker", "server", "server")


def _routes(kme: RunningKme) -> dict[Pair, Route]:
    def at(sae: str) -> Endpoint:
        return Endpoint.of(kme.process.base_url, kme.workdir, sae)

    return {p: Route(p, at(p.master), at(p.slave)) for p in PAIRS}


@pytest.mark.chaos
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_workers_and_server_killed_under_load(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    ledger = Ledger(seed)
    kills: Counter[str] = Counter()
    with running_kme(tmp_path / "kme", database_url(backend, request), workers=WORKERS, fill_keys=256) as kme:
        config = kme.process.config_path
        routes = _routes(kme)
        stop = threading.Event()
        threads = [LoadThread(r, ledger, random.Random(rng.random()), stop) for r in routes.values()]
        for t in threads:
            t.start()
        try:
            for event in rng.sample(KILLS, len(KILLS)):
                time.sleep(rng.uniform(0.3, 1.5))  # load runs meanwhile: the kill lands mid-request
                if event == "worker":
                    kill_worker(kme.process, rng, WORKERS)
                else:
                    kill_server(kme.process)
                    assert_db_check(config, f"right after a server kill (seed {seed})")
                    time.sleep(rng.uniform(0.1, 0.8))
                    restart_server(kme.process, WORKERS)
                kills[event] += 1
            run_until_served(threads, ledger, more=30, timeout=30)
        finally:
            stop_load(threads, stop)
        settle(routes, ledger)
        kme.process.stop()
        print(f"chaos {backend}: {ledger.summary(kills)}")
        assert kills == Counter(KILLS)
        assert ledger.counts["enc 200"] >= 30 and ledger.counts["dec 200"] > 0, ledger.summary(kills)
        failures = ledger.failures(redelivery_seconds(config))
        assert not failures, "\n".join(failures[:20])
        assert "worker_exited" in kme.process.log_tail(1_000_000)
        assert_db_check(config, f"after the run (seed {seed})")
        assert_audit_verify(config, f"after the run (seed {seed})")
