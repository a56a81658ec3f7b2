"""Whole-link real-time factor: simulated seconds per wall second, everything included.

Run: .venv/bin/python benchmarks/bench_link_realtime.py [--blocks 5]

A 1 GHz decoy-BB84 link at 25 km with GYS parameters, 1 s blocks, pacing "fast": physics,
parameter estimation, Cascade, verification, privacy amplification at both ends, HMAC on every
classical message, KeyBlock packing - pulled through the KeySource interface. Floor: >= 1.0.
"""

from __future__ import annotations

import argparse
import time

from _common import pin_one_core

from qkd_adapters.keyblock import KeyBlock, LinkEvent
from qkd_adapters.sim.link import SimulatedLink
from qkd_adapters.sim.postproc.channel import HmacAuthenticator

FLOOR = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    print(f"GYS decoy-BB84, 25 km, 1 GHz, 1 s blocks, {pin_one_core()}")
    auth = HmacAuthenticator(b"benchmark-link-authentication-key")
    warm = SimulatedLink(
        "warm",
        "gys",
        distance_km=25.0,
        clock_rate_hz=1e9,
        seconds_per_block=1.0,
        seed=0,
        authenticator=auth,
        autostart=False,
    )
    warm.produce_block()
    link = SimulatedLink(
        "bench",
        "gys",
        distance_km=25.0,
        clock_rate_hz=1e9,
        seconds_per_block=1.0,
        seed=1,
        authenticator=auth,
        max_queue=args.blocks + 1,
        autostart=False,
    )
    t0 = time.perf_counter()
    link.start()
    events: list[LinkEvent] = []
    while len(events) < args.blocks:
        events.extend(link.pull(args.blocks - len(events), timeout=120))
    wall = time.perf_counter() - t0
    link.close()
    keys = [e for e in events if isinstance(e, KeyBlock)]
    sim_s = sum(float(e.provenance.details["duration_s"]) for e in keys)
    sifted = sum(int(e.provenance.details["sifted_bits"]) for e in keys)
    final = sum(e.bit_length for e in keys)
    factor = args.blocks * 1.0 / wall
    print(f"blocks {args.blocks} ({len(keys)} with key), simulated {args.blocks:.1f} s in {wall:.2f} s wall")
    print(
        f"sifted {sifted / max(sim_s, 1e-9) / 1e6:.3f} Mbit/s simulated, final key {final / max(sim_s, 1e-9) / 1e3:.1f} kbit/s simulated"
    )
    print(f"real-time factor {factor:.2f} (floor {FLOOR}) -> {'PASS' if factor >= FLOOR else 'FAIL'}")
    return 0 if factor >= FLOOR else 1


if __name__ == "__main__":
    raise SystemExit(main())
