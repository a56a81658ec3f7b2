"""An operator suspends or resumes a link (``qkms link suspend|resume``, docs/DECISIONS.md D-22).

Each is one audited transaction: the link's state is checked, the link, its blocks and the keys cut
from them move together, and ``link.suspended`` / ``link.resumed`` is recorded. A link suspended by
an alarm is the ingest use case's (``kms.service.ingest.record_alarm``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from kms.service import audit_recorder
from kms.storage import link_repository as links
from kms.storage.database import Database
from kms.storage.link_repository import LinkChange
from kms.storage.pool_repository import EventBatch

OPERATOR = "operator"


class LinkStateError(Exception):
    """The link is not in the state the transition starts from (or not on this KME)."""


def suspend(db: Database, link_id: str, reason: str) -> LinkChange:
    """Suspend an active link: its blocks and the reserved keys cut from them are no longer served."""
    return _transition(
        db,
        link_id,
        "active",
        "link.suspended",
        {"reason": reason},
        lambda conn, events: links.suspend_link(conn, link_id, OPERATOR, reason, events),
    )


def resume(db: Database, link_id: str, reason: str, discard: bool) -> LinkChange:
    """Resume a suspended link, reusing its suspended blocks and keys or, with ``discard``, destroying them."""
    return _transition(
        db,
        link_id,
        "suspended",
        "link.resumed",
        {"reason": reason, "discard": discard},
        lambda conn, events: links.resume_link(conn, link_id, OPERATOR, reason, events, discard),
    )


def _transition(
    db: Database,
    link_id: str,
    required: str,
    action: str,
    data: Mapping[str, Any],
    change: Callable[[Connection, EventBatch], LinkChange],
) -> LinkChange:
    """Check the link's state, apply ``change`` and audit it, all in one transaction."""
    events = EventBatch(datetime.now(UTC))
    with db.write() as conn:
        if links.link_state(conn, link_id) != required:
            raise LinkStateError(f"link {link_id} is not {required} on this KME")
        result = change(conn, events)
        events.flush(conn)
        record = {**data, "blocks": result.blocks, "keys": result.keys}
        audit_recorder.record(conn, OPERATOR, action, link_id, record, events.at)
    return result
