"""The SAE registry: which applications exist, at which KME, and which certificate each presents.

Identity is the pair (certificate CN, pinned SHA-256 fingerprint); both must match. The registry is
an in-memory map refreshed from the database, so authenticating a request costs one dict lookup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SaeInfo:
    sae_id: str
    kme_id: str
    fingerprint: str
    enabled: bool = True
    role: str = "sae"  # "sae" or "auditor"


class SaeRegistry:
    """Thread-safe lookups by SAE ID and by certificate fingerprint."""

    def __init__(self, entries: Iterable[SaeInfo] = ()) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, SaeInfo] = {}
        self._by_fp: dict[str, SaeInfo] = {}
        self._last_reload = 0.0
        self.replace(entries)

    def replace(self, entries: Iterable[SaeInfo]) -> None:
        by_id = {e.sae_id: e for e in entries}
        with self._lock:
            self._by_id = by_id
            self._by_fp = {e.fingerprint: e for e in by_id.values()}

    def get(self, sae_id: str) -> SaeInfo | None:
        return self._by_id.get(sae_id)

    def by_fingerprint(self, fingerprint: str) -> SaeInfo | None:
        return self._by_fp.get(fingerprint)

    def stale(self, min_interval: float = 5.0) -> bool:
        """True when a reload is allowed (rate-limited so unknown callers cannot hammer the database)."""
        now = time.monotonic()
        if now - self._last_reload < min_interval:
            return False
        self._last_reload = now
        return True
