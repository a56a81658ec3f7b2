"""PQC operation rates (ops/s) per backend and algorithm: ML-KEM and ML-DSA as QKMS calls them.

Measured through the provider interface, so the figures include what the service really pays: every
private-key operation re-derives the key from its FIPS seed (``decapsulate``, ``sign``), and every
public-key operation parses the raw public key. Operations:

* ML-KEM: ``keygen`` (seed -> public key), ``encaps``, ``decaps`` (seed + ciphertext -> secret);
* ML-DSA: ``keygen``, ``sign`` (hedged, 1 KiB message, 16-byte context), ``verify``.

Each operation runs repeatedly for ``--seconds`` (after a short warm-up); the rate is operations
divided by wall time, single-threaded. Only backends that passed their start-up checks are measured
(liboqs when its library is found — set ``OQS_INSTALL_PATH``).

Usage::

    .venv/bin/python benchmarks/bench_pqc.py
    .venv/bin/python benchmarks/bench_pqc.py --seconds 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kms.crypto.pqc import (
    KemAlgorithm,
    KemProvider,
    SignatureAlgorithm,
    SignatureProvider,
    available_backends,
    get_kem_provider,
    get_signature_provider,
)

MESSAGE = os.urandom(1024)
CONTEXT = b"qkms/bench/v1..."


def rate(op: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``op`` over about ``seconds`` of wall time."""
    warm_until = time.perf_counter() + min(0.1, seconds / 5)
    while time.perf_counter() < warm_until:
        op()
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(8):
            op()
        count += 8
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def bench_kem(kem: KemProvider, alg: KemAlgorithm, seconds: float) -> dict[str, float]:
    pair = kem.generate(alg)
    ct, _ = kem.encapsulate(alg, pair.public_key)
    return {
        "keygen": rate(lambda: kem.public_key_from_seed(alg, pair.private_seed), seconds),
        "encaps": rate(lambda: kem.encapsulate(alg, pair.public_key), seconds),
        "decaps": rate(lambda: kem.decapsulate(alg, pair.private_seed, ct), seconds),
    }


def bench_sig(sig: SignatureProvider, alg: SignatureAlgorithm, seconds: float) -> dict[str, float]:
    pair = sig.generate(alg)
    signature = sig.sign(alg, pair.private_seed, MESSAGE, CONTEXT)
    return {
        "keygen": rate(lambda: sig.public_key_from_seed(alg, pair.private_seed), seconds),
        "sign": rate(lambda: sig.sign(alg, pair.private_seed, MESSAGE, CONTEXT), seconds),
        "verify": rate(lambda: sig.verify(alg, pair.public_key, MESSAGE, signature, CONTEXT), seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per operation (s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    rows: list[dict[str, object]] = []
    skipped: dict[str, str] = {}
    rows_versions = {r.name: r.version for r in available_backends() if r.available}
    for report in available_backends():
        if not report.available:
            skipped[report.name] = report.reason or "unavailable"
            continue
        kem, sig = get_kem_provider(report.name), get_signature_provider(report.name)
        for kem_alg in KemAlgorithm:
            rows.append(
                {"backend": report.name, "algorithm": str(kem_alg), **bench_kem(kem, kem_alg, args.seconds)}
            )
        for sig_alg in SignatureAlgorithm:
            rows.append(
                {"backend": report.name, "algorithm": str(sig_alg), **bench_sig(sig, sig_alg, args.seconds)}
            )

    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": rows_versions,
        "skipped": skipped,
        "seconds_per_op": args.seconds,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return 0

    print(
        f"PQC rates, ops/s, single thread ({meta['machine']}, Python {meta['python']}, {args.seconds}s per op)"
    )
    for name, version in rows_versions.items():
        print(f"  {name}: {version}")
    for name, why in skipped.items():
        print(f"  {name}: not measured ({why})")
    header = f"{'backend':<8} {'algorithm':<12} {'keygen':>10} {'encaps/sign':>12} {'decaps/verify':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        second = row.get("encaps", row.get("sign"))
        third = row.get("decaps", row.get("verify"))
        print(
            f"{row['backend']:<8} {row['algorithm']:<12} {row['keygen']:>10,.0f} {second:>12,.0f} {third:>14,.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
