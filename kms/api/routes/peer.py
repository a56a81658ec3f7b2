"""The KME-to-KME endpoint: one POST that carries every signed peer message (not part of ETSI 014,
so it stays out of the published OpenAPI document). Only ``kme`` certificates reach it."""

from __future__ import annotations

from typing import Any

import anyio
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from structlog.contextvars import bind_contextvars

from kms.api.errors import error_response
from kms.api.identity import current_sae
from kms.api.request_log import log_fields
from kms.peer.mac_sessions import request_mac_accepted
from kms.peer.messages import SIGNATURE_HEADER, MessageRejected, MessageSealer, open_message
from kms.peer.network import PeerNetwork

log = structlog.get_logger(__name__)
MAX_MESSAGE_BYTES = 1 << 20


def peer_router(network: PeerNetwork) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    sealer = MessageSealer(network.kme_id, network.identity)
    # Peer messages may wait on the next hop or a device: run them off the event loop, a few at a time.
    limiter = anyio.CapacityLimiter(16)

    def answer(sender: str, raw: bytes, signature: str | None, fields: dict[str, Any]) -> Response:
        """Verify, act, sign (or MAC) the reply: all off the event loop, in one worker thread. An
        ML-DSA signature and its check are a millisecond or two of CPU that the loop, serving the
        SAEs' own requests meanwhile, should not wait behind."""
        try:
            message = open_message(
                raw,
                signature,
                network.directory,
                network.identity,
                network.peering.max_clock_skew_seconds,
                authenticated_sender=sender,
                mac_lookup=network.mac_keys.lookup,
                mac_accepted=request_mac_accepted,
            )
        except MessageRejected as exc:
            log.warning("peer_message_rejected", peer=sender, reason=exc.reason)
            return error_response(401, exc.reason)
        # The message type in the request's line and in every line its use case logs (this thread's
        # context is a copy: nothing leaks to the next request).
        fields["peer_message"] = message.type
        bind_contextvars(peer_message=message.type)
        try:
            body = network.handle(message)
            reply_type = f"{message.type}.ok"
        except MessageRejected as exc:
            log.warning("peer_message_refused", peer=sender, type=message.type, reason=exc.reason)
            body, reply_type = {"message": exc.reason}, "error"
        # A MAC'd request gets a reply MAC'd under the same key; a signed one a signed reply.
        _, reply_raw, header = sealer.seal(sender, reply_type, body, reply_to=message.nonce, mac=message.mac)
        return Response(reply_raw, media_type="application/json", headers={SIGNATURE_HEADER: header})

    @router.post("/peer/v1/messages")
    async def messages(request: Request) -> Response:
        sender = current_sae(request.scope).sae_id
        raw = await request.body()
        if len(raw) > MAX_MESSAGE_BYTES:
            return error_response(413, "peer message too large")
        signature = request.headers.get(SIGNATURE_HEADER)
        fields = log_fields(request.scope)
        return await anyio.to_thread.run_sync(
            answer, sender, raw, signature, {} if fields is None else fields, limiter=limiter
        )

    return router
