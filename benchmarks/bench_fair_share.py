"""The greedy-SAE scenario of issue 16 against a real `qkms serve`, with fair shares off and on.

A greedy master (SAE-G) asks for 128 x 4096-bit keys in a tight loop over ``--greedy-connections``
keep-alive connections from a separate process; its slave never fetches. Meanwhile a polite pair
(SAE-P -> SAE-Q) does single-key round trips (enc_keys, then dec_keys of the key_ID) on one
connection. Printed per run: the polite pair's success rate and p50/p99 round-trip latency, the
greedy master's 200s and 503s, and the pool's stored keys after the run. Floors (with quotas on):
polite success >= 99 %, p99 < 100 ms (issue 16 part 4).

The quota settings of the "on" run are passed to the server as ``QKMS_QUOTAS__*`` environment
variables: 1 Mbit/s per pair with a 2 s burst, at most 1,024 reserved keys and 5 % of a link's pool
per master.

Usage::

    .venv/bin/python benchmarks/bench_fair_share.py [--duration 10] [--backend sqlite|postgres] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAES = ("SAE-G", "SAE-H", "SAE-P", "SAE-Q")
QUOTAS_ON = {
    "QKMS_QUOTAS__PAIR_BITS_PER_SECOND": "1000000",
    "QKMS_QUOTAS__BURST_SECONDS": "2",
    "QKMS_QUOTAS__MAX_RESERVED_KEYS_PER_MASTER": "1024",
    "QKMS_QUOTAS__MAX_POOL_SHARE": "0.05",
}
FLOOR_SUCCESS = 0.99
FLOOR_P99_MS = 100.0


def _greedy(base_url: str, ca: str, cert: str, key: str, connections: int, seconds: float, out: Any) -> None:
    """The greedy master: ``connections`` threads, each a keep-alive client in a tight loop."""
    import httpx

    from kms.lab.launcher import client_ssl_context

    answers: Counter[int] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop() -> None:
        with httpx.Client(base_url=base_url, verify=client_ssl_context(Path(ca), Path(cert), Path(key))) as c:
            while time.monotonic() < end:
                try:
                    status = c.post(
                        "/api/v1/keys/SAE-H/enc_keys", json={"number": 128, "size": 4096}
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    answers[status] += 1

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(dict(answers))


def run(backend: str, workers: int, duration: float, connections: int, quotas: bool) -> dict[str, Any]:
    from tests.kme_harness import running_kme
    from tests.support.postgres import PostgresServer

    env_before = dict(os.environ)
    if quotas:
        os.environ.update(QUOTAS_ON)
    pg = None
    try:
        url = None
        if backend == "postgres":
            pg = PostgresServer()
            pg.start()
            url = pg.create_database("fair_share")
        pool = {"max_pool_bits": 64 * 1024 * 1024}  # ~262k keys of 256 bits, as in the issue
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_kme(
                Path(tmp) / "kme", url, saes=SAES, workers=workers, pool=pool, fill_keys=200_000
            ) as kme,
        ):
            from kms.provision.workdir import sae_credential_paths

            cert, key = sae_credential_paths(kme.workdir, "SAE-G")
            queue: Any = multiprocessing.Queue()
            hog = multiprocessing.Process(
                target=_greedy,
                args=(
                    kme.process.base_url,
                    str(kme.ca),
                    str(cert),
                    str(key),
                    connections,
                    duration + 1,
                    queue,
                ),
            )
            hog.start()
            time.sleep(1.0)  # the greedy loop is running before the polite pair is measured
            polite, latencies = _polite(kme, duration)
            greedy = queue.get(timeout=60)
            hog.join()
            stored = kme.client("SAE-P").get("/api/v1/keys/SAE-Q/status").json()["stored_key_count"]
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        if pg is not None:
            pg.stop()
    total = sum(polite.values())
    lat = sorted(latencies)
    return {
        "quotas": quotas,
        "polite_ok": polite[True],
        "polite_total": total,
        "success": polite[True] / total if total else 0.0,
        "p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan"),
        "greedy": greedy,
        "stored_keys_after": stored,
    }


def _polite(kme: Any, duration: float) -> tuple[Counter[bool], list[float]]:
    master, slave = kme.client("SAE-P"), kme.client("SAE-Q")
    outcome: Counter[bool] = Counter()
    latencies: list[float] = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t0 = time.perf_counter()
        got = master.post("/api/v1/keys/SAE-Q/enc_keys", json={"number": 1})
        ok = got.status_code == 200
        if ok:
            key_id = got.json()["keys"][0]["key_ID"]
            ok = (
                slave.post("/api/v1/keys/SAE-P/dec_keys", json={"key_IDs": [{"key_ID": key_id}]}).status_code
                == 200
            )
        outcome[ok] += 1
        if ok:
            latencies.append(time.perf_counter() - t0)
        else:
            time.sleep(0.01)
    return outcome, latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--greedy-connections", type=int, default=4)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(
        f"bench_fair_share: {args.backend}, workers={args.workers}, {args.duration:g} s, "
        f"greedy on {args.greedy_connections} connections; load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        "quotas  polite ok/total  success  p50 ms  p99 ms  greedy 200  greedy 503  other  stored keys after  verdict"
    )
    verdict_ok = True
    for quotas in (False, True):
        r = run(args.backend, args.workers, args.duration, args.greedy_connections, quotas)
        g = r["greedy"]
        other = sum(v for k, v in g.items() if k not in (200, 503))
        verdict = "-"
        if quotas:
            passed = r["success"] >= FLOOR_SUCCESS and r["p99_ms"] < FLOOR_P99_MS
            verdict_ok = passed
            verdict = (
                "PASS" if passed else f"FAIL (success >= {FLOOR_SUCCESS:.0%}, p99 < {FLOOR_P99_MS:g} ms)"
            )
        print(
            f"{'on' if quotas else 'off':6}  {r['polite_ok']:>6}/{r['polite_total']:<8} {r['success']:7.1%}"
            f"  {r['p50_ms']:6.1f}  {r['p99_ms']:6.1f}  {g.get(200, 0):>10}  {g.get(503, 0):>10}  {other:>5}"
            f"  {r['stored_keys_after']:>17}  {verdict}"
        )
    return 0 if verdict_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
