"""What the web console shows, read only (DECISIONS.md D-36): ``/metrics``' figures (links, pool
levels exactly as ``qkms status`` counts them, QBER, keys by state and SAE pair, audit head,
peers: ``OperatorMetrics``), the per-block statistics of the last hour bucketed by minute for the
charts, active alarms, fallback keys, link-state records for the topology, and the audit's
verification and newest records (``AuditService``).

A link's alarm is *active* from its ``link.alarm`` record until the next ``link.resumed`` of that
link; a block an alarm names produced no key and counts as aborted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kms.config import KmsSettings
from kms.domain.audit_chain import AuditRecord
from kms.service.audit_queries import AuditService
from kms.service.operator_metrics import DbFigures, OperatorMetrics
from kms.storage import console_queries as queries
from kms.storage.database import Database
from kms.storage.link_state_repository import load_records

WINDOW = timedelta(hours=1)
BUCKET_SECONDS = 60
LINK_EVENTS = ("link.alarm", "link.suspended", "link.resumed")


@dataclass
class Bucket:
    """One minute of a link: blocks stored (an adapter's block, however many pieces it is stored
    as), their bits, their mean QBER, blocks aborted."""

    start: datetime
    blocks: int = 0
    bits: int = 0
    qber_sum: float = 0.0
    qber_n: int = 0
    aborted: int = 0

    @property
    def qber(self) -> float | None:
        return self.qber_sum / self.qber_n if self.qber_n else None

    @property
    def rate(self) -> float:
        """Secret bits per second over the minute."""
        return self.bits / BUCKET_SECONDS


@dataclass(frozen=True)
class Alarm:
    link_id: str
    at: str
    code: str
    reason: str


@dataclass(frozen=True)
class Edge:
    origin: str
    peer: str
    link_id: str
    state: str
    bits: int


@dataclass
class Overview:
    now: datetime
    figures: DbFigures | None
    error: str | None
    series: dict[str, list[Bucket]] = field(default_factory=dict)
    alarms: list[Alarm] = field(default_factory=list)
    fallback: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class LinkDetail:
    overview: Overview
    link_id: str
    events: list[AuditRecord]


class ConsoleView:
    def __init__(
        self, db: Database, settings: KmsSettings, metrics: OperatorMetrics, audit: AuditService
    ) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.audit = audit

    def overview(self, link_id: str | None = None) -> Overview:
        now = datetime.now(UTC)
        try:
            figures = self.metrics.figures()
        except Exception as exc:
            return Overview(now, None, f"the database did not answer ({type(exc).__name__})")
        since = now - WINDOW
        with self.db.read() as conn:
            blocks = queries.blocks_since(conn, since, link_id)
            events = queries.records_since(conn, LINK_EVENTS, since)
            fallback = queries.fallback_keys_since(conn, since)
        links = [link.link_id for link in figures.links if link_id in (None, link.link_id)]
        series = {link: _empty_buckets(now) for link in links}
        seen: set[tuple[str, str]] = set()
        for b in blocks:
            _add_block(series, b, now, first=(b.link_id, b.source_block_id) not in seen)
            seen.add((b.link_id, b.source_block_id))
        for r in events:
            if r.action == "link.alarm" and isinstance(r.data, dict) and r.data.get("block_id"):
                bucket = _bucket_of(series.get(r.subject), datetime.fromisoformat(r.at), now)
                if bucket is not None:
                    bucket.aborted += 1
        return Overview(now, figures, None, series, active_alarms(events), fallback)

    def link(self, link_id: str) -> LinkDetail | None:
        """None: no such link on this KME."""
        overview = self.overview(link_id)
        if overview.figures is not None and all(link.link_id != link_id for link in overview.figures.links):
            return None
        with self.db.read() as conn:
            events = queries.records_since(conn, LINK_EVENTS, overview.now - WINDOW)
        mine = [r for r in reversed(events) if r.subject == link_id][:50]
        return LinkDetail(overview, link_id, mine)

    def topology(self) -> list[Edge]:
        """Each KME's links as its newest link-state record says (as received and stored; routing
        checks the signatures), with this KME's own links from its own store."""
        edges: list[Edge] = []
        with self.db.read() as conn:
            stored = load_records(conn)
        for record in stored:
            edges.extend(_edges_of(record.origin, record.record))
        own = self.settings.kme.id
        figures = self.metrics.figures()
        edges = [e for e in edges if e.origin != own]
        edges.extend(
            Edge(own, link.peer_kme_id, link.link_id, link.state, link.own_bits) for link in figures.links
        )
        return edges

    def figures(self) -> DbFigures:
        return self.metrics.figures()

    def recent_records(self, limit: int = 30) -> list[AuditRecord]:
        with self.db.read() as conn:
            return queries.newest_records(conn, limit)

    def verification(self) -> dict[str, Any]:
        return self.audit.verify_report()

    def provenance(self, key_id: str) -> dict[str, Any] | None:
        return self.audit.provenance(key_id)


def active_alarms(events: list[AuditRecord]) -> list[Alarm]:
    """Alarms not followed by a resumption of their link (oldest first)."""
    active: dict[str, list[Alarm]] = {}
    for r in events:
        if r.action == "link.resumed":
            active.pop(r.subject, None)
        elif r.action == "link.alarm":
            data = r.data if isinstance(r.data, dict) else {}
            alarm = Alarm(r.subject, r.at, str(data.get("code", "")), str(data.get("reason", ""))[:200])
            active.setdefault(r.subject, []).append(alarm)
    return [a for alarms in active.values() for a in alarms]


def _empty_buckets(now: datetime) -> list[Bucket]:
    first = now - WINDOW
    return [
        Bucket(first + timedelta(seconds=i * BUCKET_SECONDS))
        for i in range(int(WINDOW.total_seconds()) // BUCKET_SECONDS)
    ]


def _bucket_of(buckets: list[Bucket] | None, at: datetime, now: datetime) -> Bucket | None:
    if buckets is None:
        return None
    index = int((at - (now - WINDOW)).total_seconds() // BUCKET_SECONDS)
    return buckets[index] if 0 <= index < len(buckets) else None


def _add_block(series: dict[str, list[Bucket]], b: queries.BlockStat, now: datetime, first: bool) -> None:
    """Count a stored piece's bits; a block (and its QBER) once, at its first piece."""
    bucket = _bucket_of(series.get(b.link_id), b.received_at, now)
    if bucket is None:
        return
    bucket.bits += b.bits
    if not first:
        return
    bucket.blocks += 1
    if b.qber is not None:
        bucket.qber_sum += b.qber
        bucket.qber_n += 1


def _edges_of(origin: str, text: str) -> list[Edge]:
    try:
        links = json.loads(text).get("links", [])
        # [peer, link, state, bits] or, from a KME that reports its key rate (D-26), [..., rate]
        return [Edge(origin, str(p), str(lid), str(state), int(bits)) for p, lid, state, bits, *_ in links]
    except (ValueError, TypeError, AttributeError):
        return []
