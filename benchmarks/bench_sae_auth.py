"""CPU cost per request of what issue 16 adds to the delivery path, measured in-process (no network), so
the figures hold on a loaded machine where bench_delivery.py's round trips/s vary more than the cost.

* ``auth``: ``kms.api.identity.sae_from_scope`` (certificate -> registered, active SAE), with the
  registry's version check every ``sae_registry.refresh_ms`` = 100 ms (the default), and with the
  check pushed out to 1 h (what authentication cost before the version check, but for one clock
  comparison); the difference is the amortised cost of the version reads;
* ``version read``: one ``refresh_if_changed`` that reads the version (an unchanged registry);
* ``fair shares``: ``FairShares.admit`` for a Get key request with every rate and cap configured.

Usage::

    .venv/bin/python benchmarks/bench_sae_auth.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _per_call(fn: Callable[[], object], seconds: float) -> float:
    """Best of three runs of ``seconds`` each: microseconds of CPU per call."""
    best = float("inf")
    for _ in range(3):
        calls = 0
        t0 = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(1000):
                fn()
            calls += 1000
        best = min(best, (time.process_time() - t0) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)

    from kms.api.identity import sae_from_scope
    from kms.config import KmsSettings
    from kms.domain.delivery import KeyOrder
    from kms.domain.policy import Mode, PairPolicy
    from kms.provision.workdir import init_workdir, sae_credential_paths
    from kms.runtime.assembly import build_runtime
    from kms.service import registry as registry_service
    from kms.service.fair_share import FairShares
    from qkd_adapters.certificates import load_certificate

    with tempfile.TemporaryDirectory() as tmp:
        result = init_workdir(Path(tmp) / "kme", "KME-B", ["SAE-1", "SAE-2"], link_source=None)
        settings = KmsSettings.load(result.config_path)
        runtime = build_runtime(settings, sync_registry=False)
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = load_certificate(sae_credential_paths(Path(tmp) / "kme", "SAE-1")[0].read_bytes())
        scope = {"extensions": {"tls": {"client_cert_der": cert.public_bytes(Encoding.DER)}}}
        print(
            f"bench_sae_auth: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
            "CPU microseconds per call, best of 3"
        )
        auth = _per_call(lambda: sae_from_scope(scope, runtime), args.seconds)
        print(f"  auth, version check every {settings.sae_registry.refresh_ms} ms   {auth:8.2f} us")
        runtime.settings = settings.model_copy(
            update={"sae_registry": settings.sae_registry.model_copy(update={"refresh_ms": 5000})}
        )
        runtime.registry.next_check = time.monotonic() + 3600
        no_reads = _per_call(lambda: sae_from_scope(scope, runtime), args.seconds)
        print(f"  auth, no version read in the window     {no_reads:8.2f} us")

        def read_version() -> None:
            runtime.registry.next_check = 0.0
            registry_service.refresh_if_changed(runtime.db, runtime.registry, 0.1, list)

        read = _per_call(read_version, args.seconds / 4)
        print(f"  one version read (SQLite)               {read:8.2f} us  (once per process per 100 ms)")

        quotas = settings.quotas.model_copy(
            update={
                "sae_requests_per_second": 1e9,
                "sae_keys_per_second": 1e9,
                "sae_bits_per_second": 1e12,
                "pair_requests_per_second": 1e9,
                "pair_keys_per_second": 1e9,
                "pair_bits_per_second": 1e12,
                "max_reserved_keys_per_master": 10**9,
                "max_pool_share": 1.0,
            }
        )
        shares = FairShares.for_settings(settings.model_copy(update={"quotas": quotas}), runtime.db, 1)
        assert shares is not None
        master = runtime.registry.get("SAE-1")
        slave = runtime.registry.get("SAE-2")
        assert master is not None and slave is not None
        order = KeyOrder(master, slave, ["SAE-2"], 1, 256, PairPolicy(Mode.QKD, False, "ML-KEM-768"))
        admit = _per_call(lambda: shares.admit(order), args.seconds)
        print(f"  fair shares, all six rates and both caps {admit:8.2f} us")
        runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
