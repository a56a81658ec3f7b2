"""Escaped HTML built in Python (DECISIONS.md D-36: no template engine). ``Html`` marks markup that
is already safe; everything else passes through :func:`esc` on its way into a page, so a link ID,
an SAE ID or an audit record's text can never become markup."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence


class Html(str):
    """A fragment of markup that is safe to emit as is."""


def esc(value: object) -> Html:
    """``value`` as text, escaped (an ``Html`` fragment passes unchanged)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def tag(element: str, /, *children: object, **attrs: object) -> Html:
    """``<name attrs>children</name>``; attribute values escaped, ``class_`` for ``class``, a
    ``None`` or ``False`` attribute left out, ``True`` written bare."""
    parts = [element]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{esc(value)}"')
    inner = "".join(esc(c) for c in children)
    return Html(f"<{' '.join(parts)}>{inner}</{element}>")


def void(element: str, /, **attrs: object) -> Html:
    """A void element (``input``, ``br``)."""
    return Html(tag(element, **attrs)[: -len(f"</{element}>")])


def join(parts: Iterable[object]) -> Html:
    return Html("".join(esc(p) for p in parts))


def cell(value: object) -> Html:
    """A ``<td>``; a value that already is one passes unchanged."""
    if isinstance(value, Html) and value.startswith("<td"):
        return value
    return tag("td", value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], id_: str | None = None) -> Html:
    head = tag("tr", *[tag("th", h) for h in headers])
    body = join(tag("tr", *[cell(c) for c in row]) for row in rows)
    return tag("table", tag("thead", head), tag("tbody", body), id=id_)


def number(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "never"
    return f"{value:,.{digits}f}" if digits else f"{int(value):,}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return "not drawn"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
