"""The FastAPI application: the three ETSI GS QKD 014 endpoints over the delivery service.

Endpoints are ``async``; the delivery service is synchronous. Get key and Get key with key IDs for
this KME's own SAEs are checked on the event loop; their database work is group-committed
(``kms.api.batcher``): on the loop (while it holds the write turn, on SQLite), except on PostgreSQL
served by a single process, where worker threads overlap the round trips. Keys for a slave at another KME wait on that KME in a thread of their own.
"""

from __future__ import annotations

import json.encoder
from binascii import b2a_base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.responses import Response

from kms import __version__
from kms.api.audit_routes import audit_router
from kms.api.batcher import UnitBatcher
from kms.api.body_limit import BodyLimitMiddleware
from kms.api.denials import DenialAggregator, write_denials
from kms.api.errors import ERROR_RESPONSES, CatchAllMiddleware, install_error_handlers, json_response
from kms.api.hot_path import HotPathMiddleware
from kms.api.identity import SaeAuthMiddleware, current_sae
from kms.api.schemas import SAE_ID_MAX_LENGTH, KeyContainer, KeyIds, KeyRequest, Status
from kms.audit.service import AuditService
from kms.domain.delivery import DeliveredKey
from kms.domain.errors import InvalidRequest, NotEntitled
from kms.domain.group_commit import Unit
from kms.domain.saes import SaeInfo
from kms.runtime import Runtime

T = TypeVar("T")
_json_text = json.encoder.encode_basestring_ascii

POST_ONLY_QUERY = frozenset({"additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"})
SaeIdPath = Annotated[str, Path(min_length=1, max_length=SAE_ID_MAX_LENGTH, description="SAE ID")]


def _container(keys: list[DeliveredKey]) -> Response:
    """The Key container, written directly: a third of the CPU of ``json.dumps`` on a list of
    dicts (the key is base64, which needs no escaping; the key_ID is escaped as JSON text)."""
    body = ",".join(
        [
            f'{{"key_ID":{_json_text(k.key_id)},"key":"{b2a_base64(k.material, newline=False).decode()}"}}'
            for k in keys
        ]
    )
    return Response(f'{{"keys":[{body}]}}', media_type="application/json")


def create_app(
    runtime: Runtime,
    lifespan_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
    api_processes: int = 1,
) -> FastAPI:
    """The KME's ASGI app. ``lifespan_hooks`` (start, stop) run background work in the server process;
    ``api_processes``: how many processes serve this KME (``qkms serve --workers``)."""

    denials = DenialAggregator(runtime.settings.server.denial_window_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if lifespan_hooks:
            lifespan_hooks[0]()
        try:
            yield
        finally:
            # Denials counted but not yet recorded, before the final audit checkpoint is signed.
            pending = denials.flush()
            if pending:
                await anyio.to_thread.run_sync(write_denials, runtime.db, pending)
            if lifespan_hooks:
                lifespan_hooks[1]()

    app = FastAPI(
        title="QKMS key delivery API (ETSI GS QKD 014)",
        version=__version__,
        description="Key delivery to SAEs over mutual TLS, as ETSI GS QKD 014 V1.1.1 defines it.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # A path with a trailing slash is no ETSI endpoint: a 400 Error, never a redirect (whose
        # Location would be built from the client's Host header).
        redirect_slashes=False,
    )
    install_error_handlers(app)
    service = runtime.service
    # A few database threads overlap PostgreSQL round trips; more only contend for the GIL. On
    # SQLite too, calls outside group commit run in a thread: one that writes may wait for the
    # write turn, which only the event loop can give back (``kms.api.batcher``).
    limiter = anyio.CapacityLimiter(runtime.settings.database.max_concurrency)

    async def run(fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    # A key for a slave at another KME waits on that KME: in a thread, never on the event loop.
    remote_limiter = anyio.CapacityLimiter(32)

    batcher = UnitBatcher(
        runtime.db,
        in_flight=runtime.settings.database.batches_in_flight,
        max_batch=runtime.settings.database.max_batch,
        # PostgreSQL with several processes also runs batches on the loop: while one process waits
        # on its round trips the others serve, and no thread hops or GIL hand-offs are paid.
        inline=runtime.db.is_sqlite or api_processes > 1,
        shared_turn=api_processes > 1,
    )

    async def commit(unit: Unit[T]) -> T:
        return await batcher.run(unit)

    async def get_keys(master: SaeInfo, slave_id: str, *args: Any) -> list[DeliveredKey]:
        unit = service.get_keys_unit(master, slave_id, *args)
        if unit is None:  # the slave is at another KME: wait on it in a thread, off the event loop
            return await anyio.to_thread.run_sync(
                service.get_keys, master, slave_id, *args, limiter=remote_limiter
            )
        return await commit(unit)

    async def get_keys_with_ids(slave: SaeInfo, master_id: str, key_ids: list[str]) -> list[DeliveredKey]:
        unit, normalised = service.get_keys_with_ids_unit(slave, master_id, key_ids)
        try:
            return await commit(unit)
        except NotEntitled:
            await run(service.audit_denied, slave, master_id, normalised)
            raise

    async def run_keys(slave_id: str, fn: Callable[..., T], *args: Any) -> T:
        slave = runtime.registry.get(slave_id)
        if slave is not None and slave.kme_id != runtime.settings.kme.id:
            return await anyio.to_thread.run_sync(fn, *args, limiter=remote_limiter)
        return await run(fn, *args)

    @app.get(
        "/api/v1/keys/{slave_SAE_ID}/status",
        response_model=Status,
        responses=ERROR_RESPONSES,
        summary="Get status",
        operation_id="getStatus",
    )
    async def get_status(request: Request, slave_SAE_ID: SaeIdPath) -> Response:
        master = current_sae(request.scope)
        view = await run_keys(slave_SAE_ID, service.status, master, slave_SAE_ID)
        return json_response(
            {
                "source_KME_ID": view.source_kme_id,
                "target_KME_ID": view.target_kme_id,
                "master_SAE_ID": view.master_sae_id,
                "slave_SAE_ID": view.slave_sae_id,
                "key_size": view.key_size,
                "stored_key_count": view.stored_key_count,
                "max_key_count": view.max_key_count,
                "max_key_per_request": view.max_key_per_request,
                "max_key_size": view.max_key_size,
                "min_key_size": view.min_key_size,
                "max_SAE_ID_count": view.max_sae_id_count,
                "status_extension": dict(view.extension),
            }
        )

    @app.get(
        "/api/v1/keys/{slave_SAE_ID}/enc_keys",
        response_model=KeyContainer,
        responses=ERROR_RESPONSES,
        summary="Get key (simple form: number and size as query parameters)",
        operation_id="getKeyGet",
    )
    async def enc_keys_get(
        request: Request,
        slave_SAE_ID: SaeIdPath,
        number: Annotated[int | None, Query(description="number of keys, default 1")] = None,
        size: Annotated[int | None, Query(description="key size in bits")] = None,
    ) -> Response:
        master = current_sae(request.scope)
        post_only = POST_ONLY_QUERY.intersection(request.query_params)
        if post_only:
            raise InvalidRequest(f"{', '.join(sorted(post_only))} must be sent in a POST body")
        keys = await get_keys(master, slave_SAE_ID, number, size)
        return _container(keys)

    async def enc_keys(master: SaeInfo, slave_id: str, req: KeyRequest) -> Response:
        keys = await get_keys(
            master,
            slave_id,
            req.number,
            req.size,
            req.additional_slave_SAE_IDs or (),
            req.extension_mandatory or (),
        )
        return _container(keys)

    async def dec_keys(slave: SaeInfo, master_id: str, body: KeyIds) -> Response:
        keys = await get_keys_with_ids(slave, master_id, [item.key_ID for item in body.key_IDs])
        return _container(keys)

    # Ordinary POSTs of the two hot calls skip FastAPI's routing and body handling; the endpoints
    # below call the same two handlers for everything else (and document the API).
    app.add_middleware(
        HotPathMiddleware,
        enc_keys=enc_keys,
        dec_keys=dec_keys,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.settings.kme.max_request_bytes)
    app.add_middleware(SaeAuthMiddleware, runtime=runtime, denials=denials)
    app.add_middleware(CatchAllMiddleware)

    @app.post(
        "/api/v1/keys/{slave_SAE_ID}/enc_keys",
        response_model=KeyContainer,
        responses=ERROR_RESPONSES,
        summary="Get key",
        operation_id="getKeyPost",
    )
    async def enc_keys_post(
        request: Request, slave_SAE_ID: SaeIdPath, body: Annotated[KeyRequest | None, Body()] = None
    ) -> Response:
        return await enc_keys(current_sae(request.scope), slave_SAE_ID, body or KeyRequest())

    @app.get(
        "/api/v1/keys/{master_SAE_ID}/dec_keys",
        response_model=KeyContainer,
        responses=ERROR_RESPONSES,
        summary="Get key with key IDs (simple form: ?key_ID=)",
        operation_id="getKeyWithKeyIdsGet",
    )
    async def dec_keys_get(
        request: Request,
        master_SAE_ID: SaeIdPath,
        key_ID: Annotated[list[str] | None, Query(description="key_ID (UUID) of a key to fetch")] = None,
    ) -> Response:
        slave = current_sae(request.scope)
        if not key_ID:
            raise InvalidRequest("the key_ID query parameter is required")
        keys = await get_keys_with_ids(slave, master_SAE_ID, key_ID)
        return _container(keys)

    @app.post(
        "/api/v1/keys/{master_SAE_ID}/dec_keys",
        response_model=KeyContainer,
        responses=ERROR_RESPONSES,
        summary="Get key with key IDs",
        operation_id="getKeyWithKeyIdsPost",
    )
    async def dec_keys_post(
        request: Request, master_SAE_ID: SaeIdPath, body: Annotated[KeyIds, Body()]
    ) -> Response:
        return await dec_keys(current_sae(request.scope), master_SAE_ID, body)

    audit = AuditService.for_settings(runtime.db, runtime.identity, runtime.settings)
    app.include_router(audit_router(audit, run))
    if runtime.network is not None:
        from kms.api.peer_routes import peer_router

        app.include_router(peer_router(runtime.network))
    _document_only_etsi_status_codes(app)
    return app


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
