"""Topology files: a QKD network of trusted nodes as ``qkms pilot network`` and ``bench_relay`` start it.

A topology is TOML: ``[[nodes]]`` (``id``, optional ``name``) and ``[[links]]`` (``a``, ``b``,
``length_km``, ``estimate`` when the length is not published). Each link runs as a paired ``random``
source (both ends expand one seed; never a substitute for a device) paced at the secret key rate a
decoy-state BB84 link of that fibre length would give: the analytic weak+vacuum decoy rate of the
``[defaults] preset`` (``qkd_adapters.sim.analytic``, Ma, Qi, Zhao and Lo 2005), capped by
``max_rate_bps``. So the stock and rate each hop advertises follow the physics of its length, at the
cost of one AES-CTR stream per link end instead of a full simulation per link.

Shipped topologies (``kms/lab/topologies/``): the Beijing-Shanghai backbone, SECOQC Vienna and the
DARPA Quantum Network; ``chain:N`` and ``ring:N`` build uniform ones.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kms.lab.pilot import LinkSpec, SiteSpec

TOPOLOGIES = Path(__file__).with_name("topologies")
DEFAULT_PRESET = "snspd-modern"
DEFAULT_BLOCK_BITS = 1 << 20
DEFAULT_MAX_RATE_BPS = 4e6


class TopologyError(ValueError):
    """A topology file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Node:
    id: str
    name: str = ""


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    length_km: float
    estimate: bool = True

    @property
    def id(self) -> str:
        return f"link-{self.a}-{self.b}"


@dataclass(frozen=True)
class NetworkTopology:
    name: str
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    preset: str = DEFAULT_PRESET
    block_bits: int = DEFAULT_BLOCK_BITS
    max_rate_bps: float = DEFAULT_MAX_RATE_BPS
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def sae(self, node_id: str) -> str:
        """The one SAE each node serves (the pilot's applications)."""
        return f"SAE-{node_id}"

    def link_rate_bps(self, link: Link) -> float:
        """Secret key bits per second of a ``preset`` decoy BB84 link of ``link.length_km``."""
        from qkd_adapters.sim import analytic
        from qkd_adapters.sim.params import load_preset

        params = load_preset(self.preset, length_km=link.length_km)
        rate = analytic.key_rate_weak_vacuum(params) * params.clock_rate_hz
        if rate <= 0:
            raise TopologyError(
                f"{link.id}: no secret key at {link.length_km:g} km with preset {self.preset}"
            )
        return min(rate, self.max_rate_bps)

    def specs(self, databases: dict[str, str | None] | None = None) -> tuple[list[SiteSpec], list[LinkSpec]]:
        """The sites and links ``kms.lab.pilot.prepare_network`` makes of this topology."""
        dbs = databases or {}
        sites = [SiteSpec(n.id, (self.sae(n.id),), dbs.get(n.id)) for n in self.nodes]
        links = [
            LinkSpec(
                lk.id,
                lk.a,
                lk.b,
                options={"block_bits": self.block_bits, "rate_bps": round(self.link_rate_bps(lk), 3)},
            )
            for lk in self.links
        ]
        return sites, links


def uniform(kind: str, count: int, length_km: float = 50.0) -> NetworkTopology:
    """``chain`` or ``ring`` of ``count`` nodes, every link ``length_km`` long (``chain:N:KM``)."""
    if kind not in ("chain", "ring") or not 2 <= count <= 64 or (kind == "ring" and count < 3):
        raise TopologyError("use chain:N (2 to 64 nodes) or ring:N (3 to 64 nodes)")
    if not 0 < length_km <= 500:
        raise TopologyError("a link is 0 to 500 km long")
    width = len(str(count - 1))
    nodes = tuple(Node(f"KME-{i:0{width}d}") for i in range(count))
    pairs = [(i, i + 1) for i in range(count - 1)] + ([(count - 1, 0)] if kind == "ring" else [])
    links = tuple(Link(nodes[i].id, nodes[j].id, length_km, estimate=False) for i, j in pairs)
    return NetworkTopology(f"{kind} of {count}", nodes, links)


def load_topology(name_or_path: str) -> NetworkTopology:
    """A shipped topology by name, ``chain:N`` / ``ring:N``, or a TOML file."""
    kind, _, rest = name_or_path.partition(":")
    count, _, km = rest.partition(":")
    if kind in ("chain", "ring") and count.isdigit():
        try:
            return uniform(kind, int(count)) if not km else uniform(kind, int(count), float(km))
        except ValueError as exc:
            raise TopologyError(f"{name_or_path}: use {kind}:N or {kind}:N:KM (link length in km)") from exc
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = TOPOLOGIES / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        shipped = ", ".join(sorted(p.stem for p in TOPOLOGIES.glob("*.toml")))
        raise TopologyError(f"no topology {name_or_path!r} (shipped: {shipped}; or chain:N, ring:N)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: not valid TOML ({exc})") from exc
    return _parse(data, str(path))


def _parse(data: dict[str, Any], where: str) -> NetworkTopology:
    try:
        nodes = tuple(Node(str(n["id"]), str(n.get("name", ""))) for n in data["nodes"])
        links = tuple(
            Link(str(lk["a"]), str(lk["b"]), float(lk["length_km"]), bool(lk.get("estimate", True)))
            for lk in data["links"]
        )
        defaults = data.get("defaults", {})
        topology = NetworkTopology(
            str(data.get("name", where)),
            nodes,
            links,
            preset=str(defaults.get("preset", DEFAULT_PRESET)),
            block_bits=int(defaults.get("block_bits", DEFAULT_BLOCK_BITS)),
            max_rate_bps=float(defaults.get("max_rate_bps", DEFAULT_MAX_RATE_BPS)),
            source=str(data.get("source", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TopologyError(f"{where}: nodes need an id, links a, b and length_km ({exc})") from exc
    ids = [n.id for n in topology.nodes]
    if len(set(ids)) != len(ids):
        raise TopologyError(f"{where}: node IDs repeat")
    for lk in topology.links:
        if lk.a not in ids or lk.b not in ids or lk.a == lk.b:
            raise TopologyError(f"{where}: link {lk.a}-{lk.b} does not join two different nodes of the file")
        if not 0 < lk.length_km <= 500:
            raise TopologyError(f"{where}: link {lk.a}-{lk.b} is {lk.length_km:g} km (0 to 500)")
    return topology
