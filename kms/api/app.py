"""The FastAPI application: the ETSI GS QKD 014 endpoints and the auditor API over the application
services, behind the KME's middleware (outermost first): the request ID and log line
(``kms.api.request_log``), catch-all errors, SAE authentication by pinned certificate, the body
limit, and the lean hot path for ordinary ``enc_keys`` / ``dec_keys`` POSTs (``kms.api.hot_path``).
Routes live in ``kms.api.routes``; the event loop reaches the use cases through one
``kms.service.gateway.DeliveryGateway`` per app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI

from kms import __version__
from kms.api.body_limit import BodyLimitMiddleware
from kms.api.denials import DenialAggregator, write_denials
from kms.api.errors import CatchAllMiddleware, install_error_handlers
from kms.api.hot_path import HotPathMiddleware, PeerHandler
from kms.api.identity import SaeAuthMiddleware
from kms.api.request_log import RequestLog
from kms.api.routes.audit import audit_router
from kms.api.routes.keys import KeyHandlers, keys_router
from kms.api.routes.status import status_router
from kms.runtime.assembly import Runtime
from kms.service.audit_queries import AuditService
from kms.service.fair_share import FairShares
from kms.service.gateway import DeliveryGateway
from kms.telemetry.framework import native_telemetry_off

Hooks = tuple[Callable[[], None], Callable[[], None]]


def create_app(runtime: Runtime, lifespan_hooks: Hooks | None = None, api_processes: int = 1) -> FastAPI:
    """The KME's ASGI app. ``lifespan_hooks`` (start, stop) run background work in the server process;
    ``api_processes``: how many processes serve this KME (``qkms serve --workers``)."""
    denials = DenialAggregator(runtime.settings.server.denial_window_seconds)
    app = FastAPI(
        title="QKMS key delivery API (ETSI GS QKD 014)",
        version=__version__,
        description="Key delivery to SAEs over mutual TLS, as ETSI GS QKD 014 V1.1.1 defines it.",
        lifespan=_lifespan(runtime, denials, lifespan_hooks),
        docs_url=None,
        redoc_url=None,
        # A path with a trailing slash is no ETSI endpoint: a 400 Error, never a redirect (whose
        # Location would be built from the client's Host header).
        redirect_slashes=False,
        **native_telemetry_off(),
    )
    install_error_handlers(app)
    fair_shares = FairShares.for_settings(runtime.settings, runtime.db, api_processes)
    gateway = DeliveryGateway(
        runtime.service, runtime.db, runtime.settings.database, api_processes, fair_shares
    )
    handlers = KeyHandlers(gateway)
    app.include_router(status_router(gateway))
    app.include_router(keys_router(handlers))
    audit = AuditService.for_settings(runtime.db, runtime.identity, runtime.settings)
    app.include_router(audit_router(audit, gateway.in_thread))
    peer: PeerHandler | None = None
    if runtime.network is not None:
        from kms.api.routes.peer import PeerEndpoint, peer_router

        endpoint = PeerEndpoint(runtime.network, gateway.batcher.run)
        app.include_router(peer_router(endpoint))
        peer = endpoint.respond
    # Ordinary POSTs of the hot calls skip FastAPI's routing and body handling and call the same
    # handlers as the endpoints; added last, the catch-all is outermost.
    app.add_middleware(HotPathMiddleware, enc_keys=handlers.enc_keys, dec_keys=handlers.dec_keys, peer=peer)
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.settings.kme.max_request_bytes)
    app.add_middleware(SaeAuthMiddleware, runtime=runtime, denials=denials)
    app.add_middleware(CatchAllMiddleware)
    # Outermost: the request ID and log line cover the hot path, the routes and every refusal alike.
    app.add_middleware(RequestLog, enabled=runtime.settings.logging.requests)
    _document_only_etsi_status_codes(app)
    return app


def _lifespan(runtime: Runtime, denials: DenialAggregator, hooks: Hooks | None) -> Callable[[FastAPI], Any]:
    """Background work around serving; denials counted but not yet recorded are recorded at the
    stop, before the final audit checkpoint is signed."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if hooks:
            hooks[0]()
        try:
            yield
        finally:
            pending = denials.flush()
            if pending:
                await anyio.to_thread.run_sync(write_denials, runtime.db, pending)
            if hooks:
                hooks[1]()

    return lifespan


def _document_only_etsi_status_codes(app: FastAPI) -> None:
    """Drop FastAPI's generated 422 entries: validation failures are answered 400 with an Error body."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = original()
            for methods in doc.get("paths", {}).values():
                for operation in methods.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
