"""Whole-link real-time factor: simulated seconds per wall second, everything included.

Run: .venv/bin/python benchmarks/bench_link_realtime.py [--preset gys] [--km 25] [--seconds 5]
     [--configs 0/default,2/keep] [--block-seconds S | --block-sizing finite-key]

Physics, parameter estimation, Cascade, verification, privacy amplification at both ends, HMAC on
every classical message, KeyBlock packing - pulled through the KeySource interface with pacing
"fast". Each configuration ``P/M`` runs the same seeded link in a fresh process: P physics worker
processes (0 = inline) and M = ``default`` (glibc returns freed memory to the OS) or ``keep``
(:func:`keep_freed_memory`, as ``qkms sim run`` and the workers do). The default compares the link
before issue 17's pipeline (``0/default``) with the pipelined one (``2/keep``, DECISIONS D-38) and
checks that both deliver the same block sizes, final lengths and leaks. The first block of each run is a warm-up (numba caches, the physics process starting) and
is left out of the figures. Per stage it prints CPU seconds per link second (this thread's CPU time
for each stage; HMAC estimated as messages x the measured cost of one sign + verify).

Floors (issue 17): GYS 25 km at 1 GHz, 1 s blocks: RTF >= 1.0; snspd-modern 10 km at 1 GHz
(``--preset snspd-modern --km 10 --seconds 2 --block-sizing finite-key``): RTF >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import ROOT  # noqa: F401  (puts the repository on sys.path, one thread per library)

from qkd_adapters.keyblock import KeyBlock, LinkAlarm, LinkEvent
from qkd_adapters.sim.link import SimulatedLink
from qkd_adapters.sim.physics_feed import keep_freed_memory
from qkd_adapters.sim.postproc.channel import HmacAuthenticator

FLOORS = {"gys": 1.0, "snspd-modern": 0.5}
RESULT = "\nRESULT "
STAGES = ("estimation", "reconciliation", "verification", "privacy_amplification")
AUTH = HmacAuthenticator(b"benchmark-link-authentication-key")


def _details(event: LinkEvent) -> dict[str, Any]:
    return dict(event.provenance.details if isinstance(event, KeyBlock) else event.details)


def _hmac_cost() -> float:
    """Seconds per message for one sign and one verify of a typical Cascade message."""
    payload = bytes(96)
    n = 20000
    t = time.thread_time()
    for _ in range(n):
        AUTH.verify(payload, AUTH.sign(payload))
    return (time.thread_time() - t) / n


def run(args: argparse.Namespace, processes: int) -> dict[str, Any]:
    sizing: dict[str, Any] = (
        {"block_sizing": "finite-key"}
        if args.block_sizing == "finite-key"
        else {"seconds_per_block": args.block_seconds}
    )
    link = SimulatedLink(
        "bench", args.preset, distance_km=args.km, clock_rate_hz=args.clock, seed=args.seed,
        authenticator=AUTH, max_queue=10_000, autostart=False, physics_processes=processes, **sizing,
    )  # fmt: skip
    first = link.end("bob")
    link.start()
    warm = _pull(link, 1)
    t0, c0 = time.perf_counter(), _cpu()
    start_sim = link.simulated_seconds
    events: list[LinkEvent] = []
    while link.simulated_seconds - start_sim < args.seconds:
        events.extend(_pull(link, 1))
    wall = time.perf_counter() - t0
    link.close()
    cpu = _cpu() - c0
    first.pull(10_000)
    sim = sum(float(_details(e)["duration_s"]) for e in events)
    return {"events": events, "warm": warm, "wall": wall, "sim": sim, "cpu": cpu, "rss_mb": _rss_mb()}


def _pull(link: SimulatedLink, n: int) -> list[LinkEvent]:
    out: list[LinkEvent] = []
    while len(out) < n:
        out.extend(link.pull(n - len(out), timeout=600))
    return out


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _rss_mb() -> str:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return f"{s.ru_maxrss / 1024:.0f} MB (largest child {c.ru_maxrss / 1024:.0f} MB)"


def report(label: str, r: dict[str, Any], hmac_s: float) -> float:
    events, sim, wall = r["events"], r["sim"], r["wall"]
    keys = [e for e in events if isinstance(e, KeyBlock)]
    final = sum(e.bit_length for e in keys)
    sifted = sum(int(_details(e)["sifted_bits"]) for e in events)
    rtf = sim / wall
    print(
        f"\n[{label}] {len(events)} blocks ({len(events) - len(keys)} aborted), {sim:.2f} s of link in {wall:.2f} s wall"
    )
    print(
        f"  real-time factor {rtf:.3f}; CPU of all processes {r['cpu'] / sim:.2f} s per link second (workers' start included); peak RSS {r['rss_mb']}"
    )
    print(f"  sifted {sifted / sim / 1e6:.2f} Mbit/s, final key {final / sim / 1e6:.3f} Mbit/s of link time")
    print(f"  block seconds: {statistics.mean(float(_details(e)['duration_s']) for e in events):.3f} mean")
    cpu: dict[str, float] = {"physics": sum(float(_details(e)["cpu_s"]["physics"]) for e in events)}
    for st in STAGES:
        cpu[st] = sum(float(_details(e).get("postprocessing_cpu_s", {}).get(st, 0.0)) for e in events)
    post = sum(float(_details(e)["cpu_s"]["postprocessing"]) for e in events)
    cpu["link overhead (packing, provenance)"] = post - sum(cpu[s] for s in STAGES)
    msgs = sum(sum(d["messages"] for d in _details(e)["classical_channel"].values()) for e in events)
    print("  CPU s per link second by stage (thread CPU time):")
    for name, v in cpu.items():
        print(f"    {name:<38} {v / sim:6.3f}")
    print(f"    {'of which HMAC (est., ' + str(msgs) + ' messages)':<38} {msgs * hmac_s / sim:6.3f}")
    return float(rtf)


def _outcome(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (
            _details(e)["n_pulses"],
            e.bit_length if isinstance(e, KeyBlock) else e.reason,
            _details(e)["leaked_ec_bits"],
        )
        for e in r["events"]
        if isinstance(e, KeyBlock | LinkAlarm)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gys")
    ap.add_argument("--km", type=float, default=25.0)
    ap.add_argument("--clock", type=float, default=1e9)
    ap.add_argument(
        "--seconds", type=float, default=5.0, help="link seconds measured after the warm-up block"
    )
    ap.add_argument("--block-seconds", type=float, default=1.0)
    ap.add_argument("--block-sizing", choices=("fixed", "finite-key"), default="fixed")
    ap.add_argument("--configs", default="0/default,2/keep", help="P/M per run: physics processes, malloc")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.single is not None:
        return _single(args)
    blocks = "finite-key blocks" if args.block_sizing == "finite-key" else f"{args.block_seconds:g} s blocks"
    print(
        f"{args.preset} decoy-BB84, {args.km:g} km, {args.clock:.3g} Hz, {blocks}, {args.seconds:g} s of link"
    )
    print(f"CPUs available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f} at start")
    results: dict[str, dict[str, Any]] = {}
    for config in args.configs.split(","):
        argv = [
            "--preset",
            args.preset,
            "--km",
            str(args.km),
            "--clock",
            str(args.clock),
            "--seed",
            str(args.seed),
        ]
        argv += ["--seconds", str(args.seconds), "--block-seconds", str(args.block_seconds)]
        argv += ["--block-sizing", args.block_sizing]
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--single", config], capture_output=True, text=True, check=False
        )
        sys.stdout.write(out.stdout.split(RESULT)[0])
        if out.returncode not in (0, 1) or RESULT not in out.stdout:
            print(out.stderr[-2000:])
            return 2
        results[config] = json.loads(out.stdout.split(RESULT)[1])
    base = next(iter(results))
    for config, r in list(results.items())[1:]:
        a, b = results[base]["outcome"], r["outcome"]
        n = min(len(a), len(b))
        print(f"\n{config} vs {base}: same blocks, final lengths and leaks: {a[:n] == b[:n]}")
        print(
            f"real-time factor {results[base]['rtf']:.3f} -> {r['rtf']:.3f} ({r['rtf'] / results[base]['rtf']:.2f}x)"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0 if all(r["pass"] for r in results.values()) else 1


def _single(args: argparse.Namespace) -> int:
    processes, _, malloc = args.single.partition("/")
    kept = keep_freed_memory() if malloc == "keep" else False
    r = run(args, int(processes))
    label = f"physics processes {processes}, malloc {'keep' if kept else 'default'}"
    rtf = report(label, r, _hmac_cost())
    floor = FLOORS.get(args.preset, 1.0)
    print(f"  -> floor {floor}: {'PASS' if rtf >= floor else 'FAIL'}")
    print(RESULT + json.dumps({"rtf": rtf, "pass": rtf >= floor, "outcome": _outcome(r)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
