"""``qkms top``: a live terminal view of one KME for operators on a console (issue 15 part 4).

Links (state, QBER of the newest block, key rate, pool and time until empty), keys by state, peers,
the newest link alarms, the audit head and checkpoint, and the SIEM stream's lag; refreshed every
``--interval`` seconds until Ctrl-C. ``--once`` prints one frame and exits (for scripts and tests;
key rates then come from two snapshots ``--interval`` apart, none with ``--interval 0``). Everything
is read through ``kms.service.top_view`` (read only; the pool figures are ``qkms status``'s).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kms.config import ConfigError, KmsSettings

if TYPE_CHECKING:
    from kms.service.top_view import TopSnapshot, TopView

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
STATE_STYLE = {"active": "green", "suspended": "red"}


def top(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to the KME's qkms.toml.")],
    interval: Annotated[
        float, typer.Option(help="Seconds between refreshes (and between the two reads of --once).", min=0)
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
) -> None:
    """A live view of the KME: links, QBER, key rates, pool, alarms, peers, audit (Ctrl-C quits)."""
    try:
        settings = KmsSettings.load(config)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not once and interval <= 0:
        err_console.print("[red]error:[/red] --interval must be above 0 for the live view")
        raise typer.Exit(2)
    from kms.service.top_view import TopView, key_rates

    view = TopView.for_settings(settings)
    try:
        if once:
            first = view.snapshot()
            before = None
            if interval > 0:
                time.sleep(interval)
                before, first = first, view.snapshot()
            console.print(render(settings, first, key_rates(before, first)))
            return
        _live(view, settings, interval)
    finally:
        view.close()


def _live(view: TopView, settings: KmsSettings, interval: float) -> None:
    from kms.service.top_view import key_rates

    previous = view.snapshot()
    with Live(render(settings, previous, {}), console=console, screen=False, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                current = view.snapshot()
                live.update(render(settings, current, key_rates(previous, current)), refresh=True)
                previous = current
        except KeyboardInterrupt:
            pass


def render(settings: KmsSettings, snap: TopSnapshot, rates: dict[str, float]) -> RenderableType:
    title = Text(f"KME {settings.kme.id}  {snap.at.strftime('%Y-%m-%d %H:%M:%S')} UTC", style="bold")
    if snap.figures is None:
        return Group(title, Text(snap.error or "database: no answer", style="red"))
    f = snap.figures
    parts: list[RenderableType] = [title, _links(settings, snap, rates)]
    keys = Table(title="keys by lifecycle state")
    keys.add_column("state")
    keys.add_column("count", justify="right")
    for state, count in sorted(f.keys_by_state.items()):
        keys.add_row(state, str(count))
    parts.append(keys)
    if settings.peers:
        peers = Table(title="peer KMEs")
        for col in ("KME", "adjacent", "last message"):
            peers.add_column(col)
        for peer in settings.peers:
            age = f.peer_message_age_seconds.get(peer.kme_id)
            peers.add_row(
                peer.kme_id, "yes" if peer.url else "relay only", "-" if age is None else f"{age:.0f} s ago"
            )
        parts.append(peers)
    alarms = Table(title="newest link alarms and suspensions")
    for col in ("time", "link", "event", "detail"):
        alarms.add_column(col)
    for event in snap.events:
        alarms.add_row(event.at[:19], event.link_id, event.action, event.detail)
    if not snap.events:
        alarms.add_row("-", "-", "none", "")
    parts.append(alarms)
    audit = f"audit: head seq {f.audit_head_seq}, {f.unsigned_records} unsigned"
    if f.checkpoint_number is not None and f.checkpoint_age_seconds is not None:
        audit += f", checkpoint #{f.checkpoint_number} {f.checkpoint_age_seconds:.0f} s old"
    parts.append(Text(audit))
    for lag in snap.siem:
        parts.append(
            Text(
                f"SIEM {lag.sink}: shipped seq {lag.shipped_seq}, {lag.records_behind} behind"
                f" ({lag.seconds_behind:.0f} s)",
                style="yellow" if lag.records_behind else "",
            )
        )
    return Group(*parts)


def _links(settings: KmsSettings, snap: TopSnapshot, rates: dict[str, float]) -> Table:
    assert snap.figures is not None
    size = settings.pool.key_size
    table = Table(title="links and pool")
    for col in ("link", "peer KME", "state", "QBER", "key rate", "stored bits", f"keys of {size} bits"):
        table.add_column(col, justify="left" if col in ("link", "peer KME", "state") else "right")
    for col in ("peer's bits (mirror)", "unconfirmed pieces", "until empty"):
        table.add_column(col, justify="right")
    for link in snap.figures.links:
        rate = rates.get(link.link_id)
        table.add_row(
            link.link_id,
            link.peer_kme_id,
            Text(link.state, style=STATE_STYLE.get(link.state, "yellow")),
            "-" if link.qber is None else f"{100 * link.qber:.2f} %",
            "-" if rate is None else f"{rate:,.0f} bit/s",
            str(link.own_bits),
            str(link.own_bits // size),
            str(link.mirror_bits),
            str(link.unconfirmed_blocks),
            _duration(link.seconds_until_empty),
        )
    return table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "no draw"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
