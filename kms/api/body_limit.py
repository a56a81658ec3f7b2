"""Refuses request bodies larger than the configured limit, before they are read whole.

Without it a client could make the KME buffer an arbitrarily large body. A declared
``Content-Length`` over the limit is refused at once; a streamed body is counted as it arrives.
Either way the answer is the ETSI Error body with status 400 (the standard has no 413).
"""

from __future__ import annotations

from typing import Any

from kms.api.errors import TrackedSend, error_response


class _TooLarge(Exception):
    """Internal: the body passed the limit while being read."""


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except _TooLarge:
            if tracked.started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        message = f"request body larger than {self.max_bytes} bytes"
        await error_response(400, message)(scope, receive, send)


def _content_length(scope: Any) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
