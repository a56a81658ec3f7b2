"""Trusted-node networks (issue 18): cold start of a long chain, latency per hop, idle cost, and a ring
that loses a node under load. Real ``qkms serve`` processes on 127.0.0.1, SQLite, ``random`` links
paced at their fibre length's decoy-BB84 key rate (``kms.lab.network_topology``).

Scenarios (``--only`` picks some):
- ``cold``: a chain of ``--cold-nodes`` (32) started at once: seconds from the last KME listening to
  the first key relayed end to end (keys identical at both ends), with no client traffic before;
  then ``db check`` and ``audit verify`` on every KME (``--checks``).
- ``latency``: a chain of 12 (11 hops), one master-slave pair in a loop: enc_keys p50/p99 in ms.
- ``idle``: the same chain left alone once its pools are full: CPU cores per KME (from /proc); and
  the seconds a link suspended at one end of the middle link takes to reach the first KME.
- ``ring``: a ring of 5, 4 pairs relaying KME-0 -> KME-2 in loops; KME-1 is killed (SIGKILL):
  seconds until requests succeed again, failed requests, and keys left ``reserved``/``pre_active``
  at the surviving KMEs 30 s after the load stopped.

Floors (issue 18): cold <= 30 s; latency p50 <= 100 ms; idle <= 0.02 cores per KME; ring recovery
<= 5 s with no leftovers after 30 s. ``--hop-macs both`` runs the 12-KME chain once with every
message signed and once with MAC'd hop messages (DECISIONS.md D-35), one after the other.

    .venv/bin/python benchmarks/bench_relay.py
    .venv/bin/python benchmarks/bench_relay.py --only latency --hop-macs both
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
import httpx
import tomli_w

from kms.config import KmsSettings
from kms.lab.launcher import client_ssl_context
from kms.lab.network_topology import NetworkTopology, uniform
from kms.lab.pilot import Site, prepare_network, running_network

POOL = {"max_pool_bits": 8 * 1024 * 1024, "reserved_ttl_seconds": 300.0}
FLOORS = {"cold_s": 30.0, "latency_p50_ms": 100.0, "idle_cores": 0.02, "ring_recovery_s": 5.0}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def client(site: Site, sae: str) -> httpx.Client:
    cert, key = site.sae_credentials(sae)
    return httpx.Client(base_url=site.url, verify=client_ssl_context(site.ca, cert, key), timeout=30.0)


def relay_once(master: httpx.Client, slave: httpx.Client, m_sae: str, s_sae: str) -> tuple[bool, float]:
    """enc_keys at the master's KME, dec_keys at the slave's; (keys identical, enc_keys seconds)."""
    started = time.perf_counter()
    got = master.post(f"/api/v1/keys/{s_sae}/enc_keys", json={"number": 1})
    took = time.perf_counter() - started
    if got.status_code != 200:
        return False, took
    keys = got.json()["keys"]
    fetched = slave.post(
        f"/api/v1/keys/{m_sae}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    )
    return fetched.status_code == 200 and fetched.json()["keys"] == keys, took


HOP_MACS = True  # --hop-macs off: every KME signs every peer message (DECISIONS.md D-35 off)


def network(root: Path, topo: NetworkTopology) -> dict[str, Site]:
    sites, links = topo.specs()
    prepared = prepare_network(root, sites, links, pool=POOL)
    if not HOP_MACS:
        for site in prepared.values():
            config = tomllib.loads(site.config_path.read_text())
            config.setdefault("peering", {})["hop_macs"] = False
            site.config_path.write_text(tomli_w.dumps(config))
    return prepared


def cold(root: Path, nodes: int, checks: bool) -> dict[str, Any]:
    topo = uniform("chain", nodes)
    sites = network(root, topo)
    first, last = topo.nodes[0].id, topo.nodes[-1].id
    with running_network(sites, start_timeout=max(60.0, 4.0 * nodes)):
        listening = time.monotonic()
        with client(sites[first], topo.sae(first)) as m, client(sites[last], topo.sae(last)) as s:
            while True:
                ok, _ = relay_once(m, s, topo.sae(first), topo.sae(last))
                if ok:
                    break
                if time.monotonic() - listening > 300:
                    raise RuntimeError("no end-to-end relay within 300 s")
                time.sleep(0.2)
        seconds = time.monotonic() - listening
    failures = run_checks(sites) if checks else None
    return {"nodes": nodes, "seconds_to_first_relay": round(seconds, 1), "check_failures": failures}


def run_checks(sites: dict[str, Site]) -> list[str]:
    """``qkms db check`` and ``qkms audit verify`` on every (stopped) KME; the ones that failed."""
    failed = []
    for site in sites.values():
        for args in (["db", "check"], ["audit", "verify"]):
            proc = subprocess.run(
                [sys.executable, "-m", "kms", *args, "--config", str(site.config_path)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                failed.append(f"{site.kme_id} {' '.join(args)}: {proc.stdout[-300:]}{proc.stderr[-300:]}")
    return failed


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of every process in a KME's process group (its server and any workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def latency_and_idle(root: Path, requests: int, idle_seconds: float) -> dict[str, Any]:
    topo = uniform("chain", 12)
    sites = network(root, topo)
    first, last = topo.nodes[0].id, topo.nodes[-1].id
    with running_network(sites, start_timeout=60.0):
        with client(sites[first], topo.sae(first)) as m, client(sites[last], topo.sae(last)) as s:
            deadline = time.monotonic() + 120
            while not relay_once(m, s, topo.sae(first), topo.sae(last))[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the 12-KME chain never relayed")
                time.sleep(0.2)
            times, failures = [], 0
            for _ in range(requests):
                ok, took = relay_once(m, s, topo.sae(first), topo.sae(last))
                times.append(took * 1000)
                failures += not ok
        convergence = link_change_convergence(sites, topo)
        time.sleep(15)  # pools refill to their limit; the network goes quiet
        pgids = {k: site.process.proc.pid for k, site in sites.items() if site.process and site.process.proc}
        before = {k: group_cpu_seconds(p) for k, p in pgids.items()}
        time.sleep(idle_seconds)
        cores = {k: (group_cpu_seconds(p) - before[k]) / idle_seconds for k, p in pgids.items()}
        most = most_stored_bits(sites)
    times.sort()
    return {
        "hops": len(topo.links),
        "requests": requests,
        "failures": failures,
        "p50_ms": round(statistics.median(times), 1),
        "p99_ms": round(times[int(0.99 * (len(times) - 1))], 1),
        "link_change_convergence_s": convergence,
        "idle_cores_mean": round(statistics.mean(cores.values()), 4),
        "idle_cores_max": round(max(cores.values()), 4),
        "most_stored_bits": most,
    }


def link_change_convergence(sites: dict[str, Site], topo: NetworkTopology) -> float:
    """Seconds from ``qkms link suspend`` of the chain's middle link (at one end) until the first
    KME holds that KME's record saying so; the link is resumed after."""
    mid = topo.links[len(topo.links) // 2]
    origin, first = sites[mid.a], sites[topo.nodes[0].id]
    from sqlalchemy import create_engine, text

    engine = create_engine(KmsSettings.load(first.config_path).database.url)
    qkms = [sys.executable, "-m", "kms", "link"]
    try:
        subprocess.run(
            [*qkms, "suspend", mid.id, "--config", str(origin.config_path)], check=True, capture_output=True
        )
        started = time.monotonic()
        while time.monotonic() - started < 60:
            with engine.connect() as conn:
                record = conn.execute(
                    text("SELECT record FROM link_state_records WHERE origin_kme_id = :o"), {"o": mid.a}
                ).scalar_one_or_none()
            if record and any(lk[1] == mid.id and lk[2] == "suspended" for lk in json.loads(record)["links"]):
                break
            time.sleep(0.05)
        seconds = round(time.monotonic() - started, 2)
    finally:
        engine.dispose()
        subprocess.run([*qkms, "resume", mid.id, "--config", str(origin.config_path)], capture_output=True)
    return seconds


def ring(root: Path, pairs: int, load_seconds: float) -> dict[str, Any]:
    topo = uniform("ring", 5)
    sites = network(root, topo)
    m_id, s_id, victim = topo.nodes[0].id, topo.nodes[2].id, topo.nodes[1].id
    m_sae, s_sae = topo.sae(m_id), topo.sae(s_id)
    events: list[tuple[float, bool]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        with client(sites[m_id], m_sae) as m, client(sites[s_id], s_sae) as s:
            while not stop.is_set():
                try:
                    ok, _ = relay_once(m, s, m_sae, s_sae)
                except httpx.HTTPError:
                    ok = False
                with lock:
                    events.append((time.monotonic(), ok))

    with running_network(sites, start_timeout=60.0):
        with client(sites[m_id], m_sae) as m, client(sites[s_id], s_sae) as s:
            deadline = time.monotonic() + 120
            while not relay_once(m, s, m_sae, s_sae)[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the ring never relayed")
                time.sleep(0.2)
        threads = [threading.Thread(target=loop) for _ in range(pairs)]
        for t in threads:
            t.start()
        time.sleep(load_seconds / 2)
        process = sites[victim].process
        assert process is not None
        killed_at = time.monotonic()
        process.kill()
        time.sleep(load_seconds / 2)
        stop.set()
        for t in threads:
            t.join()
        time.sleep(30)
        leftovers = {k: count_open_keys(site) for k, site in sites.items() if k != victim}
        most = most_stored_bits({k: site for k, site in sites.items() if k != victim})
    after = [(t - killed_at, ok) for t, ok in events if t >= killed_at]
    failed_after = [t for t, ok in after if not ok]
    recovered = next((t for t, ok in after if ok and not any(f > t for f in failed_after)), None)
    return {
        "pairs": pairs,
        "requests": len(events),
        "failed_before_kill": sum(1 for t, ok in events if t < killed_at and not ok),
        "failed_after_kill": len(failed_after),
        "seconds_to_steady_success": None if recovered is None else round(recovered, 2),
        "open_keys_30s_after": leftovers,
        "most_stored_bits": most,
    }


def most_stored_bits(sites: dict[str, Site]) -> int:
    """The most unserved bits any link end holds, in any block state (D-25), over every KME."""
    from sqlalchemy import create_engine

    from kms.storage.pool_repository import stored_bits_by_link

    most = 0
    for site in sites.values():
        engine = create_engine(KmsSettings.load(site.config_path).database.url)
        try:
            with engine.connect() as conn:
                most = max([most, *stored_bits_by_link(conn).values()])
        finally:
            engine.dispose()
    return most


def count_open_keys(site: Site) -> int:
    """Keys still ``reserved`` or ``pre_active`` at a KME (none should be, once everything settled)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(KmsSettings.load(site.config_path).database.url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT COUNT(*) FROM keys WHERE state IN ('reserved', 'pre_active')")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", choices=["cold", "latency", "ring"], default=["cold", "latency", "ring"]
    )
    parser.add_argument("--cold-nodes", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    parser.add_argument(
        "--checks", action="store_true", help="db check and audit verify every KME of the cold chain"
    )
    parser.add_argument(
        "--hop-macs",
        choices=["on", "off", "both"],
        default="on",
        help="MAC'd hop messages (D-35) on, off (all signed), or the latency chain run with each",
    )
    args = parser.parse_args()
    global HOP_MACS
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qkms-relay-") as tmp:
        root = Path(tmp)
        if "cold" in args.only:
            results["cold"] = cold(root / "cold", args.cold_nodes, args.checks)
            print("cold chain:", results["cold"], flush=True)
        if "latency" in args.only and args.hop_macs == "both":
            HOP_MACS = False
            signed = latency_and_idle(root / "latency-signed", args.requests, args.idle_seconds)
            print("12-KME chain, every message signed:", signed, flush=True)
        HOP_MACS = args.hop_macs != "off"
        if "latency" in args.only:
            results["latency"] = latency_and_idle(root / "latency", args.requests, args.idle_seconds)
            label = "MAC'd hop messages" if HOP_MACS else "every message signed"
            print(f"12-KME chain, {label}:", results["latency"], flush=True)
        if "ring" in args.only:
            results["ring"] = ring(root / "ring", args.pairs, args.load_seconds)
            print("ring of 5:", results["ring"], flush=True)
    verdicts = []
    if "cold" in results:
        verdicts.append(("cold start <= 30 s", results["cold"]["seconds_to_first_relay"] <= FLOORS["cold_s"]))
    if "latency" in results:
        verdicts.append(("11-hop p50 <= 100 ms", results["latency"]["p50_ms"] <= FLOORS["latency_p50_ms"]))
        verdicts.append(
            ("idle <= 0.02 cores per KME", results["latency"]["idle_cores_mean"] <= FLOORS["idle_cores"])
        )
    if "ring" in results:
        r = results["ring"]
        recovery = r["seconds_to_steady_success"]
        verdicts.append(
            ("ring recovers <= 5 s", recovery is not None and recovery <= FLOORS["ring_recovery_s"])
        )
        verdicts.append(("no open keys 30 s after", not any(r["open_keys_30s_after"].values())))
    stored = [r["most_stored_bits"] for k, r in results.items() if k in ("latency", "ring")]
    if stored:
        limit = POOL["max_pool_bits"]
        verdicts.append((f"no link end holds over {limit} bits", max(stored) <= limit))
    for name, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
