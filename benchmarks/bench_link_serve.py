"""A real ``qkms serve`` fed by the simulated link: does its pool grow at the link's finite-key rate?

Run: .venv/bin/python benchmarks/bench_link_serve.py [--preset gys] [--km 10] [--seconds 30]
     [--physics-processes 0]

Starts one KME (``qkms serve``, mTLS on 127.0.0.1, SQLite) whose link is a simulated decoy-BB84
link at 1 GHz with finite-key block sizing, paced in real time, and reads its pool through the
ETSI GS QKD 014 status call every 0.25 s for ``--seconds``. The pool's growth rate (key bits per
wall second, between the first and the last block that arrived in the window) is compared with the
link's own finite-key rate: the same seeded link, run here in-process and unpaced for as many link
seconds, final key bits per link second. Issue 17's check: within 10 %. A link whose real-time
factor is below 1 on this machine cannot keep its pace, and the pool then grows at that factor
times the rate; the script prints both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOLERANCE = 0.10
POLL_S = 0.25  # status polls: a step is seen at most this late


def link_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "preset": args.preset,
        "distance_km": args.km,
        "protocol": "decoy-bb84",
        "clock_rate_hz": 1e9,
        "pacing": "realtime",
        "block_sizing": "finite-key",
        "max_block_seconds": args.max_block_seconds,
        "seed": args.seed,
        "physics_processes": args.physics_processes,
    }


def reference_rate(args: argparse.Namespace, link_seconds: float) -> tuple[float, int, float]:
    """(final bits per link second, blocks, mean block seconds) of the same seeded link, unpaced."""
    from qkd_adapters.keyblock import KeyBlock
    from qkd_adapters.sim.link import SimulatedLink

    opts = {k: v for k, v in link_options(args).items() if k not in ("pacing", "physics_processes")}
    link = SimulatedLink("reference", autostart=False, **opts)
    bits, blocks = 0, 0
    while link.simulated_seconds < link_seconds:
        event, _ = link.produce_block()
        bits += event.bit_length if isinstance(event, KeyBlock) else 0
        blocks += 1
    link.close()
    return bits / link.simulated_seconds, blocks, link.simulated_seconds / blocks


def serve_and_watch(args: argparse.Namespace, workdir: Path) -> list[tuple[float, int]]:
    """Start the KME, then (wall seconds, pool bits) once a second for ``--seconds``."""
    import tomllib

    import tomli_w

    from kms.config import KmsSettings
    from kms.lab.launcher import KmeProcess, free_port
    from kms.provision.workdir import init_workdir, sae_credential_paths

    result = init_workdir(
        workdir,
        "KME-B",
        ["SAE-M", "SAE-S"],
        port=free_port(),
        link_source="simulated",
        pool_overrides={"max_pool_bits": 1 << 30},
    )
    config = tomllib.loads(result.config_path.read_text())
    options = config["links"][0]["options"]
    options.pop("seconds_per_block", None)
    options.update(link_options(args))
    result.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(result.config_path)
    key_size = settings.pool.key_size
    proc = KmeProcess(result.config_path, settings.kme.port, workers=1)
    proc.start()
    samples: list[tuple[float, int]] = []
    try:
        cert, key = sae_credential_paths(workdir, "SAE-M")
        client = proc.client(workdir / "pki" / "ca.pem", cert, key)
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < args.seconds:
            resp = client.get("/api/v1/keys/SAE-S/status")
            if resp.status_code == 200:
                samples.append((now - t0, int(resp.json()["stored_key_count"]) * key_size))
            time.sleep(max(0.0, POLL_S - (time.monotonic() - now)))
        client.close()
    finally:
        proc.stop()
    return samples


def growth_rate(samples: list[tuple[float, int]]) -> tuple[float, int]:
    """Bits per wall second between the first and the last step of the pool, and the steps seen."""
    steps = [samples[i] for i in range(1, len(samples)) if samples[i][1] != samples[i - 1][1]]
    if len(steps) < 2:
        return 0.0, len(steps)
    (t_a, b_a), (t_b, b_b) = steps[0], steps[-1]
    return (b_b - b_a) / (t_b - t_a), len(steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gys")
    ap.add_argument("--km", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-block-seconds", type=float, default=60.0)
    ap.add_argument("--physics-processes", type=int, default=0)
    ap.add_argument("--seed", type=int, default=17)
    args = ap.parse_args()
    print(
        f"{args.preset} decoy-BB84, {args.km:g} km, 1 GHz, finite-key blocks, paced in real time, {args.seconds:g} s"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="qkms-bench-serve-") as tmp:
        samples = serve_and_watch(args, Path(tmp) / "kme")
    pool_rate, steps = growth_rate(samples)
    ref, blocks, block_s = reference_rate(args, args.seconds)
    print(f"pool: {samples[-1][1] if samples else 0:,} bits after {args.seconds:g} s, {steps} growth steps")
    print(f"pool growth rate (qkms serve, wall clock):     {pool_rate / 1e3:10.1f} kbit/s")
    print(
        f"link finite-key rate (same seed, in-process):  {ref / 1e3:10.1f} kbit/s ({blocks} blocks of {block_s:.2f} s)"
    )
    ratio = pool_rate / ref if ref > 0 else 0.0
    ok = abs(ratio - 1.0) <= TOLERANCE
    print(f"ratio {ratio:.3f} (within {TOLERANCE:.0%}: {'PASS' if ok else 'FAIL'})")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
