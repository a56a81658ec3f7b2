"""Key delivery throughput and latency of a real KME over mTLS on loopback (SQLite and PostgreSQL).

Two scenarios, each with ``--pairs`` concurrent master/slave SAE pairs; every pair loops
``master POST enc_keys -> slave POST dec_keys`` (the key_IDs of the first answer) and checks that the
slave received the master's key material:

* ``single``:  number=1, size=256 bits -> round trips/s, p50/p99 round-trip latency (ms);
* ``batched``: number=128 (and dec_keys of the 128 IDs)  -> keys/s.

The server is the real ``qkms serve`` child process (``tests.kme_harness.running_kme``) with the
random test key source and a large pre-filled pool; PostgreSQL is a throwaway server
(``tests.support.postgres.PostgresServer``). The load generator runs in a separate process: one
asyncio loop, one HTTP/1.1 keep-alive ``httpx.AsyncClient`` per SAE. A warm-up phase is excluded from
the figures. CPU use (in cores) of the client, the KME processes and PostgreSQL is measured over the
measurement window from /proc, since on a small machine they all share the same cores.

``--profile`` adds, after the measured runs, one extra run per scenario with py-spy attached to the
KME (all worker processes) and prints where server time goes; those figures are perturbed by
py-spy and not checked against the floors.

Usage::

    .venv/bin/python benchmarks/bench_delivery.py --backend both --duration 10
    .venv/bin/python benchmarks/bench_delivery.py --backend postgres --workers 1
    .venv/bin/python benchmarks/bench_delivery.py --backend sqlite --policy hybrid
    .venv/bin/python benchmarks/bench_delivery.py --backend sqlite --profile
    .venv/bin/python benchmarks/bench_delivery.py --backend both --metrics both --repeat 3

``--metrics on`` runs the KME with its operator listener and per-request instruments on (issue 15)
and scrapes ``/metrics`` every ``--scrape-seconds`` during the measurement; ``--metrics both``
alternates KMEs with metrics off and on, ``--repeat`` times, and prints the cost of metrics as the
drop in median throughput (floor: at most ``FLOOR_METRICS_COST`` = 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FLOOR_ROUND_TRIPS = 400.0  # single-key enc+dec round trips per second
FLOOR_KEYS = 20_000.0  # keys per second with number=128
FLOOR_P99_MS = 100.0  # p99 of the single-key round trip
FLOOR_METRICS_COST = 0.05  # metrics on may cost at most 5 % of round trips/s (issue 15)
KEY_BITS = 256
BATCH = 128
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------- client


@dataclass
class ClientSpec:
    base_url: str
    ca: str
    creds: dict[str, tuple[str, str]]
    pairs: list[tuple[str, str]]
    number: int
    warmup: float
    duration: float
    client: str = "aiohttp"


async def _pair_loop(
    spec: ClientSpec,
    clients: dict[str, Any],
    master: str,
    slave: str,
    t_start: float,
    t_end: float,
    latencies: list[float],
    errors: collections.Counter[str],
) -> None:
    m, s = clients[master], clients[slave]
    enc_url = f"/api/v1/keys/{slave}/enc_keys"
    dec_url = f"/api/v1/keys/{master}/dec_keys"
    enc_body = json.dumps({"number": spec.number, "size": KEY_BITS}).encode()
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end:
            return
        try:
            status1, body1 = await m.post(enc_url, enc_body)
            if status1 != 200:
                errors[f"enc {status1}"] += 1
                await asyncio.sleep(0.01)
                continue
            keys = body1["keys"]
            dec_body = json.dumps({"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}).encode()
            status2, body2 = await s.post(dec_url, dec_body)
        except Exception as exc:  # count transport failures rather than abort the run
            errors[type(exc).__name__] += 1
            await asyncio.sleep(0.01)
            continue
        t1 = time.perf_counter()
        if status2 != 200:
            errors[f"dec {status2}"] += 1
            continue
        got = {k["key_ID"]: k["key"] for k in body2["keys"]}
        if len(keys) != spec.number or any(got.get(k["key_ID"]) != k["key"] for k in keys):
            errors["key mismatch"] += 1
            continue
        if t_start <= t0:
            latencies.append(t1 - t0)


class _HttpxSae:
    """One SAE's keep-alive connection through httpx (the product's client library)."""

    def __init__(self, base_url: str, ctx: Any) -> None:
        import httpx

        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._c = httpx.AsyncClient(base_url=base_url, verify=ctx, limits=limits, timeout=30.0)

    async def post(self, url: str, body: bytes) -> tuple[int, Any]:
        r = await self._c.post(url, content=body, headers={"content-type": "application/json"})
        return r.status_code, r.json()

    async def aclose(self) -> None:
        await self._c.aclose()


class _AiohttpSae:
    """The same through aiohttp, whose per-request CPU is a fraction of httpx's: on a 2-core machine the
    load generator shares the cores with the server, and a lighter client measures the server better."""

    def __init__(self, base_url: str, ctx: Any) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=1, ssl=ctx)
        self._c = aiohttp.ClientSession(base_url=base_url, connector=connector)

    async def post(self, url: str, body: bytes) -> tuple[int, Any]:
        async with self._c.post(url, data=body, headers={"content-type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)

    async def aclose(self) -> None:
        await self._c.close()


async def _run_client(spec: ClientSpec) -> dict[str, Any]:
    from kms.lab.launcher import client_ssl_context

    kind = _AiohttpSae if spec.client == "aiohttp" else _HttpxSae
    clients = {
        sae: kind(spec.base_url, client_ssl_context(Path(spec.ca), Path(cert), Path(key)))
        for sae, (cert, key) in spec.creds.items()
    }
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    now = time.perf_counter()
    t_start = now + spec.warmup
    t_end = t_start + spec.duration

    async def mark() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        print("MEASURE_START", flush=True)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        print("MEASURE_END", flush=True)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        return ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime

    try:
        marker = asyncio.create_task(mark())
        await asyncio.gather(
            *(_pair_loop(spec, clients, m, s, t_start, t_end, latencies, errors) for m, s in spec.pairs)
        )
        user, system = await marker
    finally:
        for c in clients.values():
            await c.aclose()
    return {
        "latencies": latencies,
        "errors": dict(errors),
        "client_cpu_s": user + system,
    }


def client_main(spec_path: str) -> None:
    raw = json.loads(Path(spec_path).read_text())
    raw["creds"] = {k: tuple(v) for k, v in raw["creds"].items()}
    raw["pairs"] = [tuple(p) for p in raw["pairs"]]
    spec = ClientSpec(**raw)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner(_run_client(spec))
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- server side


def _proc_cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _stolen_ticks() -> int:
    """Host-wide CPU time the hypervisor gave to other guests (``steal`` in /proc/stat), so that a
    slow run on a shared VM can be told apart from a slow KME."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


def _pids(pred_pgid: int | None = None, parent: int | None = None) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, pgid = int(fields[1]), int(fields[2])
        if (pred_pgid is not None and pgid == pred_pgid) or (parent is not None and ppid == parent):
            out.append(int(entry))
    return out


@dataclass
class CpuGroup:
    """CPU seconds of a set of processes (re-discovered at each sample, so forked workers count)."""

    name: str
    pgid: int | None = None
    root: int | None = None

    def pids(self) -> list[int]:
        if self.pgid is not None:
            return _pids(pred_pgid=self.pgid)
        assert self.root is not None
        return [self.root, *_pids(parent=self.root)]

    def sample(self) -> dict[int, int]:
        return {pid: _proc_cpu_ticks(pid) for pid in self.pids()}

    @staticmethod
    def seconds(before: dict[int, int], after: dict[int, int]) -> float:
        return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK


@dataclass
class Figures:
    backend: str
    workers: int
    scenario: str
    number: int
    duration: float
    round_trips: int
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    client_cores: float
    server_cores: float
    pg_cores: float | None
    stolen_cores: float = 0.0  # CPU the hypervisor gave to other guests during the window
    profiled: bool = False
    metrics: str = "off"  # the operator listener and its instruments (--metrics)

    @property
    def rt_per_s(self) -> float:
        return self.round_trips / self.duration

    @property
    def keys_per_s(self) -> float:
        return self.rt_per_s * self.number

    def checks(self) -> list[tuple[str, bool]]:
        out = []
        if self.number == 1:
            out.append((f"round trips/s >= {FLOOR_ROUND_TRIPS:.0f}", self.rt_per_s >= FLOOR_ROUND_TRIPS))
            out.append((f"p99 < {FLOOR_P99_MS:.0f} ms", self.p99_ms < FLOOR_P99_MS))
        else:
            out.append((f"keys/s >= {FLOOR_KEYS:,.0f}", self.keys_per_s >= FLOOR_KEYS))
        out.append(("no errors", not self.errors))
        return out


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    results: list[Figures] = field(default_factory=list)
    profiles: list[tuple[str, Path]] = field(default_factory=list)

    def saes(self) -> tuple[list[str], list[tuple[str, str]]]:
        pairs = [(f"BM-M{i:03d}", f"BM-S{i:03d}") for i in range(self.args.pairs)]
        return [s for p in pairs for s in p], pairs

    def run_backend(self, backend: str) -> None:
        modes = ["off", "on"] if self.args.metrics == "both" else [self.args.metrics]
        repeat = self.args.repeat if self.args.metrics == "both" else 1
        for _ in range(repeat):  # alternate: load on the shared machine drifts over minutes
            for mode in modes:
                with _metrics_env(mode) as scrape_url:
                    self.run_kme(
                        backend, mode, scrape_url, 1 if self.args.metrics == "both" else self.args.repeat
                    )

    def run_kme(self, backend: str, metrics: str, scrape_url: str | None, repeat: int) -> None:
        from tests.kme_harness import running_kme
        from tests.support.postgres import PostgresServer

        workers = self.args.workers
        names, pairs = self.saes()
        policy = {"mode": self.args.policy, "pqc_fallback": False, "kem": "ML-KEM-768"}
        pool = {"max_pool_bits": self.args.pool_mbit * 1024 * 1024, "storage_block_bits": 65536}
        # Fill the pool completely, so the filler is idle when the run starts and afterwards only tops
        # up what the run consumes (the steady state of a KME fed faster than it serves).
        fill_keys = pool["max_pool_bits"] // KEY_BITS
        with contextlib.ExitStack() as stack:
            url: str | None = None
            pg: CpuGroup | None = None
            if backend == "postgres":
                stats = {"shared_preload_libraries": "pg_stat_statements"} if self.args.pg_stats else {}
                if stats:
                    stats["pg_stat_statements.track_planning"] = "on"
                server = PostgresServer(extra_settings=stats)
                server.start()
                stack.callback(server.stop)
                url = server.create_database("qkms_bench")
                pm_pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
                pg = CpuGroup("postgres", root=pm_pid)
            workdir = self.tmp / f"kme-{backend}-{time.monotonic_ns()}"
            t0 = time.monotonic()
            kme = stack.enter_context(
                running_kme(
                    workdir,
                    url,
                    saes=tuple(names),
                    pool=pool,
                    fill_keys=fill_keys,
                    workers=workers,
                    policy=policy,
                )
            )
            assert kme.process.proc is not None
            print(
                f"[{backend}] KME up (workers={workers}, policy {self.args.policy}, audit on, metrics {metrics}), pool pre-filled to {fill_keys:,} keys "
                f"in {time.monotonic() - t0:.1f}s",
                flush=True,
            )
            time.sleep(1.0)
            kme_cpu = CpuGroup("kme", pgid=kme.process.proc.pid)
            creds = {
                n: [str(workdir / "pki" / "sae" / f"{n}.pem"), str(workdir / "pki" / "sae" / f"{n}.key")]
                for n in names
            }
            base = {
                "base_url": kme.process.base_url,
                "ca": str(kme.ca),
                "creds": creds,
                "pairs": pairs,
                "warmup": self.args.warmup,
                "duration": self.args.duration,
                "client": self.args.client,
            }
            scenarios = [("single", 1), ("batched", BATCH)]
            stats_url = url if backend == "postgres" and self.args.pg_stats else None
            if stats_url:
                _pg_stats(stats_url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            if scrape_url is not None:
                stack.enter_context(_scraping(scrape_url, self.args.scrape_seconds, kme.ca))
            for _ in range(repeat):
                for scenario, number in scenarios:
                    if stats_url:
                        _pg_stats(stats_url, "SELECT pg_stat_statements_reset()")
                    fig = self.run_client(backend, workers, scenario, {**base, "number": number}, kme_cpu, pg)
                    fig.metrics = metrics
                    self.results.append(fig)
                    _print_row(fig)
                    if stats_url:
                        print(_pg_top_statements(stats_url, fig), flush=True)
            if self.args.profile:
                for scenario, number in scenarios:
                    out = self.args.profile_dir / f"{backend}-w{workers}-{scenario}.txt"
                    fig = self.run_client(
                        backend, workers, scenario, {**base, "number": number}, kme_cpu, pg, profile_to=out
                    )
                    fig.profiled = True
                    fig.metrics = metrics
                    self.results.append(fig)
                    _print_row(fig)
                    self.profiles.append((f"{backend} workers={workers} {scenario}", out))

    def run_client(
        self,
        backend: str,
        workers: int,
        scenario: str,
        spec: dict[str, Any],
        kme_cpu: CpuGroup,
        pg: CpuGroup | None,
        profile_to: Path | None = None,
    ) -> Figures:
        spec_path = self.tmp / "client-spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--client-spec", str(spec_path)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert child.stdout is not None
        result: dict[str, Any] | None = None
        spy: subprocess.Popen[bytes] | None = None
        kme0: dict[int, int] = {}
        pg0: dict[int, int] = {}
        kme_s = pg_s = 0.0
        steal0 = steal = 0
        for line in child.stdout:
            if line.startswith("MEASURE_START"):
                kme0, pg0 = kme_cpu.sample(), pg.sample() if pg else {}
                steal0 = _stolen_ticks()
                if profile_to is not None:
                    spy = _start_py_spy(kme_cpu, profile_to, spec["duration"])
            elif line.startswith("MEASURE_END"):
                kme_s = CpuGroup.seconds(kme0, kme_cpu.sample())
                pg_s = CpuGroup.seconds(pg0, pg.sample()) if pg else 0.0
                steal = _stolen_ticks() - steal0
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        if child.wait() != 0 or result is None:
            raise RuntimeError(f"load generator failed (exit {child.returncode})")
        if spy is not None:
            spy.wait(timeout=60)
        lat = sorted(result["latencies"])
        dur = float(spec["duration"])
        return Figures(
            backend=backend,
            workers=workers,
            scenario=scenario,
            number=int(spec["number"]),
            duration=dur,
            round_trips=len(lat),
            p50_ms=_percentile(lat, 50) * 1000,
            p99_ms=_percentile(lat, 99) * 1000,
            errors=result["errors"],
            client_cores=result["client_cpu_s"] / dur,
            server_cores=kme_s / dur,
            pg_cores=pg_s / dur if pg else None,
            stolen_cores=steal / CLK_TCK / dur,
        )


@contextlib.contextmanager
def _metrics_env(mode: str) -> Iterator[str | None]:
    """``on``: the KME's operator listener enabled (through ``QKMS_OPERATOR__*``, which the
    ``qkms serve`` child inherits), metrics unauthenticated on a free loopback port; yields the
    ``/metrics`` URL. ``off``: the defaults (no listener, no instruments)."""
    if mode == "off":
        yield None
        return
    from kms.lab.launcher import free_port

    port = free_port()
    env = {
        "QKMS_OPERATOR__ENABLED": "true",
        "QKMS_OPERATOR__PORT": str(port),
        "QKMS_OPERATOR__UNAUTHENTICATED_METRICS": "true",
    }
    os.environ.update(env)
    try:
        yield f"https://127.0.0.1:{port}/metrics"
    finally:
        for name in env:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _scraping(url: str, every: float, ca: Path) -> Iterator[None]:
    """Scrape ``url`` every ``every`` seconds, as Prometheus would, until the block ends."""
    import threading

    import httpx

    from kms.lab.launcher import client_ssl_context

    stop = threading.Event()
    failures: list[str] = []

    def loop() -> None:
        with httpx.Client(verify=client_ssl_context(ca, None, None), timeout=10) as client:
            while not stop.wait(every):
                try:
                    if client.get(url).status_code != 200:
                        failures.append("status")
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)

    thread = threading.Thread(target=loop, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        if failures:
            print(f"    scrapes failed: {failures[:5]} ({len(failures)} in all)", flush=True)


def metrics_cost(results: list[Figures]) -> list[tuple[str, float, float, float, float, float]]:
    """Per backend and scenario: median throughput off and on and the relative cost of on; and the
    KME's CPU per round trip (ms) off and on, which a loaded machine disturbs less than throughput."""
    rows = []
    for backend in sorted({f.backend for f in results}):
        for scenario in ("single", "batched"):
            runs = {
                mode: [f for f in results if (f.backend, f.scenario, f.metrics) == (backend, scenario, mode)]
                for mode in ("off", "on")
            }
            if runs["off"] and runs["on"]:
                rate = {m: statistics.median(f.rt_per_s for f in runs[m]) for m in runs}
                cpu = {
                    m: statistics.median(f.server_cores / f.rt_per_s * 1000 for f in runs[m] if f.rt_per_s)
                    for m in runs
                }
                cost = 1 - rate["on"] / rate["off"]
                rows.append((f"{backend} {scenario}", rate["off"], rate["on"], cost, cpu["off"], cpu["on"]))
    return rows


def _pg_stats(url: str, sql: str) -> list[Any]:
    import psycopg

    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as conn:
        cur = conn.execute(sql)
        return list(cur.fetchall()) if cur.description else []


def _pg_top_statements(url: str, fig: Figures, top: int = 12) -> str:
    """PostgreSQL's own time per statement (pg_stat_statements), per round trip of the run."""
    rows = _pg_stats(
        url,
        "SELECT calls, total_plan_time, total_exec_time, query FROM pg_stat_statements "
        "WHERE query NOT LIKE '%pg_stat_statements%' "
        "ORDER BY total_plan_time + total_exec_time DESC",
    )
    n = max(fig.round_trips, 1)
    total = sum(r[1] + r[2] for r in rows)
    lines = [f"  pg_stat_statements: {total / n:.3f} ms of PostgreSQL time per round trip (plan + exec)"]
    lines.append("    calls/rt  plan ms/rt  exec ms/rt  statement")
    for calls, plan, exe, query in rows[:top]:
        text = " ".join(str(query).split())[:110]
        lines.append(f"    {calls / n:8.2f}  {plan / n:10.3f}  {exe / n:10.3f}  {text}")
    return "\n".join(lines)


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(pct) - 1]


# ----------------------------------------------------------------------------------------- profiling


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy (in the dev extras): bash scripts/bootstrap.sh")
    return found


def _start_py_spy(kme: CpuGroup, out: Path, duration: float) -> subprocess.Popen[bytes]:
    out.parent.mkdir(parents=True, exist_ok=True)
    leader = kme.pgid
    assert leader is not None
    cmd = [_py_spy(), "record", "--pid", str(leader), "--subprocesses", "--rate", "200"]
    cmd += [
        "--duration",
        str(max(1, int(duration))),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (label, substring of the file path) -- the first match walking from the leaf frame upward wins.
PACKAGES: list[tuple[str, str]] = [
    ("TLS (ssl / asyncio sslproto)", "/ssl.py"),
    ("TLS (ssl / asyncio sslproto)", "sslproto.py"),
    ("AES-GCM envelope (kms.crypto + cryptography)", "kms/crypto/"),
    ("AES-GCM envelope (kms.crypto + cryptography)", "cryptography/"),
    ("SQLite driver (sqlite3)", "sqlite3/"),
    ("PostgreSQL driver (psycopg)", "psycopg"),
    ("SQLAlchemy", "sqlalchemy/"),
    ("pydantic", "pydantic"),
    ("json", "json/"),
    ("FastAPI", "fastapi/"),
    ("Starlette", "starlette/"),
    ("anyio (thread hops)", "anyio/"),
    ("uvicorn / httptools", "uvicorn/"),
    ("structlog / logging", "structlog/"),
    ("structlog / logging", "logging/"),
    ("uuid", "uuid.py"),
    ("datetime", "datetime"),
    ("kms.storage (pool SQL building)", "kms/storage/"),
    ("kms.domain", "kms/domain/"),
    ("kms.service", "kms/service/"),
    ("kms.api", "kms/api/"),
    ("kms.runtime.filler (pool filler)", "kms/runtime/filler.py"),
    ("qkd_adapters (random source)", "qkd_adapters/"),
    ("asyncio / uvloop event loop", "asyncio/"),
    ("threading", "threading.py"),
]

INCLUSIVE = [
    ("pool filler thread (ingest)", "kms/runtime/filler.py"),
    ("SaeAuthMiddleware (cert -> SAE)", "kms/api/identity.py"),
    ("get_keys (enc_keys service)", "get_keys (kms/service/gateway.py"),
    ("  Get key unit (_reserve)", "_reserve (kms/service/get_keys.py"),
    ("get_keys_with_ids (dec_keys service)", "get_keys_with_ids (kms/service/gateway.py"),
    ("  reserve_keys", "reserve_keys (kms/storage/pool_repository.py"),
    ("  load_keys_for_update", "load_keys_for_update (kms/storage/pool_repository.py"),
    ("  mark_served", "mark_served (kms/storage/pool_repository.py"),
    ("  EventBatch.flush (lifecycle events insert)", "flush (kms/storage/pool_repository.py"),
    ("  Envelope seal/open (AES-GCM)", "kms/crypto/envelope.py"),
    ("  Database.write (BEGIN/COMMIT)", "write (kms/storage/database.py"),
    ("request body parsing/validation (FastAPI)", "solve_dependencies"),
    ("key_container (response JSON + base64)", "key_container (kms/api/routes/keys.py"),
    ("SQLAlchemy compile", "_compiler"),
]


def analyse_profile(path: Path, top: int = 20) -> str:
    """Summarise py-spy's raw (folded) output: self time by package, inclusive time of key functions."""
    total = 0
    by_pkg: collections.Counter[str] = collections.Counter()
    by_func: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_s = raw.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        label = "other"
        for frame in reversed(frames):
            hit = next((lab for lab, needle in PACKAGES if needle in frame), None)
            if hit is not None:
                label = hit
                break
        by_pkg[label] += count
        by_func[_short(frames[-1])] += count
        for lab, needle in INCLUSIVE:
            if any(needle in f for f in frames):
                incl[lab] += count
    if not total:
        return f"  (no samples in {path})\n"
    lines = [f"  {total} samples (all KME threads on CPU); self time by package:"]
    lines += [f"    {100 * n / total:5.1f}%  {lab}" for lab, n in by_pkg.most_common()]
    lines.append("  inclusive time of selected code paths:")
    lines += [f"    {100 * incl[lab] / total:5.1f}%  {lab}" for lab, _ in INCLUSIVE]
    lines.append(f"  top {top} leaf functions (self time):")
    lines += [f"    {100 * n / total:5.1f}%  {fn}" for fn, n in by_func.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    m = FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()[:100]
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({file}:{m.group('line') or '?'})"


# ----------------------------------------------------------------------------------------- output


HEADER = (
    f"{'backend':<9}{'wk':>3} {'scenario':<8}{'rt/s':>9}{'keys/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
    f"{'errors':>8}{'cli cpu':>8}{'kme cpu':>8}{'pg cpu':>7}{'stolen':>7}{'metrics':>8}  verdict"
)


def _print_row(f: Figures) -> None:
    verdict = "PROFILED (not judged)" if f.profiled else _verdict(f)
    pg = f"{f.pg_cores:7.2f}" if f.pg_cores is not None else f"{'-':>7}"
    print(
        f"{f.backend:<9}{f.workers:>3} {f.scenario:<8}{f.rt_per_s:9.0f}{f.keys_per_s:10.0f}"
        f"{f.p50_ms:8.1f}{f.p99_ms:8.1f}{sum(f.errors.values()):8d}{f.client_cores:8.2f}"
        f"{f.server_cores:8.2f}{pg}{f.stolen_cores:7.2f}{f.metrics:>8}  {verdict}",
        flush=True,
    )
    if f.errors:
        print(f"    errors: {f.errors}", flush=True)


def _verdict(f: Figures) -> str:
    checks = f.checks()
    failed = [name for name, ok in checks if not ok]
    return "PASS" if not failed else "FAIL (" + "; ".join(failed) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each scenario")
    parser.add_argument("--pairs", type=int, default=16, help="concurrent master/slave SAE pairs")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="API processes (qkms serve --workers) sharing the database; 2 = one per core here",
    )
    parser.add_argument(
        "--policy",
        choices=["qkd", "hybrid"],
        default="qkd",
        help="key policy of every pair (audit is always on)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this many times")
    parser.add_argument("--pool-mbit", type=int, default=128, help="max_pool_bits in Mibit (pre-filled)")
    parser.add_argument("--profile", action="store_true", help="extra runs with py-spy on the KME")
    parser.add_argument(
        "--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "qkms-bench-profile"
    )
    parser.add_argument(
        "--client", choices=["aiohttp", "httpx"], default="aiohttp", help="load generator's HTTP client"
    )
    parser.add_argument(
        "--pg-stats",
        action="store_true",
        help="PostgreSQL only: print its time per statement (pg_stat_statements) after each scenario",
    )
    parser.add_argument(
        "--metrics",
        choices=["off", "on", "both"],
        default="off",
        help="the KME's operator listener and instruments; 'both' alternates KMEs off and on, --repeat times",
    )
    parser.add_argument("--scrape-seconds", type=float, default=5.0, help="with metrics on: scrape interval")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--client-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_spec:
        client_main(args.client_spec)
        return 0
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print(
        f"bench_delivery: {args.pairs} pairs, {KEY_BITS}-bit keys, batch {BATCH}, warm-up {args.warmup:g}s, "
        f"measure {args.duration:g}s, {os.cpu_count()} CPUs; cpu columns are cores busy",
        flush=True,
    )
    with _tmpdir() as tmp:
        bench = Bench(args, tmp)
        print(HEADER, flush=True)
        for backend in backends:
            bench.run_backend(backend)
    print("\nSummary vs floors (>= 400 round trips/s, p99 < 100 ms, >= 20,000 keys/s batched):")
    print(HEADER)
    judged = [f for f in bench.results if not f.profiled]
    for f in judged:
        _print_row(f)
    for title, path in bench.profiles:
        print(f"\nProfile of the KME, {title} ({path}):")
        print(analyse_profile(path), end="")
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**f.__dict__, "rt_per_s": f.rt_per_s, "keys_per_s": f.keys_per_s} for f in bench.results],
                indent=2,
            )
        )
    ok = bool(judged) and all(ok for f in judged for _, ok in f.checks())
    cost = metrics_cost(judged)
    if cost:
        print(f"\nCost of metrics (median round trips/s off -> on; floor: <= {FLOOR_METRICS_COST:.0%}):")
        for name, m_off, m_on, rel, cpu_off, cpu_on in cost:
            verdict = "PASS" if rel <= FLOOR_METRICS_COST else "FAIL"
            print(
                f"  {name:<18}{m_off:9.0f} -> {m_on:9.0f}  cost {rel:+.1%}  {verdict}"
                f"   (KME CPU per round trip {cpu_off:.2f} -> {cpu_on:.2f} ms, {cpu_on / cpu_off - 1:+.1%})"
            )
        ok = ok and all(row[3] <= FLOOR_METRICS_COST for row in cost)
    print("\nOVERALL:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    # Under /tmp so the postgres OS user can traverse it when we run as root.
    with tempfile.TemporaryDirectory(prefix="qkms-bench-", dir="/tmp") as d:
        yield Path(d)


if __name__ == "__main__":
    raise SystemExit(main())
