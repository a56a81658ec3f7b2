"""Where this KME can send key: its own links (read from its pool), what adjacent KMEs report of
theirs (``topology`` messages), and routes over both (``routing``: Dijkstra, cost
``1 + needed/available``, suspended or short links skipped)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import structlog

from kms.peer.client import PeerClient, PeerError
from kms.peer.directory import PeerDirectory
from kms.peer.messages import PeerMessage
from kms.peer.routing import Edge, Topology
from kms.service.link_stock import LinkStock
from kms.service.peer_context import remember_alone
from kms.storage.peer_repository import LinkLevel

log = structlog.get_logger(__name__)


class Router:
    def __init__(
        self, stock: LinkStock, client: PeerClient, directory: PeerDirectory, topology: Topology
    ) -> None:
        self.stock = stock
        self.kme_id = stock.site.kme_id
        self.client = client
        self.directory = directory
        self.topology = topology

    def own_edges(self) -> list[Edge]:
        """This KME's links as they are now (a peer's topology request, Get status)."""
        return self._edges(self.stock.fresh())

    def _edges(self, levels: list[LinkLevel]) -> list[Edge]:
        now = time.time()
        return [Edge(self.kme_id, lv.peer_kme_id, lv.link_id, lv.state, lv.own_bits, now) for lv in levels]

    def refresh_topology(self) -> None:
        """Ask every adjacent KME for the links it knows (its own and what it learned)."""
        for peer in self.directory.adjacent():
            try:
                reply = self.client.call(peer.kme_id, "topology", {})
                self.topology.learn(Edge.from_json(e) for e in reply.body.get("edges", []))
            except (PeerError, KeyError, TypeError, ValueError) as exc:
                log.info("topology_refresh_failed", peer=peer.kme_id, error=str(exc)[:200])
        self.topology.mark_refreshed()

    def route_to(self, target_kme_id: str, needed_bits: int) -> list[str] | None:
        """Runs per request: on the stock as ``LinkStock`` last read it (``kms.service.link_stock``)."""
        own = self._edges(self.stock.levels())
        if any(e.dst == target_kme_id and e.state == "active" and e.bits >= needed_bits for e in own):
            return [self.kme_id, target_kme_id]
        return self.topology.route(own, target_kme_id, needed_bits, refresh=self.refresh_topology)

    def available_keys(self, target_kme_id: str, key_size: int) -> int:
        """Keys of ``key_size`` the network could deliver to ``target_kme_id`` now (the route's narrowest hop)."""
        route = self.route_to(target_kme_id, key_size)
        if route is None:
            return 0
        # Get status reports this KME's own stock as it is now (routing may use the 0.5 s cache).
        edges = {(e.src, e.dst): e for e in [*self.topology.learned(), *self.own_edges()]}
        hops = [edges.get((a, b)) for a, b in itertools.pairwise(route)]
        return min((e.bits if e else 0) for e in hops) // key_size

    def on_topology(self, message: PeerMessage) -> dict[str, Any]:
        remember_alone(self.stock.site.db, message)
        return {"edges": [e.to_json() for e in [*self.own_edges(), *self.topology.learned()]]}
