"""Shared blocks and their pieces (docs/ARCHITECTURE.md, "Multi-site"): the units behind block
confirmation (``blocks.announce``) and rebalancing (``pieces.claim``), both ends.

A shared block stays ``pre_active`` until the peer confirms it holds the same block; then it becomes
``active`` at both ends (``blocks.confirmed``; a block whose pieces differ is ``blocks.mismatched``).
An end that runs short claims untouched pieces of the other's; the peer grants only pieces it has
not cut from, under a row lock, so no bit is ever cut by both (``pieces.granted``). Each change is
one transaction with its audit record; a received message is remembered in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kms.service import audit_recorder
from kms.service.ingest import store_block
from kms.service.peer_context import PeerSite, Received, check_link, remember
from kms.storage import mirror_repository as mirrors
from kms.storage import pool_repository as pool
from kms.storage.mirror_repository import SharedBlock
from qkd_adapters.keyblock import KeyBlock


class PeerMirror:
    def __init__(self, site: PeerSite) -> None:
        self.site = site

    # -- announcing end ---------------------------------------------------------------------------
    def pending_blocks(self, link_id: str) -> list[SharedBlock]:
        """This end's shared blocks on ``link_id`` the peer has not confirmed yet."""
        with self.site.db.read() as conn:
            return mirrors.pending_blocks(conn, link_id)

    def confirmed(self, link_id: str, peer_id: str, confirmed: list[str], mismatched: Any) -> None:
        """The peer's answer to an announcement: activate what it confirmed; audit what differs."""
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        actor = f"kme:{peer_id}"
        with self.site.db.write() as conn:
            n = mirrors.activate_blocks(conn, link_id, confirmed, actor, events)
            events.flush(conn)
            entries: list[audit_recorder.AuditEntry] = []
            if n:
                entries.append((actor, "blocks.confirmed", link_id, {"block_ids": confirmed}))
            if mismatched:
                entries.append((actor, "blocks.mismatched", link_id, {"block_ids": mismatched}))
            audit_recorder.append(conn, entries, at)

    # -- confirming end ---------------------------------------------------------------------------
    def held_blocks(
        self, link_id: str, block_ids: Sequence[str], message: Received | None = None
    ) -> dict[str, SharedBlock]:
        """The announced blocks this end holds. With the announcing ``message``: remember it and check
        the link is one with its sender, in one transaction; without: a plain read (after the device
        delivered what was missing)."""
        if message is None:
            with self.site.db.read() as conn:
                return mirrors.blocks_by_id(conn, link_id, list(block_ids))
        with self.site.db.write() as conn:
            remember(conn, message)
            check_link(conn, link_id, message.sender)
            return mirrors.blocks_by_id(conn, link_id, list(block_ids))

    def store_fetched(self, block: KeyBlock, peer_kme_id: str) -> None:
        """A block the follower's device delivered for an announcement: stored already confirmed."""
        site = self.site
        store_block(site.db, site.envelope, site.cfg, site.kme_id, block, peer_kme_id, confirmed=True)

    def activate_announced(
        self,
        sender: str,
        link_id: str,
        announced: Mapping[str, Mapping[str, Any]],
        held: Mapping[str, SharedBlock],
    ) -> tuple[list[str], list[str], list[str]]:
        """Activate the announced blocks held here with the same pieces; (confirmed, pending,
        mismatched). Mismatches are audited."""
        confirmed, pending, mismatched = [], [], []
        for block_id, entry in announced.items():
            mine = held.get(block_id)
            if mine is None:
                pending.append(block_id)
            elif [list(p) for p in mine.pieces] == [list(p) for p in entry["pieces"]]:
                confirmed.append(block_id)
            else:
                mismatched.append(block_id)
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        with self.site.db.write() as conn:
            mirrors.activate_blocks(conn, link_id, confirmed, f"kme:{sender}", events)
            events.flush(conn)
            if mismatched:
                audit_recorder.record(
                    conn, f"kme:{sender}", "blocks.mismatched", link_id, {"block_ids": mismatched}, at
                )
        return confirmed, pending, mismatched

    # -- rebalancing ------------------------------------------------------------------------------
    def claimable(self, link_id: str, peer_id: str, bits: int) -> list[tuple[str, int]]:
        """Untouched pieces of the peer's worth about ``bits`` (what to ask for)."""
        with self.site.db.read() as conn:
            return mirrors.claimable_pieces(conn, link_id, peer_id, bits)

    def take_over(self, link_id: str, peer_id: str, granted: list[tuple[str, int]]) -> int:
        """Pieces the peer granted become this end's; how many."""
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        actor = f"kme:{peer_id}"
        with self.site.db.write() as conn:
            n = mirrors.take_over_pieces(conn, link_id, peer_id, granted, actor, events)
            events.flush(conn)
            if n:
                audit_recorder.record(
                    conn, actor, "pieces.granted", link_id, {"pieces": n, "to": self.site.kme_id}, at
                )
        return n

    def grant(self, message: Received, link_id: str, wanted: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """A peer's claim: grant the pieces of this end it has not cut from; the pieces granted."""
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        with self.site.db.write() as conn:
            remember(conn, message)
            check_link(conn, link_id, message.sender)
            granted = mirrors.grant_pieces(
                conn, link_id, message.sender, wanted, f"kme:{self.site.kme_id}", events
            )
            events.flush(conn)
            if granted:
                audit_recorder.record(
                    conn,
                    f"kme:{message.sender}",
                    "pieces.granted",
                    link_id,
                    {"pieces": len(granted), "to": message.sender},
                    at,
                )
        return granted
