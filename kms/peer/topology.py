"""Where this KME can send key: its own links (read from its pool), every other KME's links from
their signed link-state records (``kms.peer.link_state``, kept by ``kms.service.link_state_store``
and flooded by ``kms.peer.flooding``), and routes over both (``routing``: Dijkstra, cost
``1 + needed/available``; suspended, down or short links skipped)."""

from __future__ import annotations

import itertools
import json
import time

import structlog

from kms.peer.client import PeerClient
from kms.peer.link_state import LinkStateRecord, RecordRejected
from kms.peer.routing import Edge, shortest_route, usable_graph
from kms.service.link_state_store import LinkStateStore
from kms.service.link_stock import LinkStock
from kms.storage.link_state_repository import StoredRecord
from kms.storage.peer_repository import LinkLevel

log = structlog.get_logger(__name__)


class Router:
    def __init__(self, stock: LinkStock, client: PeerClient, store: LinkStateStore, max_age: float) -> None:
        self.stock = stock
        self.kme_id = stock.site.kme_id
        self.client = client
        self.store = store
        self.max_age = max_age
        self._parsed: tuple[list[StoredRecord], list[LinkStateRecord]] | None = None

    # -- the graph ---------------------------------------------------------------------------------
    def own_edges(self) -> list[Edge]:
        """This KME's links as they are now (Get status, this KME's own record)."""
        return self._edges(self.stock.fresh())

    def _edges(self, levels: list[LinkLevel]) -> list[Edge]:
        """Own links; a link whose neighbour does not answer (this process's calls, or the record
        the leader process issued) is ``down``."""
        down = set(self.client.down_peers())
        for record in self._records():
            if record.origin == self.kme_id:
                down.update(a.peer for a in record.links if a.state == "down")
        now = time.time()
        return [
            Edge(
                self.kme_id,
                lv.peer_kme_id,
                lv.link_id,
                "down" if lv.state == "active" and lv.peer_kme_id in down else lv.state,
                lv.own_bits,
                now,
                lv.rate,
            )
            for lv in levels
        ]

    def _records(self) -> list[LinkStateRecord]:
        """The stored records, parsed once per reading of the store (they were verified on receipt)."""
        rows = self.store.records()
        parsed = self._parsed
        if parsed is not None and parsed[0] is rows:
            return parsed[1]
        records: list[LinkStateRecord] = []
        for row in rows:
            try:
                records.append(LinkStateRecord.from_json(json.loads(row.record)))
            except (RecordRejected, ValueError) as exc:
                log.warning("link_state_unreadable", origin=row.origin, error=str(exc)[:200])
        self._parsed = (rows, records)
        return records

    def others(self) -> list[Edge]:
        """Every other KME's links, from records their origins renewed within ``max_age``: a KME
        that stopped renewing its record (gone, or cut off) is routed around."""
        cutoff = time.time() - self.max_age
        return [
            e for r in self._records() if r.origin != self.kme_id and r.issued_at >= cutoff for e in r.edges()
        ]

    # -- routes ------------------------------------------------------------------------------------
    def route_to(
        self, target_kme_id: str, needed_bits: int, avoid: frozenset[str] = frozenset()
    ) -> list[str] | None:
        """Runs per request: on the stock as ``LinkStock`` last read it (``kms.service.link_stock``)."""
        own = self._edges(self.stock.levels())
        graph = usable_graph(own, self.others(), avoid - {self.kme_id})
        direct = [e for e in graph if e.src == self.kme_id and e.dst == target_kme_id]
        if any(e.state == "active" and e.bits >= needed_bits for e in direct):
            return [self.kme_id, target_kme_id]
        return shortest_route(graph, self.kme_id, target_kme_id, needed_bits)

    def available_keys(self, target_kme_id: str, key_size: int) -> int:
        """Keys of ``key_size`` the network could deliver to ``target_kme_id`` now (the route's narrowest hop)."""
        route = self.route_to(target_kme_id, key_size)
        if route is None:
            return 0
        # Get status reports this KME's own stock as it is now (routing may use the 0.5 s cache).
        edges = {(e.src, e.dst): e for e in [*self.others(), *self.own_edges()]}
        hops = [edges.get((a, b)) for a, b in itertools.pairwise(route)]
        return min((e.bits if e else 0) for e in hops) // key_size
