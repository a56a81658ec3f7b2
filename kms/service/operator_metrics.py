"""Figures for ``/metrics`` read from the database and the KME's files, shared by all its processes.

Pool levels, keys by state and the audit head describe state every process of a KME shares; read
here at scrape time, they are one consistent figure however many processes serve (a per-process
gauge would report each process's partial view). The pool levels are exactly ``qkms status``'s
(``kms.storage.status_queries.read_pool_report``). The read is bounded in time
(:mod:`kms.service.single_flight`) and reused for ``operator.db_metrics_max_age_seconds``.

The seconds until a link's pool is empty follow from the bits this KME cut from it over the last
few minutes of scrapes (the draw); with no draw, +Inf.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from kms.config import KmsSettings
from kms.service.audit_shipping import ShippingLag, shipping_lag
from kms.service.single_flight import SingleFlight
from kms.storage import operator_queries as queries
from kms.storage.database import Database
from kms.storage.status_queries import read_pool_report

DRAW_WINDOW_SECONDS = 300.0
OTHER = "_other"


@dataclass(frozen=True)
class LinkFigures:
    link_id: str
    peer_kme_id: str
    state: str
    own_bits: int
    mirror_bits: int
    unconfirmed_blocks: int
    produced_bits: int
    served_bits: int
    qber: float | None
    seconds_until_empty: float | None  # None: not enough history yet


@dataclass(frozen=True)
class PairFigures:
    master_sae_id: str
    slave_sae_id: str
    policy: str
    state: str
    keys: int


@dataclass(frozen=True)
class DbFigures:
    links: list[LinkFigures]
    pairs: list[PairFigures]
    keys_by_state: dict[str, int]
    audit_head_seq: int
    checkpoint_number: int | None
    checkpoint_age_seconds: float | None
    unsigned_records: int  # records after the newest checkpoint (all of them without one)
    peer_message_age_seconds: dict[str, float] = field(default_factory=dict)
    siem_lag: list[ShippingLag] = field(default_factory=list)  # per configured SIEM sink


class OperatorMetrics:
    """Reads :class:`DbFigures` for one KME, at most once per ``max_age`` seconds."""

    def __init__(self, db: Database, settings: KmsSettings) -> None:
        self.db = db
        self.settings = settings
        self.timeout = settings.operator.health_timeout_seconds
        self.max_age = settings.operator.db_metrics_max_age_seconds
        self._flight = SingleFlight("qkms-metrics-db", self._read)
        self._lock = threading.Lock()
        self._cached: tuple[float, DbFigures] | None = None
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def figures(self) -> DbFigures:
        """Fresh enough figures; raises (``CallTimedOut`` or the driver's error) when the database
        does not answer in time."""
        with self._lock:
            cached = self._cached
        if cached is not None and time.monotonic() - cached[0] <= self.max_age:
            return cached[1]
        figures = self._flight.run(self.timeout)
        with self._lock:
            self._cached = (time.monotonic(), figures)
        return figures

    def _read(self) -> DbFigures:
        with self.db.read() as conn:
            report = read_pool_report(conn)
            totals = queries.link_totals(conn)
            qber = {link.link_id: queries.newest_block_qber(conn, link.link_id) for link in report.links}
            pairs = queries.keys_by_pair(conn)
            _, head_seq = queries.audit_head_matches_newest(conn)
            checkpoint = queries.newest_checkpoint(conn)
            peer_seen = queries.newest_peer_messages(conn)
        now = datetime.now(UTC)
        served = {link_id: t.served_bits for link_id, t in totals.items()}
        draw = self._draw_per_second(served)
        links = []
        for level in report.links:
            total = totals.get(level.link_id, queries.LinkTotals(0, 0))
            until_empty = _seconds_until_empty(level.stored_bits, draw.get(level.link_id))
            links.append(
                LinkFigures(
                    level.link_id,
                    level.peer_kme_id,
                    level.state,
                    level.stored_bits,
                    level.mirror_bits,
                    level.unconfirmed_blocks,
                    total.produced_bits,
                    total.served_bits,
                    qber.get(level.link_id),
                    until_empty,
                )
            )
        return DbFigures(
            links=links,
            pairs=bounded_pairs(pairs, self.settings.operator.max_pair_series),
            keys_by_state=report.keys_by_state,
            audit_head_seq=head_seq,
            checkpoint_number=checkpoint[0] if checkpoint else None,
            checkpoint_age_seconds=(now - _utc(checkpoint[2])).total_seconds() if checkpoint else None,
            unsigned_records=head_seq - (checkpoint[1] if checkpoint else 0),
            peer_message_age_seconds={p: (now - _utc(at)).total_seconds() for p, at in peer_seen.items()},
            siem_lag=_siem_lag(self.db, self.settings),
        )

    def _draw_per_second(self, served: dict[str, int]) -> dict[str, float]:
        """Bits per second cut from each link since the oldest reading of the window."""
        now = time.monotonic()
        with self._lock:
            while self._history and now - self._history[0][0] > DRAW_WINDOW_SECONDS:
                self._history.popleft()
            oldest = self._history[0] if self._history else None
            self._history.append((now, served))
        if oldest is None or now - oldest[0] < 1.0:
            return {}
        elapsed = now - oldest[0]
        return {link: max(0, bits - oldest[1].get(link, 0)) / elapsed for link, bits in served.items()}


def bounded_pairs(rows: list[queries.PairKeys], limit: int) -> list[PairFigures]:
    """The ``limit`` SAE pairs with the most keys keep their own series; the rest are summed into
    ``_other``/``_other`` (label cardinality stays bounded by configuration)."""
    totals: dict[tuple[str, str], int] = {}
    for r in rows:
        totals[(r.master_sae_id, r.slave_sae_id)] = totals.get((r.master_sae_id, r.slave_sae_id), 0) + r.keys
    kept = set(sorted(totals, key=lambda pair: (-totals[pair], pair))[:limit])
    merged: dict[tuple[str, str, str, str], int] = {}
    for r in rows:
        master, slave = (
            (r.master_sae_id, r.slave_sae_id) if (r.master_sae_id, r.slave_sae_id) in kept else (OTHER, OTHER)
        )
        key = (master, slave, r.policy, r.state)
        merged[key] = merged.get(key, 0) + r.keys
    return [PairFigures(m, s, p, st, n) for (m, s, p, st), n in sorted(merged.items())]


def certificate_expiry(settings: KmsSettings) -> dict[str, float]:
    """Unix time at which each of the KME's own certificates expires, by role (``server``, ``ca``,
    ``peer_client``); a certificate that cannot be read is left out (and alerts as missing)."""
    paths = {"server": settings.tls.server_cert, "ca": settings.tls.ca_cert}
    if settings.peers:
        paths["peer_client"] = settings.peering.client_cert
    expiry: dict[str, float] = {}
    for role, path in paths.items():
        stamp = _not_after(path)
        if stamp is not None:
            expiry[role] = stamp
    return expiry


def _not_after(path: Path) -> float | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


def _siem_lag(db: Database, settings: KmsSettings) -> list[ShippingLag]:
    """Each SIEM sink's lag (``kms.service.audit_shipping``); none when ``[siem]`` is off."""
    return shipping_lag(db, settings) if settings.siem.active else []


def _seconds_until_empty(bits: int, draw_per_second: float | None) -> float | None:
    if draw_per_second is None:
        return None
    return math.inf if draw_per_second <= 0 else bits / draw_per_second


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
