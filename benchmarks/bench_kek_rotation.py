"""Key delivery while the KEK rotates (issue 16 part 2, docs/DECISIONS.md D-27).

Runs ``bench_delivery``'s single-key scenario (``--pairs`` master/slave pairs, enc_keys + dec_keys
round trips over mTLS against a real ``qkms serve --workers N``) first with nothing else going on,
then again while real ``qkms kek rotate`` processes re-seal the whole store (pool blocks, keys
still holding material, identity seeds) in batches of ``--batch``, one rotation after the other (each
to a new version, each including its final wait of two ``kek.refresh_seconds``) for the whole measured
window. Prints round trips/s and p50/p99 of both, how many rotations ran, how many records they
re-sealed and how much of the measured window they covered. No floor: it reports the cost.

Usage::

    .venv/bin/python benchmarks/bench_kek_rotation.py --backend sqlite --repeat 2
    .venv/bin/python benchmarks/bench_kek_rotation.py --backend postgres --batch 512
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_delivery as bd  # noqa: E402


class Rotation(threading.Thread):
    """``qkms kek rotate`` started after ``delay`` seconds and run again as soon as it ends (each time to
    a new version) until :meth:`stop`, so that re-sealing covers the whole measured window; timed."""

    def __init__(self, config: Path, delay: float, batch: int) -> None:
        super().__init__(daemon=True)
        self.config, self.delay, self.batch = config, delay, batch
        self.started = self.ended = 0.0
        self.outputs: list[str] = []
        self.failed: str | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        time.sleep(self.delay)
        self.started = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "kms",
            "kek",
            "rotate",
            "--batch",
            str(self.batch),
            "--config",
            str(self.config),
        ]
        while not self._halt.is_set():
            done = subprocess.run(
                cmd, capture_output=True, text=True, cwd=bd.REPO, env={**_env(), "COLUMNS": "300"}
            )
            self.outputs.append(done.stdout)
            if done.returncode != 0:
                self.failed = (done.stdout + done.stderr).strip()[-300:]
                break
        self.ended = time.monotonic()

    @property
    def returncode(self) -> int:
        return 1 if self.failed else 0

    def resealed(self) -> int:
        text = "\n".join(self.outputs)
        return sum(int(n) for n in re.findall(r"(\d+) (?:key_blocks|keys|kme_keys)", text))


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def run_backend(
    args: argparse.Namespace, bench: bd.Bench, backend: str
) -> list[tuple[Any, Any, Rotation, float]]:
    from tests.kme_harness import running_kme
    from tests.support.postgres import PostgresServer

    names, pairs = bench.saes()
    pool = {"max_pool_bits": args.pool_mbit * 1024 * 1024, "storage_block_bits": 65536}
    rows = []
    with contextlib.ExitStack() as stack:
        url, pg = None, None
        if backend == "postgres":
            server = PostgresServer()
            server.start()
            stack.callback(server.stop)
            url = server.create_database("qkms_bench")
            pg = bd.CpuGroup(
                "postgres", root=int((server.data_dir / "postmaster.pid").read_text().split()[0])
            )
        workdir = bench.tmp / f"kme-{backend}"
        kme = stack.enter_context(
            running_kme(workdir, url, saes=tuple(names), pool=pool, fill_keys=pool["max_pool_bits"] // bd.KEY_BITS,
                        workers=args.workers)
        )  # fmt: skip
        assert kme.process.proc is not None
        time.sleep(1.0)
        kme_cpu = bd.CpuGroup("kme", pgid=kme.process.proc.pid)
        creds = {
            n: [str(workdir / "pki" / "sae" / f"{n}.pem"), str(workdir / "pki" / "sae" / f"{n}.key")]
            for n in names
        }
        spec = {"base_url": kme.process.base_url, "ca": str(kme.ca), "creds": creds, "pairs": pairs,
                "warmup": args.warmup, "duration": args.duration, "client": "aiohttp", "number": 1}  # fmt: skip
        for _ in range(args.repeat):
            before = bench.run_client(backend, args.workers, "single", spec, kme_cpu, pg)
            rotation = Rotation(kme.process.config_path, args.warmup, args.batch)
            t0 = time.monotonic()
            rotation.start()
            during = bench.run_client(backend, args.workers, "rotating", spec, kme_cpu, pg)
            rotation.stop()
            rotation.join()
            window = (t0 + args.warmup, t0 + args.warmup + args.duration)
            overlap = (
                max(0.0, min(window[1], rotation.ended) - max(window[0], rotation.started)) / args.duration
            )
            rows.append((before, during, rotation, overlap))
            _print(backend, before, during, rotation, overlap)
    return rows


HEADER = (
    f"{'backend':<9}{'before rt/s':>12}{'p99 ms':>8}{'rotating rt/s':>14}{'p99 ms':>8}{'ratio':>7}"
    f"{'errors':>8}{'rotations':>10}{'resealed':>10}{'overlap':>8}"
)


def _print(backend: str, before: Any, during: Any, rotation: Rotation, overlap: float) -> None:
    ok = "" if rotation.failed is None else f"  ROTATION FAILED: {rotation.failed}"
    print(
        f"{backend:<9}{before.rt_per_s:12.0f}{before.p99_ms:8.1f}{during.rt_per_s:14.0f}{during.p99_ms:8.1f}"
        f"{during.rt_per_s / max(before.rt_per_s, 1e-9):7.2f}{sum(during.errors.values()):8d}"
        f"{len(rotation.outputs):10d}{rotation.resealed():10d}{overlap:8.0%}{ok}",
        flush=True,
    )
    if during.errors:
        print(f"    errors while rotating: {during.errors}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="records re-sealed per transaction")
    parser.add_argument("--pool-mbit", type=int, default=128, help="max_pool_bits in Mibit (pre-filled)")
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print(f"bench_kek_rotation: {args.pairs} pairs, workers {args.workers}, batch {args.batch}, "
          f"pool {args.pool_mbit} Mibit, measure {args.duration:g}s after {args.warmup:g}s warm-up", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    failed = False
    with bd._tmpdir() as tmp:
        bench = bd.Bench(argparse.Namespace(pairs=args.pairs), tmp)
        for backend in backends:
            failed |= any(r[2].returncode != 0 for r in run_backend(args, bench, backend))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
