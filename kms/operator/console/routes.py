"""The console's routes on the operator app (DECISIONS.md D-36). Pages are GETs that change
nothing; every POST (sign in, sign out, suspend, resume) carries a CSRF token: the session's, or
for signing in a double-submit token in a short-lived cookie. A missing or stale session, a wrong
token and an auditor's attempt at an operator action are refused with a page saying so, and
audited (``kms.service.console_auth``/``console_actions``). Database work runs in worker threads,
after a bounded check that the database answers: when it is down or hung, every page (the sign-in
form too) answers 503 saying so within ``operator.health_timeout_seconds``.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from kms.config import KmsSettings
from kms.operator.console.audit_pages import audit_page, error_page, login_page, topology_page
from kms.operator.console.html import Html
from kms.operator.console.layout import CSP, CSS
from kms.operator.console.pages import keys_page, link_page, overview_page
from kms.service.console_actions import ActionRefused, ConsoleActions
from kms.service.console_auth import ConsoleAuth, LoginRefused, SessionStale, Viewer
from kms.service.console_view import ConsoleView
from kms.service.database_probe import DatabaseProbe
from kms.service.links import LinkStateError

SESSION_COOKIE = "qkms_session"
LOGIN_COOKIE = "qkms_login"
MAX_FORM_BYTES = 8192
DONE = {"suspend": "The link was suspended.", "resume": "The link was resumed."}
T = TypeVar("T")


@dataclass
class Console:
    settings: KmsSettings
    auth: ConsoleAuth
    view: ConsoleView
    actions: ConsoleActions
    peers_down: Callable[[], frozenset[str]]
    database: DatabaseProbe

    @property
    def kme_id(self) -> str:
        return self.settings.kme.id


def _html(body: Html, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        body,
        status_code=status,
        headers={
            "Content-Security-Policy": CSP,
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


async def _run(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


async def _form(request: Request) -> dict[str, str] | None:
    """The urlencoded form's fields (first value each), or None for anything else."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[0] for k, v in fields.items()}


def _same(given: str | None, expected: str | None) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(str(given).encode(), str(expected).encode())


def _page(render: Callable[[str], Html], status: int = 200) -> HTMLResponse:
    """The sign-in page with a fresh double-submit CSRF token, also set as a cookie of its path."""
    token = secrets.token_urlsafe(24)
    response = _html(render(token), status)
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=900, path="/console/login", secure=True, httponly=True, samesite="strict"
    )
    return response


class ConsoleRoutes:
    """The console's handlers, mounted under ``/console`` (only over TLS: ``kms.operator.app``)."""

    def __init__(self, c: Console) -> None:
        self.c = c

    def mount(self, app: FastAPI) -> None:
        routes: list[tuple[str, Callable[..., Any], str]] = [
            ("/console", self.root, "GET"),
            ("/console/console.css", self.css, "GET"),
            ("/console/login", self.login_form, "GET"),
            ("/console/login", self.login, "POST"),
            ("/console/logout", self.logout, "POST"),
            ("/console/", self.overview, "GET"),
            ("/console/links/{link_id}", self.link, "GET"),
            ("/console/links/{link_id}/{verb}", self.link_action, "POST"),
            ("/console/keys", self.keys, "GET"),
            ("/console/topology", self.topology, "GET"),
            ("/console/audit", self.audit, "GET"),
        ]
        for path, handler, method in routes:
            guarded = self._guarded(handler, needs_database=handler != self.css)
            app.add_api_route(path, guarded, methods=[method], include_in_schema=False)

    def _guarded(
        self, handler: Callable[..., Awaitable[Response]], needs_database: bool
    ) -> Callable[..., Awaitable[Response]]:
        """A page that cannot be built (the database down or hung) answers 503 with a page saying
        so, never a stack trace; a database that does not answer in time is not waited on."""

        @functools.wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Response:
            try:
                down = await _run(self.c.database.down) if needs_database else None
                if down is not None:
                    message = f"the console cannot serve this page: {down}; try again once it is back"
                    return _html(error_page(self.c.kme_id, None, message), 503)
                return await handler(*args, **kwargs)
            except Exception as exc:
                message = f"the KME could not build this page ({type(exc).__name__}): is its database up?"
                return _html(error_page(self.c.kme_id, None, message), 503)

        return guarded

    async def viewer_or_refusal(self, request: Request) -> Viewer | Response:
        """The signed-in viewer, or the answer for a request without a live session."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            if request.method == "GET":
                return RedirectResponse("/console/login", status_code=303)
            return _html(
                error_page(self.c.kme_id, None, "sign in first: this request carries no session"), 401
            )
        try:
            return await _run(self.c.auth.session, token)
        except SessionStale:
            message = "your session has expired or ended; sign in again"
            response = _page(lambda t: login_page(self.c.kme_id, t, message), 401)
            response.delete_cookie(SESSION_COOKIE, path="/console")
            return response

    async def checked_post(self, request: Request, action: str) -> tuple[Viewer, dict[str, str]] | Response:
        """A POST's viewer and form once its session and CSRF token are good; else the refusal."""
        viewer = await self.viewer_or_refusal(request)
        if not isinstance(viewer, Viewer):
            return viewer
        form = await _form(request)
        if form is None or not _same(form.get("csrf"), viewer.csrf):
            await _run(self.c.auth.refuse, viewer, action, "missing or wrong CSRF token")
            message = "refused: the form's CSRF token is missing or wrong"
            return _html(error_page(self.c.kme_id, viewer, message), 403)
        return viewer, form

    async def root(self) -> Response:
        return RedirectResponse("/console/", status_code=303)

    async def css(self) -> Response:
        return Response(CSS, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    async def login_form(self) -> Response:
        return _page(lambda t: login_page(self.c.kme_id, t, None))

    async def login(self, request: Request) -> Response:
        c = self.c
        form = await _form(request)
        if form is None or not _same(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            await _run(c.auth.refuse, None, "console.login", "missing or wrong CSRF token")
            message = "refused: the sign-in form's CSRF token is missing or wrong; reload the page"
            return _html(error_page(c.kme_id, None, message), 403)
        try:
            signed = await _run(c.auth.login, form.get("name", ""), form.get("password", ""))
        except LoginRefused as exc:
            refusal = str(exc)
            return _page(lambda t: login_page(c.kme_id, t, refusal), 401)
        redirect = RedirectResponse("/console/", status_code=303)
        max_age = int(c.settings.operator.session_hours * 3600)
        redirect.set_cookie(
            SESSION_COOKIE,
            signed.token,
            max_age=max_age,
            path="/console",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        redirect.delete_cookie(LOGIN_COOKIE, path="/console/login")
        return redirect

    async def logout(self, request: Request) -> Response:
        checked = await self.checked_post(request, "console.logout")
        if isinstance(checked, Response):
            return checked
        await _run(self.c.auth.logout, request.cookies[SESSION_COOKIE], checked[0])
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/console")
        return response

    async def overview(self, request: Request) -> Response:
        viewer = await self.viewer_or_refusal(request)
        if not isinstance(viewer, Viewer):
            return viewer
        data = await _run(self.c.view.overview)
        return _html(overview_page(data, viewer, self.c.kme_id, self.c.settings.pool.key_size))

    async def link(self, request: Request, link_id: str) -> Response:
        viewer = await self.viewer_or_refusal(request)
        if not isinstance(viewer, Viewer):
            return viewer
        done = DONE.get(request.query_params.get("done", ""))
        return await self._link_page(viewer, link_id, done, False, 200)

    async def _link_page(
        self, viewer: Viewer, link_id: str, message: str | None, refused: bool, status: int
    ) -> Response:
        detail = await _run(self.c.view.link, link_id)
        if detail is None:
            return _html(error_page(self.c.kme_id, viewer, f"no link {link_id} on this KME"), 404)
        key_size = self.c.settings.pool.key_size
        return _html(link_page(detail, viewer, self.c.kme_id, key_size, message, refused), status)

    async def link_action(self, request: Request, link_id: str, verb: str) -> Response:
        if verb not in DONE:
            return _html(error_page(self.c.kme_id, None, "no such console action"), 404)
        checked = await self.checked_post(request, f"link.{verb}")
        if isinstance(checked, Response):
            return checked
        viewer, form = checked
        try:
            await _run(self.c.actions.link, viewer, link_id, verb, form.get("reason", ""))
        except ActionRefused as exc:
            return _html(error_page(self.c.kme_id, viewer, f"refused: {exc}"), 403)
        except LinkStateError as exc:
            return await self._link_page(viewer, link_id, f"refused: {exc}", True, 409)
        return RedirectResponse(f"/console/links/{link_id}?done={verb}", status_code=303)

    async def keys(self, request: Request) -> Response:
        viewer = await self.viewer_or_refusal(request)
        if not isinstance(viewer, Viewer):
            return viewer
        return _html(keys_page(await _run(self.c.view.figures), viewer, self.c.kme_id))

    async def topology(self, request: Request) -> Response:
        viewer = await self.viewer_or_refusal(request)
        if not isinstance(viewer, Viewer):
            return viewer
        edges = await _run(self.c.view.topology)
        figures = await _run(self.c.view.figures)
        return _html(topology_page(edges, figures, self.c.settings, self.c.peers_down(), viewer))

    async def audit(self, request: Request) -> Response:
        viewer = await self.viewer_or_refusal(request)
        if not isinstance(viewer, Viewer):
            return viewer
        key_id = request.query_params.get("key_id", "").strip()[:64]
        lookup = (key_id, await _run(self.c.actions.provenance, viewer, key_id)) if key_id else None
        report = await _run(self.c.view.verification)
        figures = await _run(self.c.view.figures)
        records = await _run(self.c.view.recent_records)
        return _html(audit_page(self.c.kme_id, viewer, report, figures, records, lookup))
