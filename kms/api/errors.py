"""Every non-200 answer is an ETSI Error body: ``{"message": ..., "details": [...]}``.

Framework errors are folded into the three codes the standard defines: validation failures,
unknown paths and wrong methods become 400; anything unexpected becomes 503 with no stack trace.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kms.api.schemas import Error
from kms.domain.errors import DeliveryError, InvalidRequest, NotEntitled, ServiceUnavailable

log = structlog.get_logger(__name__)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Bad request format"},
    401: {"model": Error, "description": "Unauthorized"},
    503: {"model": Error, "description": "Error on server side"},
}
ERROR_RESPONSES_AUDIT = ERROR_RESPONSES


def json_response(data: Any) -> Response:
    """A JSON response serialised once, without FastAPI's response-model validation pass."""
    return Response(json.dumps(data, separators=(",", ":")), media_type="application/json")


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    headers = {"WWW-Authenticate": 'Mutual realm="qkms"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def delivery_error_response(exc: DeliveryError) -> JSONResponse:
    """The Error answer to a refused delivery request (400, 401 or 503)."""
    return error_response(_status_of(exc), exc.message, [dict(d) for d in exc.details or ()])


def _status_of(exc: DeliveryError) -> int:
    if isinstance(exc, NotEntitled):
        return 401
    if isinstance(exc, ServiceUnavailable):
        return 503
    assert isinstance(exc, InvalidRequest)
    return 400


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        details.append({"field": loc, "problem": str(err.get("msg", "invalid"))[:200]})
    return details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DeliveryError)
    async def _delivery(_: Request, exc: DeliveryError) -> JSONResponse:
        return delivery_error_response(exc)

    install_etsi_format_handlers(app)


def install_etsi_format_handlers(app: FastAPI) -> None:
    """Malformed requests, unknown paths and wrong methods answered 400 with an ETSI Error body (no 422,
    no ``{"detail"}``). The simulated device (``qkd_adapters.simdevice.app``) has its own copy."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        message = (
            "request body is not valid JSON"
            if malformed
            else "request does not match the ETSI GS QKD 014 format"
        )
        return error_response(400, message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(400, "no such endpoint in ETSI GS QKD 014")
        if exc.status_code == 405:
            return error_response(400, "method not allowed on this endpoint")
        return error_response(400, str(exc.detail)[:200])


class TrackedSend:
    """An ASGI ``send`` that remembers whether the response has started: a middleware may answer
    with its own Error body only while nothing has been sent."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class CatchAllMiddleware:
    """Turns any unexpected exception into a 503 Error body, logging only the exception type.

    Installed as ASGI middleware (inside Starlette's ServerErrorMiddleware) so nothing is re-raised
    to the server, and no traceback, which could carry request data, reaches a client.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.error("unhandled_error", error=type(exc).__name__, path=scope.get("path"))
            if tracked.started:
                raise
            response = error_response(503, "the KME could not process the request; retry later")
            await response(scope, receive, send)
