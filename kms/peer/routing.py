"""Routes over the QKD network's link graph, for trusted-node relay.

Each KME knows its own links (state, and the key bits it may cut on each) and learns its neighbours'
by asking them (``topology`` messages); what a neighbour reports includes what it learned, so link
state spreads hop by hop. A route is the cheapest path by a cost that prefers links with more key
in stock and skips links that are suspended or cannot carry the key at all (Dijkstra).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable
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
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "link_id": self.link_id,
            "state": self.state,
            "bits": self.bits,
            "at": self.at,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Edge:
        return Edge(
            str(d["src"]), str(d["dst"]), str(d["link_id"]), str(d["state"]), int(d["bits"]), float(d["at"])
        )


def edge_cost(edge: Edge, needed_bits: int) -> float | None:
    """One hop, plus a penalty that grows as the link's stock nears what the key needs; None if unusable."""
    if edge.state != "active" or edge.bits < needed_bits:
        return None
    return 1.0 + needed_bits / edge.bits


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


class Topology:
    """This KME's view of the network: its own edges (read fresh) and what neighbours reported."""

    def __init__(self, kme_id: str, max_age: float = 2.0, forget_after: float = 60.0) -> None:
        self.kme_id = kme_id
        self.max_age = max_age
        self.forget_after = forget_after
        self._learned: dict[tuple[str, str], Edge] = {}
        self._refreshed = 0.0
        self._lock = threading.Lock()

    def learn(self, edges: Iterable[Edge]) -> None:
        with self._lock:
            for e in edges:
                if e.src == self.kme_id:
                    continue  # our own links are always read fresh
                known = self._learned.get((e.src, e.link_id))
                if known is None or known.at < e.at:
                    self._learned[(e.src, e.link_id)] = e

    def learned(self) -> list[Edge]:
        cutoff = time.time() - self.forget_after
        with self._lock:
            return [e for e in self._learned.values() if e.at >= cutoff]

    def stale(self) -> bool:
        return time.monotonic() - self._refreshed > self.max_age

    def mark_refreshed(self) -> None:
        self._refreshed = time.monotonic()

    def route(
        self, own: list[Edge], target: str, needed_bits: int, refresh: Callable[[], None] | None = None
    ) -> list[str] | None:
        if refresh is not None and self.stale():
            refresh()
        return shortest_route([*own, *self.learned()], self.kme_id, target, needed_bits)
