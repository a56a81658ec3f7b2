"""Process-local buffers in front of prometheus-client's instruments, so that counting costs the key
path well under a microsecond.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, D-32) every ``Counter.inc`` takes a lock, checks
the pid and writes the mmaped file: about 3 us, and a ``Histogram.observe`` writes twice (about
6 us); a round trip paid that several times over (benchmarks/README.md, metrics on vs off). Here an
event is one ``deque.append`` (atomic under the GIL, about 0.1 us); a flush drains each deque and
folds its events into the prometheus-client value as one increment per series (and per histogram
bucket). Flushes run every ``FLUSH_SECONDS`` in a daemon thread, before every scrape of this process
(``kms.telemetry.metrics.process_registry``), when the app stops, and at exit, so a worker that exits
has written everything it counted. Another process's figures may lag a scrape by up to
``FLUSH_SECONDS``.

Exact: each event is taken off its deque by exactly one flush (``popleft`` is atomic), and flushes
are serialised, so a flush that returns has written every event appended before it began.

Histograms are folded through prometheus-client internals (``Histogram._upper_bounds``, ``_sum``,
``_buckets``: one value per bucket, not cumulative, as ``Histogram.observe`` writes them, checked with
prometheus-client 0.26). ``tests/operator/test_buffered_instruments.py`` fails if the exported
histogram (counts, sum, buckets) ever disagrees with the same observations made directly.
"""

from __future__ import annotations

import atexit
import os
import threading
from bisect import bisect_left
from collections import deque
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

# How often the daemon thread folds the buffers into prometheus-client's values (seconds). Tests may
# set a long interval (QKMS_METRICS_FLUSH_SECONDS) to see that scrapes and exits flush on their own.
FLUSH_SECONDS = float(os.environ.get("QKMS_METRICS_FLUSH_SECONDS", "0.25"))


class _Series(Protocol):
    def flush(self) -> None: ...


class BufferedCounter:
    """One counter series: ``inc`` appends, ``flush`` adds the sum with one ``inc``."""

    __slots__ = ("_child", "_events")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._events: deque[float] = deque()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._events.append(amount)

    def flush(self) -> None:
        pop = self._events.popleft
        total: float = 0
        taken = False
        try:
            while True:
                total += pop()
                taken = True
        except IndexError:
            pass
        if taken:
            self._child.inc(total)


class BufferedHistogram:
    """One histogram series: ``observe`` appends, ``flush`` adds the sum once and each bucket's
    count once (the bucket of a value is the first upper bound at or above it, as in
    ``Histogram.observe``)."""

    __slots__ = ("_bounds", "_child", "_events")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._events: deque[float] = deque()

    def observe(self, amount: float) -> None:
        self._events.append(amount)

    def flush(self) -> None:
        pop = self._events.popleft
        bounds = self._bounds
        counts = [0] * len(bounds)
        total = 0.0
        taken = False
        try:
            while True:
                value = pop()
                total += value
                counts[bisect_left(bounds, value)] += 1
                taken = True
        except IndexError:
            pass
        if not taken:
            return
        self._child._sum.inc(total)
        for bucket, count in zip(self._child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class Buffers:
    """Every buffered series of this process and the thread that flushes them."""

    def __init__(self, every: float = FLUSH_SECONDS) -> None:
        self.every = every
        self._series: list[_Series] = []
        self._lock = threading.Lock()  # the list of series
        self._flushing = threading.Lock()  # one flush at a time: a finished flush wrote everything
        self._thread: threading.Thread | None = None

    def track(self, series: Any) -> Any:
        with self._lock:
            self._series.append(series)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qkms-metrics-flush", daemon=True)
                self._thread.start()
                atexit.register(self.flush)
        return series

    def flush(self) -> None:
        """Fold every event buffered so far into prometheus-client's values."""
        with self._lock:
            series = list(self._series)
        with self._flushing:
            for s in series:
                s.flush()

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.every):
            try:
                self.flush()
            except Exception as exc:  # a full disk must not end counting; the next flush retries
                log.error("metrics_flush_failed", error=type(exc).__name__)


class BufferedFamily:
    """A labelled prometheus-client Counter or Histogram seen through buffers: ``labels(...)``
    returns the series' buffer (made once per label values), with ``inc`` or ``observe``."""

    def __init__(self, metric: Any, buffers: Buffers, histogram: bool) -> None:
        self._metric = metric
        self._buffers = buffers
        self._kind = BufferedHistogram if histogram else BufferedCounter
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.get(values)
                if child is None:
                    child = self._buffers.track(self._kind(self._metric.labels(*values)))
                    self._children[values] = child
        return child
