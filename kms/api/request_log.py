"""The request ID and the one ``request`` log line of every API request.

Outermost of the app's middleware (inside only Starlette's error guard), so the lean hot path
(``kms.api.hot_path``), FastAPI's routes and every refusal before them (401, body limit) are logged
by this same code. The request ID is the client's ``X-Request-ID`` when it is well formed (1 to 64
of ``A-Z a-z 0-9 . _ : -``: nothing a log line or a header could be forged with), else a fresh
random one; it is returned in the response's ``X-Request-ID`` and bound in structlog's contextvars
for the whole request, so every line logged while serving it (in threads it hands work to as well;
``anyio.to_thread`` copies the context) names it, and peer messages sent for it carry it on
(``kms.peer.client``). ``kms.api.identity`` binds the caller (``sae_id``, ``peer_kme_id`` or
``auditor_id``); the peer route adds ``peer_message``.

The line holds the request ID, method, endpoint (a fixed vocabulary, never the path, which could
carry anything), the caller, status, latency in ms and, for a refusal, the Error's message. Never a
body of a 200 answer: those carry key material (DECISIONS.md D-37).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars

from kms.telemetry.asgi import endpoint_of

log = structlog.get_logger("kms.request")

HEADER = b"x-request-id"
LOG_FIELDS = "qkms.log_fields"  # scope key: a dict of extra fields for the request's line
_WELL_FORMED = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_MESSAGE_LIMIT = 200


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's ``X-Request-ID`` if it is well formed, else None (a fresh one is made)."""
    for name, value in headers:
        if name == HEADER:
            return value.decode("ascii") if _WELL_FORMED.fullmatch(value) else None
    return None


def new_request_id() -> str:
    return os.urandom(12).hex()


def log_fields(scope: MutableMapping[str, Any]) -> dict[str, Any] | None:
    """The dict a handler may add fields of the request's line to (None outside ``RequestLog``)."""
    fields: dict[str, Any] | None = scope.get(LOG_FIELDS)
    return fields


class RequestLog:
    """ASGI middleware: request ID in, request ID out, one ``request`` line (when ``enabled``)."""

    def __init__(self, app: Any, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope["headers"]) or new_request_id()
        header = (HEADER, request_id.encode("ascii"))
        fields: dict[str, Any] = {}
        scope[LOG_FIELDS] = fields
        tokens = bind_contextvars(request_id=request_id)
        status = 500  # the app raised before answering (Starlette's guard answers 500)
        refusal: list[bytes] = []

        async def send_tagged(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), header]
            elif status >= 400 and len(refusal) < 4:
                refusal.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_tagged)
        finally:
            if self.enabled:
                log.info(
                    "request",
                    method=scope.get("method"),
                    endpoint=endpoint_of(scope.get("path", "")),
                    status=status,
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    **fields,
                    **({"error": _message(b"".join(refusal))} if status >= 400 else {}),
                )
            reset_contextvars(**tokens)


def _message(body: bytes) -> str:
    """The ETSI Error's ``message`` (the one line a client was told), bounded."""
    try:
        obj = json.loads(body)
    except ValueError:
        return ""
    message = obj.get("message") if isinstance(obj, dict) else None
    return str(message)[:_MESSAGE_LIMIT] if message is not None else ""
