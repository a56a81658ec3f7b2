"""Link-state records (DECISIONS.md D-26): signed by their origin, refused when altered, forged or
malformed; stored only when newer, on SQLite and PostgreSQL; routes skip down links and avoided KMEs.

Real identities: three sites made by ``qkms init`` with exchanged bundles (``kms.lab.pilot``), their
KME code built in this process on their own databases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.config import KmsSettings
from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network
from kms.peer.link_state import (
    MAX_LINKS,
    LinkAdvert,
    LinkStateRecord,
    RecordRejected,
    sign_record,
    verify_record,
)
from kms.peer.routing import Edge, edge_cost, shortest_route, usable_graph
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.service.link_state_store import LinkStateStore
from kms.service.link_stock import KeyRateMeter
from kms.storage import migrate
from kms.storage.database import Database
from kms.storage.link_state_repository import StoredRecord
from kms.storage.pool_repository import stored_bits_by_link
from tests.conftest import database_url


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Runtime]]:
    """KME-A and KME-B know each other; KME-C knows neither (its bundle is not added to B below)."""
    root = tmp_path_factory.mktemp("link-state")
    sites = prepare_network(
        root,
        [SiteSpec("KME-A", ("SAE-A",)), SiteSpec("KME-B", ("SAE-B",)), SiteSpec("KME-C", ("SAE-C",))],
        [LinkSpec("link-ab", "KME-A", "KME-B"), LinkSpec("link-bc", "KME-B", "KME-C")],
    )
    out = {k: build_runtime(KmsSettings.load(s.config_path), sync_registry=False) for k, s in sites.items()}
    try:
        yield out
    finally:
        for rt in out.values():
            rt.close()


def record_of(rt: Runtime, links: tuple[LinkAdvert, ...] = (), seq: int = 1) -> LinkStateRecord:
    return sign_record(rt.identity, LinkStateRecord(rt.settings.kme.id, seq, time.time(), links))


def directory(rt: Runtime):  # type: ignore[no-untyped-def]
    assert rt.network is not None
    return rt.network.directory


LINKS = (LinkAdvert("KME-B", "link-ab", "active", 65536), LinkAdvert("KME-X", "link-ax", "down", 0))


def test_a_record_signed_by_its_origin_verifies_at_a_peer_and_survives_json(
    runtimes: dict[str, Runtime],
) -> None:
    a, b = runtimes["KME-A"], runtimes["KME-B"]
    record = record_of(a, LINKS)
    again = LinkStateRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    verify_record(again, directory(b), b.identity)  # B checks A's record with A's key from its bundle
    verify_record(again, directory(a), a.identity)  # and A its own
    assert [(e.src, e.dst, e.state, e.bits) for e in again.edges()] == [
        ("KME-A", "KME-B", "active", 65536),
        ("KME-A", "KME-X", "down", 0),
    ]


@pytest.mark.parametrize(
    "alter",
    [
        lambda r: replace(r, links=(replace(r.links[0], bits=r.links[0].bits * 1000), r.links[1])),
        lambda r: replace(r, links=(replace(r.links[0], state="suspended"), r.links[1])),
        lambda r: replace(r, links=r.links[:1]),
        lambda r: replace(r, seq=r.seq + 1),
        lambda r: replace(r, issued_at=r.issued_at + 60),
    ],
    ids=["stock", "state", "link-dropped", "seq", "time"],
)
def test_a_record_altered_on_the_way_is_refused(runtimes: dict[str, Runtime], alter) -> None:  # type: ignore[no-untyped-def]
    a, b = runtimes["KME-A"], runtimes["KME-B"]
    with pytest.raises(RecordRejected, match="does not verify"):
        verify_record(alter(record_of(a, LINKS)), directory(b), b.identity)


def test_a_trusted_node_cannot_forge_another_kmes_record(runtimes: dict[str, Runtime]) -> None:
    a, b, c = runtimes["KME-A"], runtimes["KME-B"], runtimes["KME-C"]
    # B signs a record in A's name (claiming A's links are all down): A's key does not verify it.
    forged = sign_record(b.identity, LinkStateRecord("KME-A", 10**15, time.time(), LINKS))
    with pytest.raises(RecordRejected):
        verify_record(forged, directory(c), c.identity)
    # Nor may anyone pass this KME a record in its own name that it did not sign.
    with pytest.raises(RecordRejected, match="did not sign"):
        verify_record(forged, directory(a), a.identity)


def test_a_record_of_a_kme_whose_key_is_unknown_is_not_believed(
    runtimes: dict[str, Runtime], tmp_path: Path
) -> None:
    a = runtimes["KME-A"]
    # A stranger with a real identity of its own: a fourth site nobody added.
    stranger_site = prepare_network(tmp_path, [SiteSpec("KME-Z", ("SAE-Z",))], [])["KME-Z"]
    stranger = build_runtime(KmsSettings.load(stranger_site.config_path), sync_registry=False)
    try:
        record = sign_record(stranger.identity, LinkStateRecord("KME-Z", 1, time.time(), ()))
        with pytest.raises(RecordRejected, match="no key of KME-Z"):
            verify_record(record, directory(a), a.identity)
    finally:
        stranger.close()


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"seq": "many"}, "not a valid"),
        ({"links": [["KME-B", "l", "exploded", 1]]}, "state is one of"),
        ({"links": [["KME-B", "l", "active", -1]]}, "not negative"),
        ({"links": [["KME-B", "l", "active", 1]] * (MAX_LINKS + 1)}, "0 to 256 links"),
        ({"origin": "K" * 65}, "1 to 64"),
        ({"seq": -5}, "positive"),
        ({"signature": "%%%"}, "not a valid"),
        ({"links": "KME-B"}, "0 to 256 links"),
    ],
)
def test_malformed_records_are_refused_with_a_reason(
    runtimes: dict[str, Runtime], data: dict[str, object], reason: str
) -> None:
    good = record_of(runtimes["KME-A"], LINKS).to_json()
    with pytest.raises(RecordRejected, match=reason):
        LinkStateRecord.from_json({**good, **data})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LinkStateStore]:
    url = database_url(request.param, request) or f"sqlite:///{tmp_path / 'ls.db'}"
    migrate.upgrade(url)
    db = Database(url)
    try:
        yield LinkStateStore(db, max_age=0)
    finally:
        db.dispose()


def test_the_store_keeps_only_the_newest_record_per_kme(store: LinkStateStore) -> None:
    def rec(origin: str, seq: int) -> StoredRecord:
        return StoredRecord(origin, seq, 1_700_000_000.0 + seq, json.dumps({"seq": seq}))

    assert store.store([rec("KME-A", 5), rec("KME-B", 1)]) == [True, True]
    assert store.store([rec("KME-A", 5), rec("KME-A", 4), rec("KME-B", 2)]) == [False, False, True]
    assert store.store([rec("KME-A", 9)]) == [True]
    assert {(r.origin, r.seq) for r in store.records()} == {("KME-A", 9), ("KME-B", 2)}
    # Records their origins stopped renewing are dropped.
    assert store.forget_issued_before(1_700_000_000.0 + 5) == 1
    assert [r.origin for r in store.records()] == ["KME-A"]


def test_routes_skip_down_and_suspended_links_and_avoided_kmes() -> None:
    now = datetime.now(UTC).timestamp()

    def edge(a: str, b: str, state: str = "active", bits: int = 10_000) -> list[Edge]:
        return [Edge(a, b, f"{a}{b}", state, bits, now), Edge(b, a, f"{a}{b}", state, bits, now)]

    ring = [*edge("A", "B"), *edge("B", "C"), *edge("A", "E"), *edge("E", "D"), *edge("D", "C")]
    assert shortest_route(ring, "A", "C", 256) == ["A", "B", "C"]
    assert shortest_route(usable_graph([], ring, frozenset({"B"})), "A", "C", 256) == ["A", "E", "D", "C"]
    down = [e if e.dst != "B" else replace(e, state="down") for e in ring]
    assert shortest_route(down, "A", "C", 256) == ["A", "E", "D", "C"]
    short = [e if e.link_id != "ED" else replace(e, bits=100) for e in down]
    assert shortest_route(short, "A", "C", 256) is None
    # A link suspended only at its far end (C says C-B is suspended, B still says active) is avoided.
    far = [e if (e.src, e.dst) != ("C", "B") else replace(e, state="suspended") for e in ring]
    assert shortest_route(far, "A", "C", 256) == ["A", "B", "C"]  # Dijkstra alone would use it
    assert shortest_route(usable_graph([], far, frozenset()), "A", "C", 256) == ["A", "E", "D", "C"]


def test_between_routes_of_as_many_hops_the_faster_refilling_one_wins() -> None:
    """Route cost by stock and key rate (issue 18; D-26): equal stock on A-B-D and A-C-D, but the
    links through C deliver 100 times more key a second; a link that delivers nothing costs most;
    a KME that reports no rate is ranked by stock only; a hop more costs more than a slow link,
    less than a link nearly empty and delivering nothing."""
    now = time.time()

    def both(a: str, b: str, bits: int, rate: int | None) -> list[Edge]:
        return [Edge(a, b, a + b, "active", bits, now, rate), Edge(b, a, a + b, "active", bits, now, rate)]

    square = [*both("A", "B", 50_000, 100), *both("B", "D", 50_000, 100)]
    square += [*both("A", "C", 50_000, 10_000), *both("C", "D", 50_000, 10_000)]
    assert shortest_route(square, "A", "D", 4096) == ["A", "C", "D"]
    stalled = [e if "C" not in (e.src, e.dst) else replace(e, rate=0) for e in square]
    assert shortest_route(stalled, "A", "D", 4096) == ["A", "B", "D"]
    unreported = [replace(e, rate=None) for e in square]
    richer = [e if "B" not in (e.src, e.dst) else replace(e, bits=500_000) for e in unreported]
    assert shortest_route(richer, "A", "D", 4096) == ["A", "B", "D"]  # stock alone decides
    direct = [*square, *both("A", "D", 50_000, 100)]
    assert shortest_route(direct, "A", "D", 4096) == ["A", "D"]  # one slow hop beats two fast ones
    dying = [*square, *both("A", "D", 5_000, 0)]  # but not a link nearly empty and delivering nothing
    assert shortest_route(dying, "A", "D", 4096) == ["A", "C", "D"]
    assert edge_cost(Edge("A", "D", "AD", "active", 5_000, now, 0), 0) == 1.0  # control messages


def test_rates_are_signed_and_records_without_them_still_verify(runtimes: dict[str, Runtime]) -> None:
    a, b = runtimes["KME-A"], runtimes["KME-B"]
    rated = (LinkAdvert("KME-B", "link-ab", "active", 65536, 12_000),)
    record = record_of(a, rated)
    again = LinkStateRecord.from_json(json.loads(json.dumps(record.to_json())))
    verify_record(again, directory(b), b.identity)
    assert [e.rate for e in again.edges()] == [12_000]
    with pytest.raises(RecordRejected, match="does not verify"):  # the rate is under the signature
        verify_record(replace(again, links=(replace(again.links[0], rate=10**9),)), directory(b), b.identity)
    # A record from a KME that reports no rate keeps 4-element links and verifies as before.
    old = record_of(a, (LinkAdvert("KME-B", "link-ab", "active", 65536),))
    assert [len(link) for link in old.to_json()["links"]] == [4]
    verify_record(LinkStateRecord.from_json(old.to_json()), directory(b), b.identity)
    with pytest.raises(RecordRejected):
        LinkStateRecord.from_json({**old.to_json(), "links": [["KME-B", "link-ab", "active", 1, -5]]})


def test_the_key_rate_meter_reads_own_blocks_stored_since_the_last_reading(tmp_path: Path) -> None:
    res = init_workdir(tmp_path / "kme", "KME-R", ["SAE-M", "SAE-S"], link_source="random")
    rt = build_runtime(KmsSettings.load(res.config_path))
    try:
        meter = KeyRateMeter()
        with rt.db.read() as conn:
            assert meter.read(conn, 1000.0) == {}  # a first reading only marks where it starts
        rt.make_filler().fill_once()
        with rt.db.read() as conn:
            stored = stored_bits_by_link(conn)
            assert meter.read(conn, 1002.0) == {}  # two seconds are too short to tell
            rates = meter.read(conn, 1010.0)
            assert meter.read(conn, 1100.0) == {link: 0 for link in stored}  # nothing new for a minute
    finally:
        rt.close()
    assert stored and rates == {link: round(bits / 10) for link, bits in stored.items()}


def test_the_consoles_topology_reads_records_with_and_without_rates(runtimes: dict[str, Runtime]) -> None:
    """The console drew no edge at all for records with rates (a 5-element link failed to unpack
    and the page showed an empty graph)."""
    from kms.service.console_view import _edges_of

    a = runtimes["KME-A"]
    rated = record_of(a, (LinkAdvert("KME-B", "link-ab", "active", 65536, 12_000),))
    plain = record_of(a, (LinkAdvert("KME-B", "link-ab", "suspended", 0),))
    for record, state in ((rated, "active"), (plain, "suspended")):
        edges = _edges_of("KME-A", json.dumps(record.to_json()))
        assert [(e.origin, e.peer, e.link_id, e.state) for e in edges] == [
            ("KME-A", "KME-B", "link-ab", state)
        ]
