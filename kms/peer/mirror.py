"""Shared blocks with adjacent KMEs, as messages: block confirmation (``blocks.announce``) and
rebalancing of pieces (``pieces.claim``). What each changes, and its audit, is
``kms.service.peer_mirror``; an ETSI 014 *follower* end fetches an announced block from its device
by the announcement's ``sync`` metadata.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from kms.config import PoolSection
from kms.peer.client import PeerClient, PeerError
from kms.peer.directory import PeerDirectory
from kms.peer.messages import MessageRejected, PeerMessage
from kms.service.link_stock import LinkStock
from kms.service.peer_mirror import PeerMirror
from qkd_adapters.keyblock import FollowerKeySource, KeyBlock, KeySourceError

log = structlog.get_logger(__name__)
ANNOUNCE_BACKOFF_MAX = 16.0


class Mirror:
    def __init__(
        self,
        stock: LinkStock,
        client: PeerClient,
        directory: PeerDirectory,
        followers: Mapping[str, FollowerKeySource],
    ) -> None:
        self.stock = stock
        self.site = site = stock.site
        self.cfg: PoolSection = site.cfg
        self.client = client
        self.directory = directory
        self.followers = followers
        self.units = PeerMirror(site)
        # Per link: the pending blocks last announced in vain, and when to try them again.
        self._unanswered: dict[str, tuple[frozenset[str], float, float]] = {}

    # -- block confirmation ---------------------------------------------------------------------
    def sync_once(self) -> int:
        """Announce this KME's unconfirmed blocks to each adjacent peer; activate what it confirms."""
        confirmed_total = 0
        for lv in self.stock.peer_links():
            peer = self.directory.get(lv.peer_kme_id)
            if peer is None or not peer.url or lv.state != "active":
                continue
            pending = self.units.pending_blocks(lv.link_id)
            if not pending or self._quiet(lv.link_id, pending):
                continue
            body = {
                "link_id": lv.link_id,
                "storage_block_bits": self.cfg.storage_block_bits,
                "blocks": [
                    {"block_id": p.block_id, "pieces": p.pieces, "sync": dict(p.sync)} for p in pending
                ],
            }
            try:
                reply = self.client.call(peer.kme_id, "blocks.announce", body)
            except PeerError as exc:
                log.info("block_announce_failed", peer=peer.kme_id, error=exc.reason)
                continue
            confirmed = [str(x) for x in reply.body.get("confirmed", [])]
            self.units.confirmed(lv.link_id, peer.kme_id, confirmed, reply.body.get("mismatched"))
            confirmed_total += len(confirmed)
            self._answered(lv.link_id, pending, bool(confirmed))
        return confirmed_total

    def _quiet(self, link_id: str, pending: Sequence[Any]) -> bool:
        """Whether to leave these pending blocks unannounced for now: the peer confirmed none of the
        very same blocks last time (it has not made them yet; a full pool at its end), so they are
        announced again after a pause that doubles up to ``ANNOUNCE_BACKOFF_MAX`` seconds, not every
        ``sync_seconds`` (an idle link's announcements were most of an idle KME's messages)."""
        last = self._unanswered.get(link_id)
        if last is None or last[0] != frozenset(p.block_id for p in pending):
            return False
        return time.monotonic() < last[1]

    def _answered(self, link_id: str, pending: Sequence[Any], progress: bool) -> None:
        if progress:
            self._unanswered.pop(link_id, None)
            return
        ids = frozenset(p.block_id for p in pending)
        last = self._unanswered.get(link_id)
        pause = min(ANNOUNCE_BACKOFF_MAX, 2 * last[2]) if last is not None and last[0] == ids else 1.0
        self._unanswered[link_id] = (ids, time.monotonic() + pause, pause)

    def on_announce(self, message: PeerMessage) -> dict[str, Any]:
        b = message.body
        link_id = str(b["link_id"])
        if int(b["storage_block_bits"]) != self.cfg.storage_block_bits:
            raise MessageRejected(
                f"pool.storage_block_bits differs ({message.sender}: {b['storage_block_bits']}, "
                f"{self.site.kme_id}: {self.cfg.storage_block_bits}); both ends must split blocks alike"
            )
        announced = {str(x["block_id"]): x for x in b["blocks"]}
        held = self.units.held_blocks(link_id, list(announced), message)
        follower = self.followers.get(link_id)
        if follower is not None:
            for block_id in [k for k in announced if k not in held]:
                self._fetch_from_device(follower, message.sender, announced[block_id])
            held = self.units.held_blocks(link_id, list(announced))
        confirmed, pending, mismatched = self.units.activate_announced(
            message.sender, link_id, announced, held
        )
        return {"confirmed": confirmed, "pending": pending, "mismatched": mismatched}

    def _fetch_from_device(
        self, follower: FollowerKeySource, peer_kme_id: str, entry: dict[str, Any]
    ) -> None:
        bit_length = sum(int(p[1]) for p in entry["pieces"])
        try:
            got = follower.fetch_announced(str(entry["block_id"]), bit_length, dict(entry.get("sync") or {}))
        except KeySourceError as exc:
            log.warning("follower_fetch_failed", link_id=follower.link_id, error=str(exc)[:200])
            return
        if isinstance(got, KeyBlock):
            self.units.store_fetched(got, peer_kme_id)
        else:
            log.warning("follower_fetch_alarm", link_id=got.link_id, reason=got.reason[:200])

    # -- rebalancing ----------------------------------------------------------------------------
    def rebalance_once(self) -> int:
        """Ask each adjacent peer for untouched pieces when this end runs short.

        Shared blocks start split half and half; with traffic mostly one way, the busy end would run
        dry while the other end's half sits idle (and the device's key would be wasted). When this
        end's own stock on a link falls below a quarter of its mirror of the peer's pieces, it asks
        for untouched pieces worth half the difference; the peer grants only pieces it has not cut
        from, under a row lock, so no bit is ever cut by both. Returns the bits taken over.
        """
        gained = 0
        # A fresh reading (twice a second at most, and it refreshes the routers' reading too): a
        # stale one could claim again pieces this end was just granted.
        for lv in self.stock.fresh():
            peer = self.directory.get(lv.peer_kme_id)
            if peer is None or not peer.url or lv.state != "active" or lv.own_bits * 4 >= lv.mirror_bits:
                continue
            wanted = self.units.claimable(lv.link_id, peer.kme_id, (lv.mirror_bits - lv.own_bits) // 2)
            if not wanted:
                continue
            try:
                reply = self.client.call(
                    peer.kme_id, "pieces.claim", {"link_id": lv.link_id, "pieces": [list(w) for w in wanted]}
                )
            except PeerError as exc:
                log.info("piece_claim_failed", peer=peer.kme_id, error=exc.reason)
                continue
            granted = [(str(b), int(o)) for b, o in reply.body.get("granted", [])]
            gained += self.units.take_over(lv.link_id, peer.kme_id, granted)
        return gained

    def on_claim(self, message: PeerMessage) -> dict[str, Any]:
        link_id = str(message.body["link_id"])
        wanted = [(str(b), int(o)) for b, o in message.body["pieces"]][:256]
        granted = self.units.grant(message, link_id, wanted)
        return {"granted": [list(g) for g in granted]}
