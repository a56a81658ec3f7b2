"""What ``qkms top`` shows, read only: the figures ``/metrics`` exports (``OperatorMetrics``: links,
pool levels as ``qkms status`` counts them, QBER, keys by state, audit, peers), the newest link
alarms, and the audit stream's lag when ``[siem]`` is on. Nothing is written or audited.

Key rates are the growth of each link's produced bits between two snapshots (the view's refresh
interval), so a single snapshot has none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kms.config import KmsSettings
from kms.service.audit_shipping import ShippingLag, shipping_lag
from kms.service.operator_metrics import DbFigures, OperatorMetrics
from kms.storage.database import Database
from kms.storage.top_queries import newest_records

ALARM_ACTIONS = ("link.alarm", "link.suspended", "link.resumed")


@dataclass(frozen=True)
class LinkEvent:
    at: str
    link_id: str
    action: str
    detail: str  # the alarm's code and reason, or the suspension's reason


@dataclass(frozen=True)
class TopSnapshot:
    monotonic: float
    at: datetime
    figures: DbFigures | None  # None: the database did not answer in time
    error: str | None
    events: list[LinkEvent] = field(default_factory=list)
    siem: list[ShippingLag] = field(default_factory=list)


class TopView:
    def __init__(self, db: Database, settings: KmsSettings, events: int = 6) -> None:
        self.db = db
        self.settings = settings
        self.events = events
        fresh = settings.operator.model_copy(update={"db_metrics_max_age_seconds": 0.0})
        self.metrics = OperatorMetrics(db, settings.model_copy(update={"operator": fresh}))

    @classmethod
    def for_settings(cls, settings: KmsSettings) -> TopView:
        """Over a database opened for the view (:meth:`close` disposes of it)."""
        return cls(Database(settings.database.url), settings)

    def close(self) -> None:
        self.db.dispose()

    def snapshot(self) -> TopSnapshot:
        started, now = time.monotonic(), datetime.now(UTC)
        try:
            figures = self.metrics.figures()
        except Exception as exc:
            return TopSnapshot(started, now, None, f"database: {type(exc).__name__}")
        with self.db.read() as conn:
            records = newest_records(conn, ALARM_ACTIONS, self.events)
        events = [LinkEvent(r.at, r.subject, r.action, _detail(r.data)) for r in records]
        siem = shipping_lag(self.db, self.settings) if self.settings.siem.active else []
        return TopSnapshot(started, now, figures, None, events, siem)


def key_rates(before: TopSnapshot | None, after: TopSnapshot) -> dict[str, float]:
    """Secret bits per second each link delivered between the two snapshots."""
    if before is None or before.figures is None or after.figures is None:
        return {}
    elapsed = after.monotonic - before.monotonic
    if elapsed <= 0:
        return {}
    old = {link.link_id: link.produced_bits for link in before.figures.links}
    return {
        link.link_id: max(0, link.produced_bits - old.get(link.link_id, link.produced_bits)) / elapsed
        for link in after.figures.links
    }


def _detail(data: object) -> str:
    if not isinstance(data, dict):
        return ""
    parts = [str(data[k]) for k in ("code", "reason") if data.get(k)]
    return ": ".join(parts)[:120]
