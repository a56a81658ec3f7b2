"""Two sites; KME-A's masters get keys for KME-B's slaves (a signed ledger entry per request) while
KME-B is SIGKILLed and started again, several times. Every key a master received is fetchable at B
with the same bytes (or an accounted-for loss of an in-flight fetch); every key A cut but did not
deliver is withdrawn at both ends; ``qkms db check`` and ``qkms audit verify`` pass at both KMEs."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from kms.config import KmsSettings
from kms.lab.pilot import Site, running_network
from kms.storage import pool_repository
from tests.chaos.ledger import Ledger, Pair
from tests.chaos.load import Endpoint, LoadThread, Route, run_until_served, settle, stop_load
from tests.chaos.procs import (
    assert_audit_verify,
    assert_db_check,
    chaos_seed,
    kill_server,
    redelivery_seconds,
    restart_server,
    wait_for,
)
from tests.peer.conftest import open_network, wait_for_remote_keys

PAIRS = (Pair("SAE-A1", "SAE-B1"), Pair("SAE-A2", "SAE-B2"))
KILLS = 3
GONE = frozenset({"destroyed", "expired"})  # withdrawn or zeroised: never servable again


def _keys_of(site: Site, masters: set[str]) -> dict[str, dict[str, Any]]:
    """One record per key (run members included) whose master is one of ``masters``."""
    engine = create_engine(KmsSettings.load(site.config_path).database.url)
    try:
        with engine.connect() as conn:
            return {
                k: r for k, r in pool_repository.key_records(conn).items() if r["master_sae_id"] in masters
            }
    finally:
        engine.dispose()


def _withdrawal_problems(a: Site, b: Site, issued: set[str]) -> list[str]:
    """Keys A cut for the masters but never delivered must be gone at both ends; the delivered ones
    are consumed at A (their bits used) and known to B."""
    masters = {p.master for p in PAIRS}
    at_a, at_b = _keys_of(a, masters), _keys_of(b, masters)
    out = [
        f"A holds key {k} in state {r['state']}"
        for k, r in at_a.items()
        if r["state"] not in GONE | {"consumed"}
    ]
    out += [
        f"A delivered key {k} that no master received"
        for k, r in at_a.items()
        if r["state"] == "consumed" and k not in issued
    ]
    out += [
        f"key {k} a master received is {at_a[k]['state'] if k in at_a else 'unknown'} at A"
        for k in issued
        if at_a.get(k, {}).get("state") != "consumed"
    ]
    out += [f"key {k} a master received is unknown at B" for k in issued if k not in at_b]
    out += [
        f"B holds undelivered key {k} in state {r['state']}"
        for k, r in at_b.items()
        if k not in issued and r["state"] not in GONE
    ]
    return out


@pytest.mark.chaos
def test_peer_kme_killed_mid_ledger(tmp_path: Path) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    ledger = Ledger(seed)
    kills: Counter[str] = Counter()
    net = open_network(tmp_path / "net", {})
    a, b = net.sites["KME-A"], net.sites["KME-B"]
    routes = {
        p: Route(p, Endpoint.of(a.url, a.workdir, p.master), Endpoint.of(b.url, b.workdir, p.slave))
        for p in PAIRS
    }
    with running_network(net.sites):
        try:
            for p in PAIRS:
                wait_for_remote_keys(net, "KME-A", p.master, p.slave)
        finally:
            net.close()
        assert b.process is not None
        stop = threading.Event()
        threads = [LoadThread(r, ledger, random.Random(rng.random()), stop) for r in routes.values()]
        for t in threads:
            t.start()
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.5, 1.5))  # ledger entries in flight: the kill lands mid-request
                kill_server(b.process)
                kills["peer KME-B"] += 1
                assert_db_check(b.config_path, f"at KME-B right after it was killed (seed {seed})")
                time.sleep(rng.uniform(0.1, 0.8))
                restart_server(b.process, 1)
                run_until_served(threads, ledger, more=10, timeout=40)
        finally:
            stop_load(threads, stop)
        settle(routes, ledger)
        print(f"chaos peer kill: {ledger.summary(kills)}")
        assert ledger.counts["enc 200"] >= 10 * KILLS and ledger.counts["dec 200"] > 0, ledger.summary(kills)
        failures = ledger.failures(redelivery_seconds(b.config_path))
        assert not failures, "\n".join(failures[:20])
        # A withdraws what it cut for a failed request (keys.cancel, retried for about 30 s).
        problems: list[str] = []

        def withdrawn() -> bool:
            problems[:] = _withdrawal_problems(a, b, set(ledger.issued))
            return not problems

        try:
            wait_for(withdrawn, "keys A did not deliver withdrawn at both ends", timeout=45)
        except AssertionError:
            raise AssertionError(f"seed {seed}: " + "\n".join(problems[:20])) from None
        masters = {p.master for p in PAIRS}
        discarded = {k for k, r in _keys_of(a, masters).items() if r["state"] in GONE}
        print(
            f"chaos peer kill: {len(discarded)} keys cut at A but not delivered, {len(discarded & set(_keys_of(b, masters)))} of them recorded at B and withdrawn there"
        )
        for site in (a, b):
            assert site.process is not None
            site.process.stop()
    for site in (a, b):
        assert_db_check(site.config_path, f"at {site.kme_id} after the run (seed {seed})")
        assert_audit_verify(site.config_path, f"at {site.kme_id} after the run (seed {seed})")
