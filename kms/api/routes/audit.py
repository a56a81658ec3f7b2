"""The audit API for security teams (auditor certificates only; SAEs get 401 here).

Auditors read provenance, audit records, checkpoints, verification results and the KME's public
keys. No endpoint here can return key material: the queries behind it never select it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from kms.api.errors import ERROR_RESPONSES_AUDIT, json_response
from kms.domain.errors import MSG_KEYS_NOT_FOUND, InvalidRequest
from kms.service.audit_queries import AuditService

T = TypeVar("T")


def audit_router(audit: AuditService, run: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix="/api/v1/audit", tags=["audit"], responses=ERROR_RESPONSES_AUDIT)

    @router.get("/keys/{key_ID}", summary="Provenance of one key", operation_id="auditKey")
    async def key(key_ID: Annotated[str, Path(min_length=1, max_length=64)]) -> Response:
        record = await run(audit.provenance, key_ID)
        if record is None:
            raise InvalidRequest(MSG_KEYS_NOT_FOUND, [{"key_ID": key_ID[:64]}])
        return json_response(record)

    @router.get("/events", summary="Audit records in order", operation_id="auditEvents")
    async def events(
        after_seq: Annotated[int, Query(ge=0, description="only records after this sequence number")] = 0,
        since: Annotated[str | None, Query(max_length=40, description="ISO 8601 UTC time")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        return json_response(await run(audit.events, after_seq, since, limit))

    @router.get("/checkpoints", summary="Signed checkpoints", operation_id="auditCheckpoints")
    async def checkpoints() -> Response:
        return json_response(await run(audit.checkpoints))

    @router.get("/verify", summary="Verify the whole audit chain", operation_id="auditVerify")
    async def verify() -> Response:
        return json_response(await run(audit.verify_report))

    @router.get(
        "/public-keys", summary="The KME's ML-DSA and ML-KEM public keys", operation_id="auditPublicKeys"
    )
    async def public_keys() -> Response:
        return json_response(await run(audit.public_keys))

    return router
