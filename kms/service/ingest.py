"""Block ingest: adapter key blocks into the encrypted pool, and link alarms recorded (suspending the
link when the alarm calls for it, docs/DECISIONS.md D-22). Each is one audited transaction; the pool
filler (``kms.runtime.filler.PoolFiller``) and the peer network call these."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.domain.blocks import split_block
from kms.domain.lifecycle import KeyState
from kms.service import audit_recorder
from kms.service import links as link_moves
from kms.service.audit_recorder import AuditEntry
from kms.storage import link_repository as links
from kms.storage import pool_repository as pool
from kms.storage.database import Database
from qkd_adapters.keyblock import KeyBlock, LinkAlarm

log = structlog.get_logger(__name__)


def store_block(
    db: Database,
    envelope: Envelope,
    cfg: PoolSection,
    kme_id: str,
    block: KeyBlock,
    peer_kme_id: str,
    confirmed: bool = False,
) -> int:
    """Store one adapter block in the encrypted pool; returns the pieces stored.

    A local link's block is ``active`` at once; a block shared with another KME stays ``pre_active``
    until the peer confirms it holds the same block (``confirmed``: it already has). The block's
    ``sync`` metadata is kept with its provenance, for the peer's adapter.
    """
    return store_blocks(db, envelope, cfg, kme_id, [block], peer_kme_id, confirmed)


def store_blocks(
    db: Database,
    envelope: Envelope,
    cfg: PoolSection,
    kme_id: str,
    blocks: Sequence[KeyBlock],
    peer_kme_id: str,
    confirmed: bool = False,
) -> int:
    """:func:`store_block` for several blocks of one link in one transaction (one BEGIN, one audit
    append, one COMMIT for all of them: the filler then holds SQLite's write turn far less)."""
    if not blocks:
        return 0
    link_id = blocks[0].link_id
    if any(b.link_id != link_id for b in blocks):
        raise ValueError("store_blocks takes the blocks of one link")
    events = pool.EventBatch(datetime.now(UTC))
    actor = f"adapter:{link_id}"
    prepared = []
    for block in blocks:
        pieces = split_block(block, cfg.storage_block_bits, cfg.min_key_size, kme_id, peer_kme_id)
        provenance = block.provenance.to_json()
        if block.sync:
            provenance["sync"] = dict(block.sync)
        prepared.append((block, pieces, provenance))
    stored = 0
    with db.write() as conn:
        if links.link_state(conn, link_id) == "suspended":
            state = KeyState.SUSPENDED
        elif peer_kme_id == kme_id or confirmed:
            state = KeyState.ACTIVE
        else:
            state = KeyState.PRE_ACTIVE
        reason = "peer already holds it" if confirmed else "local link"
        entries: list[AuditEntry] = []
        for block, pieces, provenance in prepared:
            n = pool.store_block_pieces(
                conn, envelope, link_id, pieces, provenance, state, events, actor, reason
            )
            stored += n
            entries.append((actor, "block.received", link_id, _received_record(block, n, state)))
        events.flush(conn)
        audit_recorder.append(conn, entries, events.at)
    log.debug("blocks_stored", link_id=link_id, blocks=len(blocks), pieces=stored)
    return stored


def _received_record(block: KeyBlock, storage_blocks: int, state: KeyState) -> dict[str, Any]:
    prov = block.provenance
    return {
        "block_id": block.block_id,
        "bits": block.bit_length,
        "storage_blocks": storage_blocks,
        "state": state.value,
        "protocol": prov.protocol,
        "is_qkd": prov.is_qkd,
        "simulated": prov.simulated,
        "qber": prov.qber,
    }


def paired_block_numbers(db: Database) -> dict[str, int]:
    """Per link, the number of the newest block a paired test source (``rnd-N``) stored here."""
    with db.read() as conn:
        newest = pool.last_source_block_ids(conn)
    return {
        link: int(block[4:])
        for link, block in newest.items()
        if block.startswith("rnd-") and block[4:].isdigit()
    }


def stored_bits_by_link(db: Database) -> dict[str, int]:
    """Unserved bits held per link, confirmed or not, suspended or not (the filler stops pulling a
    link at its limit)."""
    with db.read() as conn:
        return pool.stored_bits_by_link(conn)


def record_alarm(db: Database, alarm: LinkAlarm, code: str, suspend: bool) -> None:
    """Record ``alarm`` (``link.alarm``) and, with ``suspend``, suspend its link if it is active:
    the link and the reserved keys cut from it in the alarm's transaction (``link.suspended``),
    then its blocks in batches (``link.blocks_moved``), so an alarm on a link of tens of thousands
    of blocks does not hold the KME's write lock for seconds (issue 18)."""
    events = pool.EventBatch(datetime.now(UTC))
    actor = f"adapter:{alarm.link_id}"
    with db.write() as conn:
        entries: list[AuditEntry] = [
            (
                actor,
                "link.alarm",
                alarm.link_id,
                {"block_id": alarm.block_id, "code": code, "reason": alarm.reason[:300]},
            )
        ]
        suspended = suspend and links.link_state(conn, alarm.link_id) == "active"
        if suspended:
            n_keys = links.suspend_link_keys(conn, alarm.link_id, actor, f"alarm: {code}", events)
            entries.append((actor, "link.suspended", alarm.link_id, {"code": code, "keys": n_keys}))
        events.flush(conn)
        audit_recorder.append(conn, entries, events.at)
    if suspended:  # its blocks in short transactions, as an operator's suspension (D-22)
        live = (KeyState.ACTIVE, KeyState.PRE_ACTIVE)
        link_moves.move_blocks(
            db, alarm.link_id, "suspended", (live, KeyState.SUSPENDED), actor, "link suspended"
        )
