"""Charts drawn as SVG on the server (DECISIONS.md D-36): a sparkline, a line chart with a time
axis, stacked bars, and the network graph. Presentation attributes only (no ``style``), so the
console's Content-Security-Policy needs no inline styles; every label passes through ``esc``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kms.operator.console.html import Html, esc, join, tag

STATE_COLOURS = {"active": "#2e7d32", "suspended": "#c62828", "down": "#757575"}
OTHER_COLOUR = "#ef6c00"


def _points(values: Sequence[float | None], width: float, height: float, top: float, pad: float) -> list[str]:
    """Polyline runs (a gap where a value is None), scaled to ``top`` (at least a tiny range)."""
    runs: list[str] = []
    current: list[str] = []
    step = (width - 2 * pad) / max(1, len(values) - 1)
    for i, v in enumerate(values):
        if v is None:
            if current:
                runs.append(" ".join(current))
            current = []
            continue
        y = height - pad - (v / top) * (height - 2 * pad) if top > 0 else height - pad
        current.append(f"{pad + i * step:.1f},{y:.1f}")
    if current:
        runs.append(" ".join(current))
    return runs


def _run(points: str, stroke_width: str, dot: float, transform: str | None = None) -> Html:
    """A polyline, or a dot for a run of one point (a minute with data between two without)."""
    if " " in points:
        return tag(
            "polyline",
            points=points,
            fill="none",
            stroke="#1565c0",
            stroke_width=stroke_width,
            transform=transform,
        )
    x, y = points.split(",")
    return tag("circle", cx=x, cy=y, r=dot, fill="#1565c0", transform=transform)


def sparkline(values: Sequence[float | None], label: str, width: int = 160, height: int = 32) -> Html:
    """A small line without axes; ``label`` is its accessible name and tooltip."""
    top = max((v for v in values if v is not None), default=0.0)
    lines = [_run(run, "1.5", 1.5) for run in _points(values, width, height, top, 2)]
    title = tag("title", label)
    return tag(
        "svg",
        title,
        *lines,
        class_="spark",
        width=width,
        height=height,
        viewBox=f"0 0 {width} {height}",
        role="img",
    )


def line_chart(
    values: Sequence[float | None],
    x_labels: tuple[str, str],
    y_unit: str,
    title: str,
    width: int = 640,
    height: int = 180,
) -> Html:
    """One series with a y axis from 0 to its maximum and the window's start and end on x."""
    pad, left = 8, 56
    known = [v for v in values if v is not None]
    top = _nice(max(known, default=0.0))
    plot_w, plot_h = width - left - pad, height - 2 * pad - 16
    runs = _points(values, plot_w, plot_h, top, 0)
    parts = [tag("title", title)]
    for frac in (0.0, 0.5, 1.0):
        y = pad + plot_h * (1 - frac)
        parts.append(tag("line", x1=left, x2=left + plot_w, y1=f"{y:.1f}", y2=f"{y:.1f}", stroke="#ddd"))
        parts.append(
            tag(
                "text",
                _fmt(top * frac) + y_unit,
                x=left - 4,
                y=f"{y + 4:.1f}",
                text_anchor="end",
                font_size="11",
            )
        )
    parts.extend(_run(run, "2", 2.5, f"translate({left},{pad})") for run in runs)
    parts.append(tag("text", x_labels[0], x=left, y=height - 2, font_size="11"))
    parts.append(tag("text", x_labels[1], x=left + plot_w, y=height - 2, font_size="11", text_anchor="end"))
    if not known:
        parts.append(
            tag(
                "text",
                "no data in this hour",
                x=left + plot_w / 2,
                y=pad + plot_h / 2,
                text_anchor="middle",
                fill="#777",
            )
        )
    return tag(
        "svg", *parts, class_="chart", width=width, height=height, viewBox=f"0 0 {width} {height}", role="img"
    )


def bars(
    stacks: Sequence[tuple[int, int]],
    x_labels: tuple[str, str],
    title: str,
    width: int = 640,
    height: int = 140,
) -> Html:
    """Stacked bars of (good, bad) counts: blocks delivered (green) and aborted (red) per minute."""
    pad, left = 8, 56
    top = _nice(float(max((g + b for g, b in stacks), default=0)))
    plot_w, plot_h = width - left - pad, height - 2 * pad - 16
    slot = plot_w / max(1, len(stacks))
    parts = [tag("title", title)]
    for frac in (0.0, 1.0):
        y = pad + plot_h * (1 - frac)
        parts.append(
            tag("text", _fmt(top * frac), x=left - 4, y=f"{y + 4:.1f}", text_anchor="end", font_size="11")
        )
    for i, (good, bad) in enumerate(stacks):
        x = left + i * slot
        base = float(pad + plot_h)
        for count, colour in ((good, STATE_COLOURS["active"]), (bad, STATE_COLOURS["suspended"])):
            if count and top:
                h = plot_h * count / top
                base -= h
                parts.append(
                    tag(
                        "rect",
                        x=f"{x:.1f}",
                        y=f"{base:.1f}",
                        width=f"{max(1.0, slot - 1):.1f}",
                        height=f"{h:.1f}",
                        fill=colour,
                    )
                )
    parts.append(tag("text", x_labels[0], x=left, y=height - 2, font_size="11"))
    parts.append(tag("text", x_labels[1], x=left + plot_w, y=height - 2, font_size="11", text_anchor="end"))
    return tag(
        "svg", *parts, class_="chart", width=width, height=height, viewBox=f"0 0 {width} {height}", role="img"
    )


def graph(nodes: Sequence[str], edges: Sequence[tuple[str, str, str, str]], me: str, size: int = 520) -> Html:
    """KMEs on a circle, links as lines coloured by state; ``edges``: (a, b, link ID, state)."""
    centre, radius = size / 2, size / 2 - 70
    place: dict[str, tuple[float, float]] = {}
    for i, node in enumerate(nodes):
        angle = 2 * math.pi * i / max(1, len(nodes)) - math.pi / 2
        place[node] = (centre + radius * math.cos(angle), centre + radius * math.sin(angle))
    parts = [tag("title", "network of KMEs and QKD links")]
    for a, b, link_id, state in edges:
        (x1, y1), (x2, y2) = place[a], place[b]
        colour = STATE_COLOURS.get(state, OTHER_COLOUR)
        dash = None if state == "active" else "6 4"
        parts.append(
            tag(
                "line",
                tag("title", f"{link_id}: {state}"),
                x1=f"{x1:.1f}",
                y1=f"{y1:.1f}",
                x2=f"{x2:.1f}",
                y2=f"{y2:.1f}",
                stroke=colour,
                stroke_width="3",
                stroke_dasharray=dash,
                data_link=link_id,
                data_state=state,
            )
        )
        parts.append(
            tag(
                "text",
                link_id,
                x=f"{(x1 + x2) / 2:.1f}",
                y=f"{(y1 + y2) / 2 - 4:.1f}",
                font_size="11",
                text_anchor="middle",
                fill=colour,
            )
        )
    for node in nodes:
        x, y = place[node]
        fill = "#1565c0" if node == me else "#fff"
        parts.append(
            tag("circle", cx=f"{x:.1f}", cy=f"{y:.1f}", r="16", fill=fill, stroke="#1565c0", stroke_width="2")
        )
        parts.append(tag("text", node, x=f"{x:.1f}", y=f"{y + 32:.1f}", font_size="12", text_anchor="middle"))
    return tag(
        "svg",
        *parts,
        class_="graph",
        width=size,
        height=size,
        viewBox=f"0 0 {size} {size}",
        role="img",
        id="topology",
    )


def _nice(value: float) -> float:
    """A round upper bound for an axis (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    return float(next(m * exp for m in (1, 2, 5, 10) if m * exp >= value))


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if value < 0.01:
        return f"{value:.4f}"
    if value < 1:
        return f"{value:.3f}"
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


__all__ = ["bars", "esc", "graph", "join", "line_chart", "sparkline"]
