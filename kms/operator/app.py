"""The operator listener's ASGI app: ``GET /v1/health/live``, ``GET /v1/health/ready`` and
``GET /metrics`` (docs/OPERATIONS.md, "Health and metrics").

Health needs no credentials and says nothing secret. ``/metrics`` needs ``Authorization: Bearer
<token>`` with the token of ``operator.metrics_token_file`` unless ``operator.unauthenticated_metrics``.
Every refusal or failure is a one-line Error JSON (``{"message": ...}``, as the ETSI API's), never a
stack trace; health and metrics never answer 500: a failed check is reported in the body.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.exceptions import HTTPException as StarletteHTTPException

from kms import __version__
from kms.config import ConfigError, OperatorSection
from kms.operator.console.routes import Console, ConsoleRoutes
from kms.operator.exposition import Exposition
from kms.service.operator_health import HealthService
from kms.telemetry.framework import native_telemetry_off

READY_CODES = range(200, 600)
BODILESS = (204, 205, 304)  # HTTP forbids a body with these


def load_token(section: OperatorSection) -> bytes | None:
    """SHA-256 of the metrics bearer token (None when metrics are unauthenticated)."""
    if section.unauthenticated_metrics:
        return None
    path = section.metrics_token_file
    assert path is not None  # the config requires it
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"operator.metrics_token_file {path} cannot be read: {exc.strerror}") from exc
    if len(token) < 16:
        raise ConfigError(f"operator.metrics_token_file {path} must hold a token of at least 16 characters")
    return hashlib.sha256(token.encode()).digest()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers=headers)


class BadQuery(ValueError):
    """A query parameter out of range; its message is the answer's."""


def _code(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) not in READY_CODES:
        raise BadQuery(f"query parameter {name} must be an HTTP status code from 200 to 599")
    return int(raw)


NO_PLAIN_CONSOLE = "the console is served only over TLS (operator.tls = true); see docs/OPERATIONS.md"


def create_operator_app(
    health: HealthService,
    exposition: Exposition,
    token_sha256: bytes | None,
    console: Console | None = None,
    console_refused: bool = False,
) -> FastAPI:
    """``console``: the web console's parts (D-36), mounted under ``/console``; ``console_refused``:
    the console is on but the listener is plain HTTP, so ``/console`` says why it is not served."""
    app = FastAPI(
        title="QKMS operator API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        **native_telemetry_off(),
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such operator endpoint" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, message)

    @app.middleware("http")
    async def _no_stack_traces(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        try:
            return await call_next(request)
        except Exception as exc:
            return _error(500, f"internal error ({type(exc).__name__})")

    @app.get("/v1/health/live")
    async def live() -> dict[str, Any]:
        """The process answers (a supervisor restarts it otherwise)."""
        return {"status": "live", "version": __version__}

    @app.get("/v1/health/ready")
    async def ready(request: Request) -> Response:
        try:
            ready_code = _code(request, "readycode", 200)
            not_ready_code = _code(request, "notreadycode", 503)
        except BadQuery as exc:
            return _error(400, str(exc))
        result = await anyio.to_thread.run_sync(health.check)
        code = ready_code if result.ready else not_ready_code
        if code in BODILESS:
            return Response(status_code=code)
        body = {"status": "ready" if result.ready else "not ready", "version": __version__, **asdict(result)}
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if token_sha256 is not None:
            header = request.headers.get("authorization", "")
            scheme, _, presented = header.partition(" ")
            given = hashlib.sha256(presented.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, token_sha256):
                return _error(401, "metrics need the operator's bearer token", {"WWW-Authenticate": "Bearer"})
        body = await anyio.to_thread.run_sync(exposition.render)
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    if console is not None:
        ConsoleRoutes(console).mount(app)
    elif console_refused:

        @app.api_route("/console{rest:path}", methods=["GET", "POST"], include_in_schema=False)
        async def plain_console(rest: str) -> JSONResponse:
            return _error(404, NO_PLAIN_CONSOLE)

    return app
