"""Routes over the QKD network's link graph, for trusted-node relay.

Each KME knows its own links (state, and the key bits it may cut on each) and every other KME's
from their signed link-state records (``kms.peer.link_state``, flooded by ``kms.peer.topology``). A
route is the cheapest path by a cost that prefers links with more key in stock and skips links that
are suspended, down or cannot carry the key at all (Dijkstra; docs/ARCHITECTURE.md, "Relay").
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Edge:
    """A link as seen from ``src``: ``bits`` is what ``src`` can cut on it toward ``dst``."""

    src: str
    dst: str
    link_id: str
    state: str
    bits: int
    at: float = 0.0
    rate: int | None = None  # own key bits/s the link delivered lately; None: not reported

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "link_id": self.link_id,
            "state": self.state,
            "bits": self.bits,
            "at": self.at,
            "rate": self.rate,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Edge:
        rate = d.get("rate")
        return Edge(
            str(d["src"]),
            str(d["dst"]),
            str(d["link_id"]),
            str(d["state"]),
            int(d["bits"]),
            float(d["at"]),
            None if rate is None else int(rate),
        )


REFILL_HORIZON_SECONDS = 60.0


def edge_cost(edge: Edge, needed_bits: int) -> float | None:
    """One hop, plus two penalties of at most 1 each (docs/DECISIONS.md D-26): the share of the
    link's stock the key takes, and the share of a minute of the link's key rate it takes to make
    that up again (1 for a link that delivers nothing; none when the rate is not reported). So a
    hop more outweighs a slow link but not a link nearly empty and delivering nothing; between
    routes of as many hops, the one with more stock and faster refill wins. None if the link
    cannot carry the key."""
    if edge.state != "active" or edge.bits < needed_bits:
        return None
    if not needed_bits:
        return 1.0  # a control message needs no bits
    cost = 1.0 + needed_bits / edge.bits
    if edge.rate is not None:
        cost += min(1.0, needed_bits / (edge.rate * REFILL_HORIZON_SECONDS)) if edge.rate > 0 else 1.0
    return cost


def shortest_route(edges: Iterable[Edge], source: str, target: str, needed_bits: int) -> list[str] | None:
    graph: dict[str, list[tuple[str, float]]] = {}
    for e in edges:
        cost = edge_cost(e, needed_bits)
        if cost is not None:
            graph.setdefault(e.src, []).append((e.dst, cost))
    best: dict[str, float] = {source: 0.0}
    previous: dict[str, str] = {}
    queue: list[tuple[float, str]] = [(0.0, source)]
    while queue:
        cost, node = heapq.heappop(queue)
        if node == target:
            path = [target]
            while path[-1] != source:
                path.append(previous[path[-1]])
            return path[::-1]
        if cost > best.get(node, float("inf")):
            continue
        for nxt, step in graph.get(node, ()):
            total = cost + step
            if total < best.get(nxt, float("inf")):
                best[nxt] = total
                previous[nxt] = node
                heapq.heappush(queue, (total, nxt))
    return None


def usable_graph(own: Iterable[Edge], others: Iterable[Edge], avoid: frozenset[str]) -> list[Edge]:
    """The edges a route may use: this KME's own and what other KMEs' records say, less any edge
    into or out of a KME to avoid (a next hop that just failed), and less any link its far end
    reports not ``active`` (both ends must agree, as OSPF's two-way check: a link suspended only at
    its far end refuses every relay over it)."""
    edges = [*own, *others]
    far_end = {(e.src, e.link_id): e.state for e in edges}
    return [
        e
        for e in edges
        if e.src not in avoid and e.dst not in avoid and far_end.get((e.dst, e.link_id), "active") == "active"
    ]
