"""The KME's per-process instruments and how they are collected across processes.

Under ``qkms serve`` every process writes its counters to files in one directory
(prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``) so that the one process serving
the operator listener exports the sum over all worker processes, dead ones included (counters stay
monotonic across a worker restart). Events are buffered in the process and folded into those files
every fraction of a second, before each scrape and when the process stops (``kms.telemetry.buffered``),
so counting costs a request well under a microsecond. Without that directory (an app built inside a test) the
instruments live in a private registry of this process. Figures that describe shared state (pool
levels, keys by state) are not instruments: they are read from the database at scrape time
(``kms.service.operator_metrics``), so every process would report the same one.

Labels never carry key material or key IDs. Their values are bounded by configuration (link IDs,
SAE pairs) or by a fixed vocabulary here (endpoints, outcomes, alarm kinds).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from kms.telemetry.buffered import BufferedFamily, BufferedHistogram, Buffers

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry, Counter, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: a key request takes milliseconds; a stuck one seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_KIND = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
MAX_ALARM_KINDS = 32  # distinct alarm kinds per process before the rest count as "other"
# The [quotas] keys a fair-share refusal is counted under (kms.service.fair_share maps each rule).
QUOTA_LIMITS = (
    "sae_requests_per_second",
    "sae_keys_per_second",
    "sae_bits_per_second",
    "pair_requests_per_second",
    "pair_keys_per_second",
    "pair_bits_per_second",
    "max_reserved_keys_per_master",
    "max_pool_share",
)


class Instruments:
    """Every instrument a KME process updates. Built once per process (:func:`instruments`). Each is
    seen through process-local buffers (:mod:`kms.telemetry.buffered`): ``labels(...).inc()`` and
    ``observe()`` cost an append; :meth:`flush` folds them into prometheus-client's values."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Histogram

        self.buffers = Buffers()
        buffers = self.buffers

        def counter(metric: Counter) -> BufferedFamily:
            return BufferedFamily(metric, buffers, histogram=False)

        def histogram(metric: Histogram) -> BufferedFamily:
            return BufferedFamily(metric, buffers, histogram=True)

        self._api_and_database(registry, counter, histogram)
        self.link_blocks = counter(
            Counter(
                "qkms_link_blocks",
                "Key blocks a link's source produced, by outcome (delivered, aborted) and abort reason.",
                ["link", "outcome", "reason"],
                registry=registry,
            )
        )
        self.link_alarms = counter(
            Counter(
                "qkms_link_alarms",
                "Link alarms recorded, by kind (the alarm's code).",
                ["link", "kind"],
                registry=registry,
            )
        )
        self.peer_requests = counter(
            Counter(
                "qkms_peer_requests",
                "Messages this KME sent to adjacent KMEs, by peer, kind (ledger, relay, blocks, audit,"
                " topology, session, other) and outcome (ok, refused, unavailable, uncertain).",
                ["peer", "kind", "outcome"],
                registry=registry,
            )
        )
        self.peer_seconds = histogram(
            Histogram(
                "qkms_peer_round_trip_seconds",
                "Round trip of a message to an adjacent KME, answered or not, by peer and kind.",
                ["peer", "kind"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            )
        )
        self.quota_refusals = counter(
            Counter(
                "qkms_quota_refusals",
                "Get key requests refused (503) by a fair-share limit, by the limit's [quotas] key.",
                ["limit"],
                registry=registry,
            )
        )
        for limit in QUOTA_LIMITS:  # every series from the start, so rate() sees the first refusal
            self.quota_refusals.labels(limit)
        self._kinds: set[str] = set()
        self._lock = threading.Lock()

    def _api_and_database(
        self,
        registry: CollectorRegistry | None,
        counter: Callable[[Counter], BufferedFamily],
        histogram: Callable[[Histogram], BufferedFamily],
    ) -> None:
        """The key path's instruments: API requests and their latency, database transactions."""
        from prometheus_client import Counter, Histogram

        self.api_requests = counter(
            Counter(
                "qkms_api_requests",
                "ETSI API requests answered, by endpoint and HTTP status.",
                ["endpoint", "status"],
                registry=registry,
            )
        )
        self.api_seconds = histogram(
            Histogram(
                "qkms_api_request_duration_seconds",
                "Time from a request's arrival to the end of its answer, by endpoint.",
                ["endpoint"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            )
        )
        db_seconds = Histogram(
            "qkms_db_transaction_duration_seconds",
            "Database transactions (a connection's checkout to its checkin: one transaction each).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.db_seconds = BufferedHistogram(db_seconds)
        self.buffers.track(self.db_seconds)

    def alarm_kind(self, code: str) -> str:
        """The alarm's code as a label value, or ``other`` past the bound (cardinality stays fixed)."""
        if not _KIND.match(code):
            return "other"
        with self._lock:
            if code in self._kinds:
                return code
            if len(self._kinds) >= MAX_ALARM_KINDS:
                return "other"
            self._kinds.add(code)
            return code

    def flush(self) -> None:
        """Fold every buffered event of this process into the exported values."""
        self.buffers.flush()


_lock = threading.Lock()
_instruments: Instruments | None = None
_local_registry: CollectorRegistry | None = None
_enabled = False


def enable() -> None:
    """Turn counting on in this process, before any instrument exists (again: no effect). With
    ``PROMETHEUS_MULTIPROC_DIR`` set (``qkms serve`` sets it for itself and its workers) the
    instruments write to that shared directory; without, they live in a registry of this process."""
    global _enabled
    with _lock:
        if _enabled:
            return
        _use_value_class_for_environment()
        _enabled = True


def _use_value_class_for_environment() -> None:
    """prometheus-client picks file-backed or in-memory values when it is first imported; this
    process may have imported it before ``qkms serve`` chose the directory, so choose again (no
    instrument exists yet, :func:`enable` checks)."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def enabled() -> bool:
    return _enabled


def multiproc_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def instruments() -> Instruments | None:
    """This process's instruments, or None when counting is off (``[operator] enabled = false``)."""
    global _instruments, _local_registry
    if not _enabled:
        return None
    if _instruments is None:
        with _lock:
            if _instruments is None:
                from prometheus_client import CollectorRegistry

                if multiproc_dir() is None:
                    _local_registry = CollectorRegistry()
                _instruments = Instruments(_local_registry)
    return _instruments


def process_registry() -> CollectorRegistry:
    """What a scrape collects of the instruments: every process's files in multiprocess mode, or
    this process's registry."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    counted = instruments()
    if counted is not None:
        counted.flush()  # this process's own events, up to this moment
    directory = multiproc_dir()
    if directory is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        return registry
    return _local_registry if _local_registry is not None else CollectorRegistry()


def flush() -> None:
    """Write what this process counted so far (the app's stop and exit; scrapes flush themselves)."""
    if _instruments is not None:
        _instruments.flush()


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters stay, so totals never go back)."""
    directory = multiproc_dir()
    if directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
