"""One simulated device's ETSI GS QKD 014 API (a FastAPI app per device, both over one DevicePair).

Each device has exactly one SAE: its site's KME, recognised by the client certificate's pinned
SHA-256 fingerprint and CN (the certificate is already verified against the device CA by the TLS
handshake). Every other caller gets 401. Every non-200 answer carries an ETSI Error body; framework
errors fold into 400 (bad request, unknown path or method) and anything unexpected into 503, as the
standard allows no other codes.

The Error bodies are the device's own (``error_response``, ``_install_error_handlers``), the same shape as the
KME's (``kms.api.errors``) but not shared with it: the device is a stand-in for a vendor's box and
imports nothing of ``kms``; only the TLS-identity helpers in ``qkd_adapters`` are common to both.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Annotated, Any

import structlog
from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkd_adapters.certificates import certificate_common_name, fingerprint_sha256
from qkd_adapters.simdevice.pair import DevicePair, DeviceRequestError, Site

log = structlog.get_logger(__name__)

POST_ONLY_QUERY = frozenset({"additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"})
SaeIdPath = Annotated[str, Path(min_length=1, max_length=128)]
CALLER = "simdevice.caller"


class DeviceKeyRequest(BaseModel):
    """The body of the device's Get key (ETSI GS QKD 014 "Key request").

    Named apart from the KME's own request model (``kms.api.schemas.KeyRequest``): the device imports
    nothing of ``kms``, and one name stands for one concept.
    """

    model_config = ConfigDict(extra="ignore")

    number: StrictInt | None = None
    size: StrictInt | None = None
    additional_slave_SAE_IDs: list[Annotated[StrictStr, Field(max_length=128)]] | None = None
    extension_mandatory: list[dict[str, Any]] | None = None
    extension_optional: list[dict[str, Any]] | None = None


class KeyIdItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_ID: StrictStr


class KeyIds(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_IDs: list[KeyIdItem]


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None) -> JSONResponse:
    """An ETSI GS QKD 014 Error body: ``{"message": ..., "details": [...]}``."""
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    headers = {"WWW-Authenticate": 'Mutual realm="qkms"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Refusals, malformed requests, unknown paths and wrong methods as ETSI Error bodies (400/401/503,
    never 404, 405 or 422, never ``{"detail"}``)."""

    @app.exception_handler(DeviceRequestError)
    async def _refused(_: Request, exc: DeviceRequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, [dict(d) for d in exc.details] or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            details.append({"field": loc, "problem": str(err.get("msg", "invalid"))[:200]})
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


@functools.lru_cache(maxsize=256)
def _identity(der: bytes) -> tuple[str, str]:
    return fingerprint_sha256(der), certificate_common_name(der)


class ClientAuthMiddleware:
    """401 unless the client certificate is this device's SAE (pinned fingerprint and CN)."""

    def __init__(self, app: Any, sae_id: str, fingerprint: str) -> None:
        self.app = app
        self.sae_id = sae_id
        self.fingerprint = fingerprint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        der = scope.get("extensions", {}).get("tls", {}).get("client_cert_der")
        try:
            fingerprint, cn = _identity(der) if der else ("", "")
        except ValueError:
            fingerprint, cn = "", ""
        if fingerprint != self.fingerprint or cn != self.sae_id:
            await error_response(401, "the client certificate is not this device's SAE")(scope, receive, send)
            return
        scope[CALLER] = cn
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # no traceback, which could carry request data, reaches a client
            log.error("unhandled_error", error=type(exc).__name__, path=scope.get("path"))
            if started:
                raise
            await error_response(503, "the device could not process the request; retry later")(
                scope, receive, send
            )


def _container(keys: list[tuple[str, bytes]]) -> Response:
    body = {"keys": [{"key_ID": k, "key": base64.b64encode(m).decode()} for k, m in keys]}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def create_device_app(pair: DevicePair, site: Site, client_fingerprint: str) -> FastAPI:
    """Device ``site``'s ETSI 014 app; only ``pair.clients[site]`` with that certificate may call it."""
    app = FastAPI(
        title=f"QKMS simulated QKD device {site} (ETSI GS QKD 014)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    _install_error_handlers(app)
    app.add_middleware(ClientAuthMiddleware, sae_id=pair.clients[site], fingerprint=client_fingerprint)

    def caller(request: Request) -> str:
        sae: str = request.scope[CALLER]
        return sae

    @app.get("/api/v1/keys/{slave_SAE_ID}/status")
    async def status(request: Request, slave_SAE_ID: SaeIdPath) -> JSONResponse:
        return JSONResponse(pair.status(site, caller(request), slave_SAE_ID))

    @app.get("/api/v1/keys/{slave_SAE_ID}/enc_keys")
    async def enc_keys_get(
        request: Request,
        slave_SAE_ID: SaeIdPath,
        number: Annotated[int | None, Query()] = None,
        size: Annotated[int | None, Query()] = None,
    ) -> Response:
        post_only = POST_ONLY_QUERY.intersection(request.query_params)
        if post_only:
            raise DeviceRequestError(400, f"{', '.join(sorted(post_only))} must be sent in a POST body")
        return _container(pair.get_keys(site, caller(request), slave_SAE_ID, number, size))

    @app.post("/api/v1/keys/{slave_SAE_ID}/enc_keys")
    async def enc_keys_post(
        request: Request, slave_SAE_ID: SaeIdPath, body: Annotated[DeviceKeyRequest | None, Body()] = None
    ) -> Response:
        req = body or DeviceKeyRequest()
        if req.additional_slave_SAE_IDs:
            raise DeviceRequestError(400, "max_SAE_ID_count is 0: this device pair delivers point to point")
        if req.extension_mandatory:
            raise DeviceRequestError(400, "not all extension_mandatory parameters are supported")
        return _container(pair.get_keys(site, caller(request), slave_SAE_ID, req.number, req.size))

    @app.get("/api/v1/keys/{master_SAE_ID}/dec_keys")
    async def dec_keys_get(
        request: Request,
        master_SAE_ID: SaeIdPath,
        key_ID: Annotated[list[str] | None, Query()] = None,
    ) -> Response:
        if not key_ID:
            raise DeviceRequestError(400, "the key_ID query parameter is required")
        return _container(pair.get_keys_with_ids(site, caller(request), master_SAE_ID, key_ID))

    @app.post("/api/v1/keys/{master_SAE_ID}/dec_keys")
    async def dec_keys_post(
        request: Request, master_SAE_ID: SaeIdPath, body: Annotated[KeyIds, Body()]
    ) -> Response:
        ids = [item.key_ID for item in body.key_IDs]
        return _container(pair.get_keys_with_ids(site, caller(request), master_SAE_ID, ids))

    return app
