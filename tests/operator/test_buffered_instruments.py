"""Buffered instruments (``kms.telemetry.buffered``, D-32): what is flushed equals the events, counted
from many threads at once; a buffered histogram exports what prometheus-client's own ``observe``
would (this pins the internals the flush relies on); and in a two-worker KME whose workers flush
only when scraped or when they stop, the scrape is the sum of both, a stopped worker's included."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kms.telemetry.buffered import BufferedCounter, BufferedHistogram, Buffers
from kms.telemetry.metrics import LATENCY_BUCKETS
from tests.operator.harness import SAES, OperatorKme, child_pids, operator_kme
from tests.operator.test_operator_listener import samples


def test_flushed_counter_equals_the_events_of_every_thread() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_events", "events", registry=registry)
    buffers = Buffers(every=3600)
    buffered = buffers.track(BufferedCounter(counter))
    threads, per_thread = 4, 20_000
    done = threading.Event()

    def count() -> None:
        for _ in range(per_thread):
            buffered.inc()
        buffered.inc(2.5)

    def flush_meanwhile() -> None:
        while not done.is_set():
            buffers.flush()

    flusher = threading.Thread(target=flush_meanwhile)
    flusher.start()
    workers = [threading.Thread(target=count) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    flusher.join()
    buffers.flush()
    assert registry.get_sample_value("t_events_total") == threads * (per_thread + 2.5)
    with pytest.raises(ValueError):
        buffered.inc(-1)


def test_buffered_histogram_exports_what_observe_would() -> None:
    values = [0.0, 0.0005, 0.0007, 0.001, 0.003, 0.0049999, 0.05, 1.0, 9.99, 10.0, 12.5, 250.0, 1e-9]
    values += [i / 997 for i in range(400)]
    direct_registry, buffered_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("t_seconds", "t", ["k"], buckets=LATENCY_BUCKETS, registry=direct_registry)
    reference = Histogram("t_seconds", "t", ["k"], buckets=LATENCY_BUCKETS, registry=buffered_registry)
    buffers = Buffers(every=3600)
    buffered = buffers.track(BufferedHistogram(reference.labels("a")))
    for i, v in enumerate(values):
        direct.labels("a").observe(v)
        buffered.observe(v)
        if i % 150 == 0:
            buffers.flush()  # several flushes add up like one
    buffers.flush()

    def exported(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {k: v for k, v in samples(generate_latest(registry).decode()).items() if "created" not in k[0]}

    want, got = exported(direct_registry), exported(buffered_registry)
    assert got.keys() == want.keys()
    assert got.pop(("t_seconds_sum", (("k", "a"),))) == pytest.approx(
        want.pop(("t_seconds_sum", (("k", "a"),)))
    )
    assert got == want  # every bucket and the count
    assert want[("t_seconds_count", (("k", "a"),))] == len(values)


def _workers(kme: OperatorKme) -> list[int]:
    assert kme.process.proc is not None
    return [pid for pid, cmdline in child_pids(kme.process.proc.pid) if b"spawn_main" in cmdline]


def _listening_pid(pids: list[int], port: int) -> int:
    """Which of ``pids`` holds the listening socket of ``port`` (127.0.0.1)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker listens on {port}")


def test_two_workers_flush_when_scraped_and_when_they_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No flush by time here: what the scrape shows was flushed by the scrape (the serving worker)
    or by the other worker's stop (the one not serving the port, which no scrape flushes)."""
    monkeypatch.setenv("QKMS_METRICS_FLUSH_SECONDS", "3600")
    name, labels = "qkms_api_requests_total", (("endpoint", "status"), ("status", "200"))

    def scrape(kme: OperatorKme) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        deadline = time.monotonic() + 20
        while True:  # after a stop, the other worker may take the port over (every 2 s)
            try:
                with kme.operator(kme.token) as client:
                    resp = client.get("/metrics")
                if resp.status_code == 200:
                    return samples(resp.text)
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.3)

    with operator_kme(tmp_path / "kme", workers=2, link_source=None) as kme:
        deadline = time.monotonic() + 30
        while len(_workers(kme)) < 2:
            assert time.monotonic() < deadline, "two workers never started"
            time.sleep(0.2)
        before = scrape(kme).get((name, labels), 0.0)
        for _ in range(24):  # a fresh connection each: the kernel spreads them over both workers
            with kme.sae(SAES[0]) as client:
                assert client.get(f"/api/v1/keys/{SAES[1]}/status").status_code == 200
        time.sleep(0.2)  # a request is counted once its answer has gone out
        first = scrape(kme)[(name, labels)]
        assert first - before <= 24
        pids = _workers(kme)
        serving = _listening_pid(pids, kme.settings.operator.port)
        stopped = next(pid for pid in pids if pid != serving)
        os.kill(stopped, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{stopped}") or len(_workers(kme)) < 2:
            state = (
                Path(f"/proc/{stopped}/stat").read_text() if os.path.exists(f"/proc/{stopped}") else "gone"
            )
            assert time.monotonic() < deadline, (
                f"worker not replaced: {state} {_workers(kme)}\n{kme.process.log_tail(30)}"
            )
            time.sleep(0.2)
        after = scrape(kme)[(name, labels)]
        # The stopped worker flushed as it stopped, the serving one as it was scraped.
        assert after - before == 24
