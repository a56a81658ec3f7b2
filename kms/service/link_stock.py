"""How much key each link toward another KME holds here, read once for every reader of a process.

Routing runs per Get key request, and block confirmation and rebalancing every ``sync_seconds``;
each wants the stock of every peer link, a sum over the pool's active blocks. Read that often, the
sum cost as much CPU as the key delivery itself (a trusted node spent a fifth of its time in it).
``LinkStock`` keeps the last reading for ``max_age`` seconds and lets one thread re-read it while
the others go on with the reading they have: a stock figure a fraction of a second old only makes
the cut itself answer 503 (the cut checks the real stock under its transaction). Block
confirmation needs only which links exist and their state: ``peer_links`` reads no sums.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace

from sqlalchemy import Connection

from kms.service.peer_context import PeerSite
from kms.storage import peer_repository as peers
from kms.storage.peer_repository import LinkLevel

MAX_AGE_SECONDS = 0.5
RATE_WINDOW_SECONDS = 60.0  # a link's key rate: own bits stored over about the last minute
RATE_MIN_SPAN_SECONDS = 5.0  # no rate before this long has been watched


class KeyRateMeter:
    """Own key bits/s each link delivered lately, from the rows stored since the last reading
    (``peer_repository.own_bits_stored_after``). Approximate by design (on PostgreSQL a row with
    a lower ID may commit after the reading): it only ranks routes (D-26)."""

    def __init__(self) -> None:
        self._after: int | None = None
        self._totals: dict[str, int] = {}
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def read(self, conn: Connection, now: float) -> dict[str, int]:
        """Per link, bits/s over the window; empty until ``RATE_MIN_SPAN_SECONDS`` are watched."""
        self._after, new = peers.own_bits_stored_after(conn, self._after)
        for link_id, bits in new.items():
            self._totals[link_id] = self._totals.get(link_id, 0) + bits
        self._samples.append((now, dict(self._totals)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first_at, first = self._samples[0]
        span = now - first_at
        if span < RATE_MIN_SPAN_SECONDS:
            return {}
        return {link: round((total - first.get(link, 0)) / span) for link, total in self._totals.items()}


class LinkStock:
    def __init__(self, site: PeerSite, max_age: float = MAX_AGE_SECONDS) -> None:
        self.site = site
        self.max_age = max_age
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # held by the one thread re-reading the stock
        self._cached: tuple[float, list[LinkLevel]] | None = None
        self._meter = KeyRateMeter()

    def levels(self) -> list[LinkLevel]:
        """Every link toward another KME with this end's stock, at most ``max_age`` s old."""
        with self._lock:
            cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < self.max_age:
            return cached[1]
        # Stale: one thread re-reads; the others keep the stale reading meanwhile (or wait for the
        # first reading of all).
        if not self._reading.acquire(blocking=cached is None):
            assert cached is not None
            return cached[1]
        try:
            with self._lock:
                cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self.max_age:
                return cached[1]  # another thread re-read it while this one waited
            return self.fresh()
        finally:
            self._reading.release()

    def fresh(self) -> list[LinkLevel]:
        """The stock as it is now (Get status, the topology a peer asks for, rebalancing); kept for
        ``levels``."""
        started = time.monotonic()
        with self.site.db.read() as conn:
            levels = [lv for lv in peers.link_levels(conn) if lv.peer_kme_id != self.site.kme_id]
            with self._lock:
                rates = self._meter.read(conn, started)
        if rates:
            levels = [replace(lv, rate=rates.get(lv.link_id, 0)) for lv in levels]
        with self._lock:
            self._cached = (started, levels)
        return levels

    def peer_links(self) -> list[LinkLevel]:
        """Every link toward another KME with its state, without stock figures (bits 0)."""
        with self.site.db.read() as conn:
            return [lv for lv in peers.peer_links(conn) if lv.peer_kme_id != self.site.kme_id]
