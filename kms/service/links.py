"""An operator suspends or resumes a link (``qkms link suspend|resume``, docs/DECISIONS.md D-22).

The link's state is checked, the link and the keys cut from it change in one audited transaction
(``link.suspended`` / ``link.resumed``), then its blocks in batches of ``BLOCK_BATCH``, each a short
transaction, and ``link.blocks_moved`` records the count: a link of 42,685 blocks held the KME for
5 s in one transaction, and relays through it timed out. A link suspended by an alarm is the ingest
use case's (``kms.service.ingest.record_alarm``); its blocks move the same way (``move_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from kms.domain.lifecycle import KeyState
from kms.service import audit_recorder
from kms.storage import link_repository as links
from kms.storage.database import Database
from kms.storage.link_repository import LinkChange
from kms.storage.pool_repository import EventBatch

OPERATOR = "operator"


class LinkStateError(Exception):
    """The link is not in the state the transition starts from (or not on this KME)."""


BLOCK_BATCH = 2000  # blocks moved per transaction: each holds the write lock a few milliseconds


def suspend(db: Database, link_id: str, reason: str) -> LinkChange:
    """Suspend an active link: its blocks and the reserved keys cut from them are no longer served.
    The link and its keys change in one transaction; its blocks follow in batches of
    ``BLOCK_BATCH`` (nothing is cut from a suspended link's blocks meanwhile). Run again on a link
    left suspended with blocks still to move (a crash in between), it finishes the move."""
    live = (KeyState.ACTIVE, KeyState.PRE_ACTIVE)
    return _transition(
        db,
        link_id,
        ("active", "suspended"),
        "link.suspended",
        {"reason": reason},
        lambda conn, events: links.suspend_link_keys(conn, link_id, OPERATOR, reason, events),
        (live, KeyState.SUSPENDED, "link suspended"),
    )


def resume(db: Database, link_id: str, reason: str, discard: bool) -> LinkChange:
    """Resume a suspended link, reusing its suspended blocks and keys or, with ``discard``, destroying
    them; the blocks in batches as for ``suspend`` (run again with the same ``discard`` to finish)."""
    target = KeyState.DESTROYED if discard else KeyState.ACTIVE
    return _transition(
        db,
        link_id,
        ("suspended", "active"),
        "link.resumed",
        {"reason": reason, "discard": discard},
        lambda conn, events: links.resume_link_keys(conn, link_id, OPERATOR, reason, events, discard),
        ((KeyState.SUSPENDED,), target, reason),
    )


def _transition(
    db: Database,
    link_id: str,
    states: tuple[str, str],
    action: str,
    data: Mapping[str, Any],
    change: Callable[[Connection, EventBatch], int],
    blocks: tuple[tuple[KeyState, ...], KeyState, str],
) -> LinkChange:
    """Check the link's state (``states``: from, to), change it and its keys and audit it, in one
    transaction; then move its blocks in batches, each its own transaction, and audit the count.
    A link already in the target state with blocks left to move only has them moved."""
    start, end = states
    current, target, why = blocks
    events = EventBatch(datetime.now(UTC))
    with db.write() as conn:
        state = links.link_state(conn, link_id)
        if state == start:
            n_keys = change(conn, events)
            events.flush(conn)
            audit_recorder.record(conn, OPERATOR, action, link_id, {**data, "keys": n_keys}, events.at)
        elif state == end and links.count_link_blocks(conn, link_id, current):
            n_keys = 0  # finishing an interrupted move
        else:
            raise LinkStateError(f"link {link_id} is not {start} on this KME")
    moved = move_blocks(db, link_id, end, (current, target), OPERATOR, why)
    return LinkChange(link_id, moved, n_keys)


def move_blocks(
    db: Database,
    link_id: str,
    link_state: str,
    blocks: tuple[tuple[KeyState, ...], KeyState],
    actor: str,
    why: str,
) -> int:
    """Move a link's blocks from ``blocks[0]`` states to ``blocks[1]`` in batches of
    ``BLOCK_BATCH``, each its own transaction, while the link stays ``link_state``; audit the
    count (``link.blocks_moved``). The operator's transitions and an alarm's suspension use it."""
    current, target = blocks
    moved = 0
    while True:
        batch = EventBatch(datetime.now(UTC))
        with db.write() as conn:
            if links.link_state(conn, link_id) != link_state:
                break  # changed again meanwhile: that transition moves the rest
            n = links.move_link_blocks(conn, link_id, current, target, actor, why, batch, BLOCK_BATCH)
            batch.flush(conn)
            moved += n
            if n < BLOCK_BATCH:
                audit_recorder.record(
                    conn, actor, "link.blocks_moved", link_id, {"to": target.value, "blocks": moved}, batch.at
                )
                break
    return moved
