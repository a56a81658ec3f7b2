"""Throughput of the BB84 physics simulator: simulated link seconds per wall second.

Run: .venv/bin/python benchmarks/bench_sim_physics.py [--preset gys] [--km 25] [--clock 1e9] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from qkd_adapters.sim.params import load_preset
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="gys")
    ap.add_argument("--km", type=float, default=25.0)
    ap.add_argument("--clock", type=float, default=1e9)
    ap.add_argument("--seconds", type=float, default=1.0, help="simulated link time per block")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    params = load_preset(args.preset, length_km=args.km, clock_rate_hz=args.clock)
    n = int(args.seconds * params.clock_rate_hz)
    rng = np.random.default_rng(1)
    simulate_bb84_block(params, min(n, 10**7), rng)  # warm-up (numba compile / cache load)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        block = simulate_bb84_block(params, n, rng)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(
        f"preset={params.name} L={args.km} km clock={params.clock_rate_hz:.3g} Hz pulses={n:.3g}: "
        f"median {med * 1e3:.1f} ms per block ({args.seconds / med:.1f} link-s per wall-s), "
        f"detections={int(block.counts.detected_all.sum())}, sifted key={block.alice_key.size}"
    )


if __name__ == "__main__":
    main()
