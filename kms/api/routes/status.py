"""Get status (ETSI GS QKD 014): the Status document (``kms.domain.delivery.Status``) as JSON."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kms.api.errors import ERROR_RESPONSES, json_response
from kms.api.identity import current_sae
from kms.api.routes.keys import SaeIdPath
from kms.api.schemas import Status
from kms.service.gateway import DeliveryGateway


def status_router(gateway: DeliveryGateway) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/api/v1/keys/{slave_SAE_ID}/status",
        response_model=Status,
        responses=ERROR_RESPONSES,
        summary="Get status",
        operation_id="getStatus",
    )
    async def get_status(request: Request, slave_SAE_ID: SaeIdPath) -> Response:
        status = await gateway.status(current_sae(request.scope), slave_SAE_ID)
        return json_response(dataclasses.asdict(status))

    return router
