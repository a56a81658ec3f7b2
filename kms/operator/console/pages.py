"""The console's link pages: the overview (every link, its sparklines, pool, alarms, fallback) and
one link's charts with the suspend and resume forms; and the keys page."""

from __future__ import annotations

from kms.operator.console import svg
from kms.operator.console.html import Html, cell, join, table, tag, void
from kms.operator.console.html import duration as fmt_duration
from kms.operator.console.html import number as fmt_number
from kms.operator.console.layout import csrf_field, notice, page, state_cell
from kms.service.console_auth import Viewer
from kms.service.console_view import WINDOW, Bucket, LinkDetail, Overview
from kms.service.operator_metrics import DbFigures, LinkFigures


def _num(value: float | int | None, cls: str, digits: int = 0) -> Html:
    raw = "" if value is None else (repr(value) if isinstance(value, float) else str(value))
    return tag("td", fmt_number(value, digits), class_=f"num {cls}", data_value=raw)


def _axis(o: Overview) -> tuple[str, str]:
    return ((o.now - WINDOW).strftime("%H:%M UTC"), o.now.strftime("%H:%M UTC"))


def _rates(buckets: list[Bucket]) -> list[float | None]:
    return [b.rate for b in buckets]


def _qbers(buckets: list[Bucket]) -> list[float | None]:
    return [b.qber for b in buckets]


def _link_row(link: LinkFigures, o: Overview, key_size: int) -> list[object]:
    buckets = o.series.get(link.link_id, [])
    alarms = [a for a in o.alarms if a.link_id == link.link_id]
    return [
        tag("a", link.link_id, href=f"/console/links/{link.link_id}"),
        link.peer_kme_id,
        state_cell(link.state),
        _num(link.qber, "qber", 4),
        svg.sparkline(_qbers(buckets), f"QBER of {link.link_id}, last hour"),
        svg.sparkline(_rates(buckets), f"key rate of {link.link_id}, last hour (bits/s)"),
        _num(link.own_bits, "stored"),
        _num(link.own_bits // key_size, "keys"),
        _num(link.mirror_bits, "mirror"),
        tag("td", fmt_duration(link.seconds_until_empty), class_="until-empty"),
        tag(
            "td",
            join(tag("div", f"{a.code}: {a.reason}", class_="alarm") for a in alarms) or "none",
            class_="alarms",
        ),
    ]


def _rows_with_ids(headers: list[str], rows: list[tuple[str, list[object]]], table_id: str) -> Html:
    head = tag("tr", *[tag("th", h) for h in headers])
    body = join(
        tag(
            "tr",
            *[cell(c) for c in cells],
            id=f"link-{key}",
            data_link=key,
        )
        for key, cells in rows
    )
    return tag("table", tag("thead", head), tag("tbody", body), id=table_id)


def _unavailable(o: Overview, viewer: Viewer, kme_id: str, title: str) -> Html:
    return page(title, notice(o.error, refusal=True), viewer, kme_id, "overview")


def overview_page(o: Overview, viewer: Viewer, kme_id: str, key_size: int) -> Html:
    if o.figures is None:
        return _unavailable(o, viewer, kme_id, "Overview")
    f: DbFigures = o.figures
    headers = [
        "link",
        "peer KME",
        "state",
        "QBER (newest block)",
        "QBER, last hour",
        "key rate, last hour",
        "stored bits",
        f"keys of {key_size} bits",
        "peer's bits (mirror)",
        "time to empty",
        "active alarms",
    ]
    links = _rows_with_ids(
        headers, [(link.link_id, _link_row(link, o, key_size)) for link in f.links], "links"
    )
    fallback_rows = [[m, s, n] for (m, s), n in sorted(o.fallback.items())]
    fallback = (
        table(["master SAE", "slave SAE", "PQC fallback keys, last hour"], fallback_rows, "fallback")
        if fallback_rows
        else tag("p", "No key was delivered by the PQC fallback in the last hour.", id="fallback")
    )
    keys = table(
        ["state", "keys"],
        [[s, _num(n, "count")] for s, n in sorted(f.keys_by_state.items())],
        "keys-by-state",
    )
    body = join(
        [
            tag(
                "p",
                f"As of {o.now:%Y-%m-%d %H:%M:%S} UTC. Pool levels are those of qkms status.",
                class_="muted",
            ),
            links,
            tag("h2", "Fallback in use"),
            fallback,
            tag("h2", "Keys by state"),
            keys,
            tag("h2", "Audit"),
            tag(
                "p",
                f"head record {f.audit_head_seq}; newest checkpoint "
                + (
                    f"#{f.checkpoint_number}, {fmt_duration(f.checkpoint_age_seconds)} old"
                    if f.checkpoint_number is not None
                    else "none yet"
                )
                + f"; {f.unsigned_records} records after it",
                id="audit-summary",
            ),
        ]
    )
    return page("Overview", body, viewer, kme_id, "overview")


def link_page(
    d: LinkDetail, viewer: Viewer, kme_id: str, key_size: int, message: str | None, refused: bool
) -> Html:
    o = d.overview
    if o.figures is None:
        return _unavailable(o, viewer, kme_id, f"Link {d.link_id}")
    link = next(link for link in o.figures.links if link.link_id == d.link_id)
    buckets = o.series.get(d.link_id, [])
    axis = _axis(o)
    verb = "suspend" if link.state == "active" else "resume"
    form = tag(
        "form",
        csrf_field(viewer),
        tag("label", "reason ", void("input", type="text", name="reason", id="reason", maxlength="200")),
        " ",
        void("input", type="submit", value=f"{verb} link", id=f"{verb}-link"),
        tag("span", " operators only: an auditor's attempt is refused and audited", class_="muted")
        if viewer.role != "operator"
        else "",
        method="post",
        action=f"/console/links/{d.link_id}/{verb}",
        class_="action",
    )
    facts = table(
        [
            "state",
            "QBER (newest block)",
            "stored bits",
            f"keys of {key_size} bits",
            "peer's bits (mirror)",
            "unconfirmed pieces",
            "time to empty",
        ],
        [
            [
                state_cell(link.state),
                _num(link.qber, "qber", 4),
                _num(link.own_bits, "stored"),
                _num(link.own_bits // key_size, "keys"),
                _num(link.mirror_bits, "mirror"),
                _num(link.unconfirmed_blocks, "unconfirmed"),
                fmt_duration(link.seconds_until_empty),
            ]
        ],
        "link-facts",
    )
    events = table(
        ["time", "actor", "event", "detail"],
        [
            [r.at[:19], r.actor, r.action, ", ".join(f"{k}={v}" for k, v in r.data.items())[:200]]
            for r in d.events
        ],
        "link-events",
    )
    body = join(
        [
            notice(message, refused),
            tag("p", f"peer KME {link.peer_kme_id}", class_="muted"),
            facts,
            form,
            tag("h2", "QBER by minute, last hour"),
            svg.line_chart(_qbers(buckets), axis, "", f"QBER of {d.link_id}"),
            tag("h2", "Secret key rate by minute, last hour"),
            svg.line_chart(_rates(buckets), axis, " b/s", f"key rate of {d.link_id}"),
            tag("h2", "Blocks by minute: delivered (green), aborted (red)"),
            svg.bars([(b.blocks, b.aborted) for b in buckets], axis, f"blocks of {d.link_id}"),
            tag(
                "p",
                f"last hour: {sum(b.blocks for b in buckets)} blocks stored, {sum(b.aborted for b in buckets)} aborted",
                id="block-totals",
            ),
            tag("h2", "Alarms, suspensions and resumptions, last hour"),
            events,
        ]
    )
    return page(f"Link {d.link_id}", body, viewer, kme_id, "overview")


def keys_page(f: DbFigures, viewer: Viewer, kme_id: str) -> Html:
    by_state = table(
        ["state", "keys"],
        [[s, _num(n, "count")] for s, n in sorted(f.keys_by_state.items())],
        "keys-by-state",
    )
    pairs: dict[tuple[str, str], dict[str, int]] = {}
    for p in f.pairs:
        per = pairs.setdefault((p.master_sae_id, p.slave_sae_id), {})
        per[p.policy] = per.get(p.policy, 0) + p.keys
    policies = sorted({p.policy for p in f.pairs})
    rows = [
        [
            m,
            s,
            *[_num(per.get(pol, 0), f"policy-{pol}") for pol in policies],
            _num(sum(per.values()), "total"),
        ]
        for (m, s), per in sorted(pairs.items())
    ]
    consumption = table(["master SAE", "slave SAE", *policies, "all keys"], rows, "pairs")
    detail = table(
        ["master SAE", "slave SAE", "policy", "state", "keys"],
        [[p.master_sae_id, p.slave_sae_id, p.policy, p.state, _num(p.keys, "count")] for p in f.pairs],
        "pair-states",
    )
    body = join(
        [
            tag("h2", "Keys by lifecycle state"),
            by_state,
            tag("h2", "Consumption per SAE pair (keys delivered, by policy)"),
            consumption,
            tag("h2", "Per SAE pair, policy and state"),
            detail,
        ]
    )
    return page("Keys", body, viewer, kme_id, "keys")
