"""QKMS's simulated link vs SeQUeNCe (BB84 + Cascade) on the same GYS link, in one run.

Run: benchmarks/sequence_env.sh && .venv/bin/python benchmarks/bench_vs_sequence.py [--keynum 20]

Both simulate GYS at 25 km with a 1 GHz clock and report error-corrected key bits per wall
second. SeQUeNCe is a discrete-event simulator that follows every photon; its Cascade runs on
KEYSIZE-bit keys (512 x keynum, ~1e4 bits by default). QKMS's figure is Cascade-corrected bits
from the same link, everything included (physics, parameter estimation, verification, PA).
SeQUeNCe runs in its own venv (QKMS_SEQ_VENV, default /tmp/qkms-seq-venv). Floor: ratio >= 1e4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from _common import pin_one_core

from qkd_adapters.keyblock import KeyBlock
from qkd_adapters.sim.link import SimulatedLink

FLOOR = 1e4
HERE = Path(__file__).resolve().parent


def run_sequence(keysize: int, keynum: int, distance_km: float) -> dict[str, float]:
    venv = Path(os.environ.get("QKMS_SEQ_VENV", "/tmp/qkms-seq-venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"SeQUeNCe venv not found at {venv}: run benchmarks/sequence_env.sh first")
    out = subprocess.run(
        [str(py), str(HERE / "_sequence_driver.py"), str(keysize), str(keynum), str(distance_km)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_qkms(blocks: int, distance_km: float) -> dict[str, float]:
    link = SimulatedLink(
        "vs-seq",
        "gys",
        distance_km=distance_km,
        clock_rate_hz=1e9,
        seconds_per_block=1.0,
        seed=3,
        autostart=False,
    )
    link.produce_block()  # JIT warm-up, not timed
    t0 = time.perf_counter()
    corrected = 0
    for _ in range(blocks):
        ev, _ = link.produce_block()
        if isinstance(ev, KeyBlock):
            corrected += int(ev.provenance.details["sifted_bits"])
    wall = time.perf_counter() - t0
    return {"corrected_bits": corrected, "wall_s": wall, "simulated_s": float(blocks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keysize", type=int, default=512)
    ap.add_argument("--keynum", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--distance-km", type=float, default=25.0)
    args = ap.parse_args()
    print(f"GYS BB84 + Cascade at {args.distance_km} km, 1 GHz; {pin_one_core()} (SeQUeNCe inherits it)")
    seq = run_sequence(args.keysize, args.keynum, args.distance_km)
    ours = run_qkms(args.blocks, args.distance_km)
    seq_rate = seq["corrected_bits"] / seq["wall_s"]
    our_rate = ours["corrected_bits"] / ours["wall_s"]
    print(f"SeQUeNCe: {seq['corrected_bits']:.0f} corrected bits in {seq['wall_s']:.1f} s wall -> {seq_rate:,.1f} bit/s "
          f"(simulated {seq['simulated_s']:.3f} s, keys match: {seq['keys_match']})")  # fmt: skip
    print(f"QKMS    : {ours['corrected_bits']:.0f} corrected bits in {ours['wall_s']:.2f} s wall -> {our_rate:,.0f} bit/s "
          f"(simulated {ours['simulated_s']:.1f} s)")  # fmt: skip
    ratio = our_rate / seq_rate
    print(f"ratio {ratio:,.0f}x (floor {FLOOR:,.0f}x) -> {'PASS' if ratio >= FLOOR else 'FAIL'}")
    return 0 if ratio >= FLOOR else 1


if __name__ == "__main__":
    raise SystemExit(main())
