"""CPU cost per API request of the request ID and the ``request`` log line (``kms.api.request_log``,
DECISIONS.md D-37), measured in process, so a loaded machine disturbs it less than a throughput run.

The middleware wraps a trivial ASGI app that sets the caller the way ``kms.api.identity`` does and
answers 200; structlog is configured as ``qkms serve`` configures it (``kms.runtime.logs``) and writes
to a real file. Variants: no middleware (the floor), the middleware with request lines off (request
ID and header only), JSON lines (the default when not on a terminal), console lines. CPU time
(``time.process_time``), median of ``--repeat`` runs of ``--requests`` requests each.

Usage::

    .venv/bin/python benchmarks/bench_request_log.py
    .venv/bin/python benchmarks/bench_request_log.py --requests 50000 --repeat 7

Relate the figures to ``benchmarks/bench_delivery.py``'s KME CPU per round trip (two requests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from structlog.contextvars import bind_contextvars  # noqa: E402

from kms.api.request_log import RequestLog, log_fields  # noqa: E402
from kms.runtime.logs import configure_logging  # noqa: E402

VARIANTS = ("no middleware", "request lines off", "JSON lines", "console lines")
BODY = b'{"keys":[]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def answer(scope: Any, receive: Any, send: Any) -> None:
    """What the app does for the log line: name the caller, answer 200."""
    fields = log_fields(scope)
    if fields is not None:
        fields["sae_id"] = "SAE-M"
    bind_contextvars(sae_id="SAE-M")
    await send({"type": "http.response.start", "status": 200, "headers": list(HEADERS)})
    await send({"type": "http.response.body", "body": BODY})


async def drive(app: Any, n: int) -> float:
    """CPU seconds per request over ``n`` requests, each in its own task as uvicorn runs them."""
    scope_headers = [(b"content-type", b"application/json"), (b"x-request-id", b"bench-0001")]

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: Any) -> None:
        return None

    async def one() -> None:
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/api/v1/keys/SAE-S/enc_keys",
            "headers": scope_headers,
        }
        await app(scope, receive, send)

    started = time.process_time()
    for _ in range(n):
        await asyncio.get_running_loop().create_task(one())
    return (time.process_time() - started) / n


def run(variant: str, n: int, repeat: int, log_file: Path) -> float:
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = os.dup(2)
    os.dup2(fd, 2)  # stderr to a file, as under a service manager: not a terminal
    try:
        configure_logging("info", "console" if variant == "console lines" else "json")
        app: Any = answer
        if variant != "no middleware":
            app = RequestLog(answer, enabled=variant != "request lines off")
        times = [asyncio.run(drive(app, n)) for _ in range(repeat)]
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a variant, in a fresh process
    parser.add_argument("--log-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(run(args.one, args.requests, args.repeat, args.log_file))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="qkms-bench-log-") as tmp:
        log_file = Path(tmp) / "kme.log"
        for variant in VARIANTS:  # each in its own process: structlog caches its loggers on first use
            cmd = [sys.executable, __file__, "--one", variant, "--log-file", str(log_file)]
            cmd += ["--requests", str(args.requests), "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[variant] = float(done.stdout.strip().splitlines()[-1])
        size = log_file.stat().st_size
    floor = results["no middleware"]
    load = os.getloadavg()
    print(f"bench_request_log: {args.requests} requests x {args.repeat}, load {load[0]:.2f} {load[1]:.2f}")
    for v in VARIANTS:
        print(
            f"  {v:<20}{results[v] * 1e6:8.1f} us CPU per request   (+{(results[v] - floor) * 1e6:5.1f} us)"
        )
    lines = args.requests * args.repeat * 2  # JSON and console lines
    print(f"  log written: {size / lines:.0f} bytes per line on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
