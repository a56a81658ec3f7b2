"""The KME-to-KME endpoint: one POST that carries every signed peer message (not part of ETSI 014,
so it stays out of the published OpenAPI document). Only ``kme`` certificates reach it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
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
from kms.peer.messages import (
    MESSAGES_PATH,
    SIGNATURE_HEADER,
    MessageRejected,
    MessageSealer,
    PeerMessage,
    header_value,
    open_message,
)
from kms.peer.network import PeerNetwork
from kms.service.group_commit import Unit

log = structlog.get_logger(__name__)
MAX_MESSAGE_BYTES = 1 << 20
# A body naming this may be a ledger batch: it is opened on the loop (``grouped``), and whatever it
# turns out to be is then handled where its type says.
LEDGER_BATCH_TYPE = b'"keys.record.batch"'
SIGNATURE_HEADER_BYTES = SIGNATURE_HEADER.lower().encode()


RunUnit = Callable[[Unit[Any]], Awaitable[Any]]
"""The API's group commit (``kms.service.batcher.UnitBatcher.run``)."""


class PeerEndpoint:
    """What the endpoint does with one message: verify it, act on it (in a worker thread, or a ledger
    batch on the loop in the app's group commit), and seal the reply. The FastAPI route and the lean
    path (``kms.api.hot_path``) both answer through :meth:`respond`.

    ``run_unit``: the app's group commit; a ledger batch for slaves here (``keys.record.batch``)
    then joins the transaction of the SAEs' own requests instead of waiting for the write turn in a
    thread of its own (D-20). Without it every message is handled in a worker thread."""

    def __init__(self, network: PeerNetwork, run_unit: RunUnit | None = None) -> None:
        self.network = network
        self.run_unit = run_unit
        self.sealer = MessageSealer(network.kme_id, network.identity)
        # Peer messages may wait on the next hop or a device: off the event loop, a few at a time.
        self.limiter = anyio.CapacityLimiter(16)

    async def respond(self, scope: MutableMapping[str, Any], raw: bytes) -> Response:
        """The answer to one POSTed message from the authenticated KME of ``scope``."""
        sender = current_sae(scope).sae_id
        if len(raw) > MAX_MESSAGE_BYTES:
            return error_response(413, "peer message too large")
        signature = header_value(scope["headers"], SIGNATURE_HEADER_BYTES)
        fields = log_fields(scope)
        fields = {} if fields is None else fields
        if self.run_unit is not None and LEDGER_BATCH_TYPE in raw:
            return await self.grouped(sender, raw, signature, fields, self.run_unit)
        return await anyio.to_thread.run_sync(
            self.answer, sender, raw, signature, fields, limiter=self.limiter
        )

    def opened(self, sender: str, raw: bytes, signature: str | None) -> PeerMessage | Response:
        """The verified message, or the 401 that refuses it."""
        try:
            return open_message(
                raw,
                signature,
                self.network.directory,
                self.network.identity,
                self.network.peering.max_clock_skew_seconds,
                authenticated_sender=sender,
                mac_lookup=self.network.mac_keys.lookup,
                mac_accepted=request_mac_accepted,
            )
        except MessageRejected as exc:
            log.warning("peer_message_rejected", peer=sender, reason=exc.reason)
            return error_response(401, exc.reason)

    def sealed(self, sender: str, message: PeerMessage, reply_type: str, body: dict[str, Any]) -> Response:
        """The reply: MAC'd under the request's key for a MAC'd request, signed for a signed one."""
        _, reply_raw, header = self.sealer.seal(
            sender, reply_type, body, reply_to=message.nonce, mac=message.mac
        )
        return Response(reply_raw, media_type="application/json", headers={SIGNATURE_HEADER: header})

    def refused(self, sender: str, message: PeerMessage, exc: MessageRejected) -> tuple[dict[str, Any], str]:
        log.warning("peer_message_refused", peer=sender, type=message.type, reason=exc.reason)
        return {"message": exc.reason}, "error"

    def answer(self, sender: str, raw: bytes, signature: str | None, fields: dict[str, Any]) -> Response:
        """Verify, act, sign (or MAC) the reply: all off the event loop, in one worker thread. An
        ML-DSA signature and its check are a millisecond or two of CPU that the loop, serving the
        SAEs' own requests meanwhile, should not wait behind while this thread waits on the
        database, a device or the next hop."""
        message = self.opened(sender, raw, signature)
        if isinstance(message, Response):
            return message
        return self.answer_opened(sender, message, fields)

    def answer_opened(self, sender: str, message: PeerMessage, fields: dict[str, Any]) -> Response:
        # The message type in the request's line and in every line its use case logs (this thread's
        # context is a copy: nothing leaks to the next request).
        fields["peer_message"] = message.type
        bind_contextvars(peer_message=message.type)
        try:
            body = self.network.handle(message)
            reply_type = f"{message.type}.ok"
        except MessageRejected as exc:
            body, reply_type = self.refused(sender, message, exc)
        return self.sealed(sender, message, reply_type, body)

    async def grouped(
        self, sender: str, raw: bytes, signature: str | None, fields: dict[str, Any], run: RunUnit
    ) -> Response:
        """A ledger batch for slaves here, on the event loop: its records group-committed with the
        SAEs' own requests (no thread waits for the write turn), its signature checked and its
        receipt signed on the loop (the GIL is held for them wherever they run, so a thread would
        only add two hand-offs). Any other message goes to :func:`answer_opened` in a thread."""
        message = self.opened(sender, raw, signature)
        if isinstance(message, Response):
            return message
        fields["peer_message"] = message.type
        try:
            unit = self.network.group_unit(message)
            if unit is None:
                return await anyio.to_thread.run_sync(
                    self.answer_opened, sender, message, fields, limiter=self.limiter
                )
            body: dict[str, Any] = {"results": await run(unit)}
            reply_type = f"{message.type}.ok"
        except Exception as exc:
            rejection = self.network.refusal(message, exc)
            if rejection is None:
                raise
            body, reply_type = self.refused(sender, message, rejection)
        return self.sealed(sender, message, reply_type, body)


def peer_router(endpoint: PeerEndpoint) -> APIRouter:
    """The route for messages the lean path passes on (an odd content type, say): same answers."""
    router = APIRouter(include_in_schema=False)

    @router.post(MESSAGES_PATH)
    async def messages(request: Request) -> Response:
        return await endpoint.respond(request.scope, await request.body())

    return router
