"""Throughput of the BB84 physics simulator: simulated link seconds per wall second.

Run: .venv/bin/python benchmarks/bench_sim_physics.py [--preset gys] [--km 25] [--clock 1e9] [--seconds 1]
     [--repeats 5] [--sampler arrivals|time-ordered|both] [--set name=value ...]

With dead time or afterpulsing (snspd-modern) ``--sampler`` picks the detector sampler of
qkd_adapters/sim/physics/gates.py; ``both`` times the fast one and the time-ordered reference on the
same block size. ``--set`` overrides preset fields (e.g. ``--set mu=0.6`` for the old snspd-modern).
Issue 17's figure: ``--preset snspd-modern --km 10 --seconds 0.25 --sampler both``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from qkd_adapters.sim.params import load_preset
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block
from qkd_adapters.sim.physics.gates import SAMPLERS, Sampler


def _override(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError("--set takes name=value")
    return name, float(value)


def _time(params: object, n: int, sampler: Sampler, repeats: int, seconds: float) -> None:
    rng = np.random.default_rng(1)
    simulate_bb84_block(params, min(n, 10**7), rng, sampler=sampler)  # type: ignore[arg-type]  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        block = simulate_bb84_block(params, n, rng, sampler=sampler)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    print(
        f"  sampler={sampler:12s} wall best {min(times) * 1e3:.1f} ms, median {med * 1e3:.1f} ms per block; "
        f"CPU best {min(cpu) * 1e3:.1f} ms, median {statistics.median(cpu) * 1e3:.1f} ms "
        f"({seconds / med:.2f} link-s per wall-s), detections={int(block.counts.detected_all.sum())}, "
        f"sifted key={block.alice_key.size}, lost to dead time={block.dead_time_losses}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="gys")
    ap.add_argument("--km", type=float, default=25.0)
    ap.add_argument("--clock", type=float, default=1e9)
    ap.add_argument("--seconds", type=float, default=1.0, help="simulated link time per block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sampler", choices=[*SAMPLERS, "both"], default="arrivals")
    ap.add_argument("--set", type=_override, action="append", default=[], dest="overrides")
    args = ap.parse_args()
    params = load_preset(args.preset, length_km=args.km, clock_rate_hz=args.clock, **dict(args.overrides))
    n = int(args.seconds * params.clock_rate_hz)
    print(
        f"preset={params.name} L={args.km} km clock={params.clock_rate_hz:.3g} Hz pulses={n:.3g} "
        f"dead gates={params.dead_gates} afterpulse={params.afterpulse_prob} overrides={dict(args.overrides)}"
    )
    samplers: tuple[Sampler, ...] = SAMPLERS if args.sampler == "both" else (args.sampler,)
    for sampler in samplers:
        _time(params, n, sampler, args.repeats, args.seconds)


if __name__ == "__main__":
    main()
