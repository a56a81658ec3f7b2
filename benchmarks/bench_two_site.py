"""Two-site key delivery over the KME-to-KME protocol, against single-site delivery on the same machine.

Three real KME processes (``kms.lab.pilot``: sites A, B, C; links A-B and B-C; SQLite; random paired test
sources) on 127.0.0.1, all over mTLS. One load-generator process (asyncio, one keep-alive aiohttp
session per SAE) runs, one scenario after another, ``--pairs`` concurrent master/slave pairs looping
``enc_keys (number=1, 256 bits) at the master's KME -> dec_keys at the slave's KME`` and checking the
slave got the master's key:

* ``single-site``: master and slave both at A (the single-site figure, measured in the same run);
* ``two-site``:    master at A, slave at B (A records each request at B before answering);
* ``relay``:       master at A, slave at C, two hops through trusted node B (latency).

Floor (issue 14, raised from issue 5's 50 %): two-site round trips/s >= 60 % of single-site.

Usage::

    .venv/bin/python benchmarks/bench_two_site.py --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FLOOR_RATIO = 0.6
KEY_BITS = 256


async def _loop(
    sessions: dict[str, Any],
    urls: dict[str, str],
    master: str,
    slave: str,
    t_start: float,
    t_end: float,
    lat: list[float],
    errors: dict[str, int],
) -> None:
    enc_url = f"{urls[master]}/api/v1/keys/{slave}/enc_keys"
    dec_url = f"{urls[slave]}/api/v1/keys/{master}/dec_keys"
    body = json.dumps({"number": 1, "size": KEY_BITS})
    while (t0 := time.perf_counter()) < t_end:
        try:
            async with sessions[master].post(
                enc_url, data=body, headers={"content-type": "application/json"}
            ) as r:
                status, got = r.status, await r.json(content_type=None)
            if status != 200:
                errors[f"enc {status}"] = errors.get(f"enc {status}", 0) + 1
                await asyncio.sleep(0.01)
                continue
            ids = json.dumps({"key_IDs": [{"key_ID": k["key_ID"]} for k in got["keys"]]})
            async with sessions[slave].post(
                dec_url, data=ids, headers={"content-type": "application/json"}
            ) as r:
                status2, got2 = r.status, await r.json(content_type=None)
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.01)
            continue
        if status2 != 200 or got2["keys"][0]["key"] != got["keys"][0]["key"]:
            errors[f"dec {status2}"] = errors.get(f"dec {status2}", 0) + 1
            continue
        if t0 >= t_start:
            lat.append(time.perf_counter() - t0)


async def _client(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    from kms.lab.launcher import client_ssl_context

    sessions = {
        sae: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=1, ssl=client_ssl_context(Path(c[0]), Path(c[1]), Path(c[2]))
            )
        )
        for sae, c in spec["creds"].items()
    }
    lat: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter() + spec["warmup"]
    t_end = t_start + spec["duration"]
    try:
        await asyncio.gather(
            *(_loop(sessions, spec["urls"], m, s, t_start, t_end, lat, errors) for m, s in spec["pairs"])
        )
    finally:
        for s in sessions.values():
            await s.close()
    return {"latencies": lat, "errors": errors}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def run_scenario(tmp: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--client-spec", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    lat = result["latencies"]
    return {
        "scenario": name,
        "round_trips_per_s": len(lat) / spec["duration"],
        "p50_ms": _pct(lat, 50) * 1000,
        "p99_ms": _pct(lat, 99) * 1000,
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
        "errors": result["errors"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--relay-pairs", type=int, default=1, help="concurrent pairs for the relay latency run")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats of the three scenarios")
    ap.add_argument("--client-spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_spec:
        print(json.dumps(asyncio.run(_client(json.loads(Path(args.client_spec).read_text())))))
        return 0

    from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network, running_network
    from kms.provision.peers import add_link
    from tests.peer.conftest import Network, wait_for_remote_keys

    n = args.pairs
    a_saes = tuple(f"A-M{i:02d}" for i in range(n)) + tuple(f"A-S{i:02d}" for i in range(n))
    b_saes = tuple(f"B-S{i:02d}" for i in range(n))
    c_saes = tuple(f"C-S{i:02d}" for i in range(n))
    pool = {"max_pool_bits": 32 * 1024 * 1024, "reserved_ttl_seconds": 120.0}
    with tempfile.TemporaryDirectory(prefix="qkms-bench-2site-") as tmpdir:
        tmp = Path(tmpdir)
        options = {"block_bits": 1 << 20}
        sites = prepare_network(
            tmp,
            [SiteSpec("KME-A", a_saes), SiteSpec("KME-B", b_saes), SiteSpec("KME-C", c_saes)],
            [
                LinkSpec("link-ab", "KME-A", "KME-B", options=options),
                LinkSpec("link-bc", "KME-B", "KME-C", options=options),
            ],
            pool=pool,
        )
        # Site A's own local link feeds the single-site pairs (both SAEs at A).
        add_link(sites["KME-A"].config_path, "link-a-local", "KME-A", "random", options)
        net = Network(sites, {})
        with running_network(sites):
            wait_for_remote_keys(net, "KME-A", "A-M00", "A-S00", minimum=20000)
            wait_for_remote_keys(net, "KME-A", "A-M00", "B-S00", minimum=20000)
            wait_for_remote_keys(net, "KME-A", "A-M00", "C-S00", minimum=2000)
            net.close()
            creds: dict[str, list[str]] = {}
            urls: dict[str, str] = {}
            for site in sites.values():
                for sae in site.saes:
                    cert, key = site.sae_credentials(sae)
                    creds[sae] = [str(site.ca), str(cert), str(key)]
                    urls[sae] = site.url
            base = {"creds": creds, "urls": urls, "warmup": args.warmup, "duration": args.duration}
            scenarios = {
                "single-site": [(f"A-M{i:02d}", f"A-S{i:02d}") for i in range(n)],
                "two-site": [(f"A-M{i:02d}", f"B-S{i:02d}") for i in range(n)],
                "relay": [(f"A-M{i:02d}", f"C-S{i:02d}") for i in range(args.relay_pairs)],
            }
            rows: dict[str, list[dict[str, Any]]] = {name: [] for name in scenarios}
            # Interleaved repeats: on a shared 2-core machine the load drifts; pairing each two-site run
            # with a single-site run next to it keeps the ratio honest.
            for _ in range(args.repeat):
                for name, pairs in scenarios.items():
                    used = {s for p in pairs for s in p}
                    spec = {**base, "pairs": pairs, "creds": {k: v for k, v in creds.items() if k in used}}
                    row = run_scenario(tmp, name, spec)
                    rows[name].append(row)
                    print(
                        f"{name:12s} pairs={len(pairs):2d}  {row['round_trips_per_s']:8.1f} rt/s  "
                        f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}",
                        flush=True,
                    )
    ratios = [
        t["round_trips_per_s"] / s["round_trips_per_s"]
        for s, t in zip(rows["single-site"], rows["two-site"], strict=True)
        if s["round_trips_per_s"]
    ]
    ratio = statistics.median(ratios) if ratios else 0.0
    verdict = "met" if ratio >= FLOOR_RATIO else "NOT met"
    single = statistics.median(r["round_trips_per_s"] for r in rows["single-site"])
    two = statistics.median(r["round_trips_per_s"] for r in rows["two-site"])
    print(f"median single-site {single:.1f} rt/s, two-site {two:.1f} rt/s")
    print(
        f"two-site / single-site per run: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median {ratio:.2f} (floor {FLOOR_RATIO:.2f}: {verdict})"
    )
    relay = rows["relay"]
    print(
        "relay over two hops: p50 "
        + ", ".join(f"{r['p50_ms']:.1f}" for r in relay)
        + " ms; p99 "
        + ", ".join(f"{r['p99_ms']:.1f}" for r in relay)
        + " ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
