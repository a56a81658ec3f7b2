"""Get key (``enc_keys``) and Get key with key IDs (``dec_keys``), ETSI GS QKD 014.

:class:`KeyHandlers` is what both entry points call: the FastAPI endpoints below (every form of the
calls, and the OpenAPI document) and the lean hot path (``kms.api.hot_path``, ordinary POSTs). The
handlers call the service gateway (``kms.service.gateway``) and write the Key container.
"""

from __future__ import annotations

import json.encoder
from binascii import b2a_base64
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import Response

from kms.api.errors import ERROR_RESPONSES
from kms.api.identity import current_sae
from kms.api.schemas import SAE_ID_MAX_LENGTH, KeyContainer, KeyIds, KeyRequest
from kms.domain.delivery import DeliveredKey
from kms.domain.errors import InvalidRequest
from kms.domain.saes import SaeInfo
from kms.service.gateway import DeliveryGateway

_json_text = json.encoder.encode_basestring_ascii

POST_ONLY_QUERY = frozenset({"additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"})
SaeIdPath = Annotated[str, Path(min_length=1, max_length=SAE_ID_MAX_LENGTH, description="SAE ID")]


def key_container(keys: list[DeliveredKey]) -> Response:
    """The Key container, written directly: a third of the CPU of ``json.dumps`` on a list of
    dicts (the key is base64, which needs no escaping; the key_ID is escaped as JSON text)."""
    body = ",".join(
        [
            f'{{"key_ID":{_json_text(k.key_id)},"key":"{b2a_base64(k.material, newline=False).decode()}"}}'
            for k in keys
        ]
    )
    return Response(f'{{"keys":[{body}]}}', media_type="application/json")


class KeyHandlers:
    """The POST bodies' handlers, shared by the endpoints and the hot path."""

    def __init__(self, gateway: DeliveryGateway) -> None:
        self.gateway = gateway

    async def enc_keys(self, master: SaeInfo, slave_sae_id: str, body: KeyRequest) -> Response:
        keys = await self.gateway.get_keys(
            master,
            slave_sae_id,
            body.number,
            body.size,
            body.additional_slave_SAE_IDs or (),
            body.extension_mandatory or (),
        )
        return key_container(keys)

    async def dec_keys(self, slave: SaeInfo, master_sae_id: str, body: KeyIds) -> Response:
        keys = await self.gateway.get_keys_with_ids(
            slave, master_sae_id, [item.key_ID for item in body.key_IDs]
        )
        return key_container(keys)


def keys_router(handlers: KeyHandlers) -> APIRouter:
    """The four ETSI key endpoints (GET and POST of each call)."""
    router = APIRouter()
    gateway = handlers.gateway

    @router.get(
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
        return key_container(await gateway.get_keys(master, slave_SAE_ID, number, size))

    @router.post(
        "/api/v1/keys/{slave_SAE_ID}/enc_keys",
        response_model=KeyContainer,
        responses=ERROR_RESPONSES,
        summary="Get key",
        operation_id="getKeyPost",
    )
    async def enc_keys_post(
        request: Request, slave_SAE_ID: SaeIdPath, body: Annotated[KeyRequest | None, Body()] = None
    ) -> Response:
        return await handlers.enc_keys(current_sae(request.scope), slave_SAE_ID, body or KeyRequest())

    @router.get(
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
        return key_container(await gateway.get_keys_with_ids(slave, master_SAE_ID, key_ID))

    @router.post(
        "/api/v1/keys/{master_SAE_ID}/dec_keys",
        response_model=KeyContainer,
        responses=ERROR_RESPONSES,
        summary="Get key with key IDs",
        operation_id="getKeyWithKeyIdsPost",
    )
    async def dec_keys_post(
        request: Request, master_SAE_ID: SaeIdPath, body: Annotated[KeyIds, Body()]
    ) -> Response:
        return await handlers.dec_keys(current_sae(request.scope), master_SAE_ID, body)

    return router
