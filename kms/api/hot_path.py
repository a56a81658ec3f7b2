"""A lean ASGI path for the calls that carry nearly all traffic: ``POST .../enc_keys`` and
``POST .../dec_keys`` with a well-formed JSON body, and the KME-to-KME ``POST /peer/v1/messages``
(every ledger batch of two-site delivery is one).

Routing, dependency solving and FastAPI's generic body validation cost about as much CPU per request
as the key delivery itself. This middleware sits inside ``SaeAuthMiddleware`` (the caller is already
authenticated) and handles a request only when everything about it is ordinary: the exact path, no
query string, a JSON content type, a body that validates against the same pydantic model FastAPI
would use. It then calls the same handler the FastAPI endpoint calls
(``kms.api.routes.keys.KeyHandlers``, over ``kms.service.gateway``) and answers with the same bytes. Anything else — an invalid body, an odd content type, an unknown path — goes on to FastAPI
untouched (the body it read is replayed), so every error is produced in exactly one place and the
published OpenAPI document keeps describing what the server does. A peer message with a JSON
content type goes to ``kms.api.routes.peer.PeerEndpoint.respond``, which its FastAPI route calls
too (that route is not in the OpenAPI document).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from kms.api.errors import delivery_error_response
from kms.api.identity import current_sae
from kms.api.schemas import SAE_ID_MAX_LENGTH, KeyIds, KeyRequest
from kms.domain.errors import DeliveryError
from kms.domain.saes import SaeInfo
from kms.peer.messages import MESSAGES_PATH

_PREFIX = "/api/v1/keys/"

Handler = Callable[[SaeInfo, str, Any], Awaitable[Response]]
PeerHandler = Callable[[Any, bytes], Awaitable[Response]]
"""``(scope, body) -> answer`` for a peer message (``PeerEndpoint.respond``)."""


class HotPathMiddleware:
    """Serves ordinary ``enc_keys`` / ``dec_keys`` POSTs directly; passes everything else on."""

    def __init__(
        self, app: Any, enc_keys: Handler, dec_keys: Handler, peer: PeerHandler | None = None
    ) -> None:
        self.app = app
        self.peer = peer
        self.routes: dict[str, tuple[type[BaseModel], Handler]] = {
            "enc_keys": (KeyRequest, enc_keys),
            "dec_keys": (KeyIds, dec_keys),
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.peer is not None and scope.get("path") == MESSAGES_PATH and self._ordinary_post(scope):
            await self._peer_message(self.peer, scope, receive, send)
            return
        route = self._route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        sae_id, model, handler = route
        body, complete = await self._read_body(receive)
        parsed = _parse(model, body) if complete else None
        if parsed is None:
            await self.app(scope, _replay(body, complete, receive), send)
            return
        try:
            response = await handler(current_sae(scope), sae_id, parsed)
        except DeliveryError as exc:
            response = delivery_error_response(exc)
        await response(scope, receive, send)

    async def _peer_message(self, peer: PeerHandler, scope: Any, receive: Any, send: Any) -> None:
        body, complete = await self._read_body(receive)
        if not complete:
            await self.app(scope, _replay(body, complete, receive), send)
            return
        response = await peer(scope, body)
        await response(scope, receive, send)

    @staticmethod
    def _ordinary_post(scope: Any) -> bool:
        """A POST with no query string and a JSON body."""
        return (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("query_string")
            and _json_content(scope)
        )

    def _route(self, scope: Any) -> tuple[str, type[BaseModel], Handler] | None:
        path: str = scope.get("path", "")
        if not path.startswith(_PREFIX) or not self._ordinary_post(scope):
            return None
        sae_id, _, call = path[len(_PREFIX) :].partition("/")
        route = self.routes.get(call)
        if route is None or not 0 < len(sae_id) <= SAE_ID_MAX_LENGTH:
            return None
        return sae_id, route[0], route[1]

    @staticmethod
    async def _read_body(receive: Any) -> tuple[bytes, bool]:
        """The body, and whether it is all there (False: the client went away; FastAPI then sees
        what was read followed by the disconnect). ``BodyLimitMiddleware`` bounds its size."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks), True


def _json_content(scope: Any) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == b"application/json")
    return False


def _parse(model: type[BaseModel], body: bytes) -> BaseModel | None:
    if not body:
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None


def _replay(body: bytes, complete: bool, receive: Any) -> Callable[[], Awaitable[Any]]:
    """A ``receive`` that first hands back what was already read."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replay
