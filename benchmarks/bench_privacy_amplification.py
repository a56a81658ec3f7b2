"""Toeplitz privacy amplification (FFT) throughput on one core, 1e6..1e7-bit input blocks.

Run: .venv/bin/python benchmarks/bench_privacy_amplification.py [--ratio 0.5]

Figures are input bits hashed per wall second by ONE end (seed FFT + key FFT + inverse FFT).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import pin_one_core

from qkd_adapters.sim.postproc.privacy_amplification import toeplitz_hash

SIZES = (1_000_000, 2_000_000, 5_000_000, 10_000_000)
FLOOR_MBPS = 50.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="output bits / input bits")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"Toeplitz PA via scipy.fft (float64, exact), output/input = {args.ratio}, {pin_one_core()}")
    rng = np.random.default_rng(1)
    toeplitz_hash(rng.integers(0, 2, 1000, dtype=np.uint8), rng.integers(0, 2, 1499, dtype=np.uint8), 500)
    ok = True
    print(f"{'input bits':>12} {'output bits':>12} {'best s':>8} {'Mbit/s':>8}")
    for n in SIZES:
        m = max(1, int(n * args.ratio))
        x = rng.integers(0, 2, n, dtype=np.uint8)
        seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            toeplitz_hash(x, seed, m)
            best = min(best, time.perf_counter() - t0)
        rate = n / best / 1e6
        ok &= rate >= FLOOR_MBPS
        print(f"{n:12d} {m:12d} {best:8.3f} {rate:8.1f}")
    print(f"floor >= {FLOOR_MBPS} Mbit/s -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
