"""The console's page shell: navigation, who is signed in, the sign-out form, and the style sheet
(served from ``/console/console.css``; the Content-Security-Policy allows nothing inline)."""

from __future__ import annotations

from kms.operator.console.html import Html, esc, tag, void
from kms.service.console_auth import Viewer

NAV = (
    ("overview", "/console/"),
    ("keys", "/console/keys"),
    ("topology", "/console/topology"),
    ("audit", "/console/audit"),
)

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #0d47a1; color: #fff; padding: 8px 16px; display: flex; gap: 18px; align-items: center; }
header a { color: #fff; text-decoration: none; } header a.here { text-decoration: underline; font-weight: bold; }
header .who { margin-left: auto; } header form { display: inline; }
main { padding: 12px 16px; } h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; background: #fff; } th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
th { background: #eceff1; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state-active { color: #2e7d32; font-weight: bold; } .state-suspended, .state-down { color: #c62828; font-weight: bold; }
.message { background: #e8f5e9; border: 1px solid #a5d6a7; padding: 6px 10px; }
.refusal { background: #ffebee; border: 1px solid #ef9a9a; padding: 6px 10px; }
.alarm { color: #c62828; } .muted { color: #777; } svg.chart, svg.graph { background: #fff; border: 1px solid #ddd; }
form.action { margin: 8px 0; } input[type=text], input[type=password] { padding: 4px; }
.login { max-width: 360px; margin: 60px auto; background: #fff; padding: 20px; border: 1px solid #ddd; }
.login label { display: block; margin-top: 10px; }
pre { background: #fff; border: 1px solid #ddd; padding: 8px; overflow-x: auto; }
"""


def csrf_field(viewer: Viewer) -> Html:
    return void("input", type="hidden", name="csrf", value=viewer.csrf)


def page(title: str, body: Html, viewer: Viewer | None, kme_id: str, here: str = "") -> Html:
    nav: list[object] = [tag("strong", f"QKMS {kme_id}")]
    if viewer is not None:
        nav += [tag("a", name, href=href, class_="here" if name == here else None) for name, href in NAV]
        logout = tag(
            "form",
            csrf_field(viewer),
            void("input", type="submit", value="sign out", id="logout"),
            method="post",
            action="/console/logout",
        )
        nav.append(tag("span", f"{viewer.account} ({viewer.role}) ", logout, class_="who", id="who"))
    head = tag(
        "head",
        Html('<meta charset="utf-8">'),
        tag("title", f"{title} - QKMS console"),
        void("link", rel="stylesheet", href="/console/console.css"),
    )
    return Html(
        "<!doctype html>"
        + tag("html", head, tag("body", tag("header", *nav), tag("main", tag("h1", title), body)), lang="en")
    )


def notice(message: str | None, refusal: bool = False) -> Html:
    if not message:
        return Html("")
    return tag("p", message, class_="refusal" if refusal else "message", id="notice", role="status")


def state_cell(state: str) -> Html:
    return tag("td", state, class_=f"state state-{esc(state)}", data_value=state)
