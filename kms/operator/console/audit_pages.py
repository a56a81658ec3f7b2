"""The console's sign-in, topology and audit pages, and its error page."""

from __future__ import annotations

import json
from typing import Any

from kms.config import KmsSettings
from kms.domain.audit_chain import AuditRecord
from kms.operator.console import svg
from kms.operator.console.html import Html, join, table, tag, void
from kms.operator.console.html import duration as fmt_duration
from kms.operator.console.layout import notice, page
from kms.service.console_auth import Viewer
from kms.service.console_view import Edge
from kms.service.operator_metrics import DbFigures


def login_page(kme_id: str, login_csrf: str, message: str | None) -> Html:
    form = tag(
        "form",
        void("input", type="hidden", name="csrf", value=login_csrf),
        tag(
            "label",
            "account",
            void("input", type="text", name="name", id="name", autocomplete="username", required=True),
        ),
        tag(
            "label",
            "password",
            void(
                "input",
                type="password",
                name="password",
                id="password",
                autocomplete="current-password",
                required=True,
            ),
        ),
        tag("p", void("input", type="submit", value="sign in", id="sign-in")),
        method="post",
        action="/console/login",
        class_="login",
    )
    return page("Sign in", join([notice(message, refusal=True), form]), None, kme_id)


def error_page(kme_id: str, viewer: Viewer | None, message: str) -> Html:
    back = tag("p", tag("a", "back to the overview", href="/console/")) if viewer else Html("")
    return page("Refused", join([notice(message, refusal=True), back]), viewer, kme_id)


def topology_page(
    edges: list[Edge], figures: DbFigures, settings: KmsSettings, peers_down: frozenset[str], viewer: Viewer
) -> Html:
    me = settings.kme.id
    seen: dict[tuple[str, str, str], Edge] = {}
    for e in edges:  # one line per link: both ends advertise it; a non-active end wins
        key = (min(e.origin, e.peer), max(e.origin, e.peer), e.link_id)
        if key not in seen or seen[key].state == "active":
            seen[key] = e
    nodes = sorted(
        {me} | {e.origin for e in edges} | {e.peer for e in edges} | {p.kme_id for p in settings.peers}
    )
    lines = [(a, b, link, e.state) for (a, b, link), e in sorted(seen.items())]
    peers = table(
        ["peer KME", "adjacent", "reachable", "newest message"],
        [
            [
                p.kme_id,
                "yes" if p.url else "relay only",
                ("down" if p.kme_id in peers_down else "up") if p.url else "-",
                fmt_duration(figures.peer_message_age_seconds.get(p.kme_id)) + " ago"
                if p.kme_id in figures.peer_message_age_seconds
                else "none",
            ]
            for p in settings.peers
        ],
        "peers",
    )
    link_rows = [
        [e.origin, e.peer, e.link_id, e.state, e.bits]
        for e in sorted(edges, key=lambda e: (e.origin, e.link_id))
    ]
    body = join(
        [
            tag(
                "p",
                "Links as each KME's newest link-state record says; this KME's from its own store.",
                class_="muted",
            ),
            svg.graph(nodes, lines, me),
            tag("h2", "Peer KMEs"),
            peers if settings.peers else tag("p", "No peer KMEs configured.", id="peers"),
            tag("h2", "Links advertised"),
            table(["KME", "toward", "link", "state", "bits it can cut"], link_rows, "advertised"),
        ]
    )
    return page("Peers and topology", body, viewer, me, "topology")


def audit_page(
    kme_id: str,
    viewer: Viewer,
    report: dict[str, Any],
    figures: DbFigures,
    records: list[AuditRecord],
    lookup: tuple[str, dict[str, Any] | None] | None,
) -> Html:
    status = "verified" if report["ok"] else "PROBLEMS FOUND"
    facts = table(
        ["chain", "records", "valid checkpoints", "last signed record", "unsigned tail", "anchors checked"],
        [
            [
                tag(
                    "span",
                    status,
                    id="chain-status",
                    class_="state-active" if report["ok"] else "state-suspended",
                ),
                report["records"],
                report["checkpoints_valid"],
                report["last_signed_seq"],
                report["unsigned_tail"],
                "-" if report["anchors_checked"] is None else report["anchors_checked"],
            ]
        ],
        "verification",
    )
    problems = join(tag("li", p) for p in report["problems"])
    checkpoint = (
        f"newest checkpoint #{figures.checkpoint_number}, {fmt_duration(figures.checkpoint_age_seconds)} old"
        if figures.checkpoint_number is not None
        else "no checkpoint signed yet"
    )
    form = tag(
        "form",
        tag("label", "key_ID ", void("input", type="text", name="key_id", id="key-id", maxlength="36")),
        " ",
        void("input", type="submit", value="look up provenance", id="lookup"),
        method="get",
        action="/console/audit",
        class_="action",
    )
    found = Html("")
    if lookup is not None:
        key_id, result = lookup
        found = (
            tag("pre", json.dumps(result, indent=2, sort_keys=True, default=str), id="provenance")
            if result is not None
            else tag("p", f"no key {key_id} on this KME", id="provenance", class_="refusal")
        )
    rows = [
        [r.seq, r.at[:19], r.actor, r.action, r.subject, json.dumps(dict(r.data), sort_keys=True)[:160]]
        for r in records
    ]
    body = join(
        [
            facts,
            tag("ul", problems) if report["problems"] else Html(""),
            tag("p", checkpoint, id="checkpoint"),
            tag("h2", "Provenance of a key"),
            form,
            found,
            tag("h2", "Newest audit records"),
            table(["seq", "time (UTC)", "actor", "action", "subject", "data"], rows, "records"),
        ]
    )
    return page("Audit", body, viewer, kme_id, "audit")
