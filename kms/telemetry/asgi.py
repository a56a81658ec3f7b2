"""Counts and times every ETSI API request (``qkms_api_requests_total``,
``qkms_api_request_duration_seconds``) as a plain ASGI wrapper around the whole app, outside its
middleware, so refused requests (401, 400 before routing) count too. The endpoint label comes from a
fixed vocabulary, never from the path itself (which carries SAE IDs and could carry anything)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kms.telemetry.metrics import Instruments

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ETSI_ENDS = {"enc_keys": "enc_keys", "dec_keys": "dec_keys", "status": "status"}


def endpoint_of(path: str) -> str:
    """``enc_keys``, ``dec_keys``, ``status`` (ETSI 014), ``audit``, ``peer`` or ``other``."""
    if path.startswith("/api/v1/keys/"):
        return _ETSI_ENDS.get(path.rsplit("/", 1)[-1], "other")
    if path.startswith("/api/v1/audit/"):
        return "audit"
    if path.startswith("/peer/v1/"):
        return "peer"
    return "other"


class RequestMetrics:
    """ASGI wrapper: one counter increment and one histogram observation per HTTP request."""

    def __init__(self, app: ASGIApp, instruments: Instruments) -> None:
        self.app = app
        self._requests = instruments.api_requests
        self._seconds = instruments.api_seconds
        # Label children (buffered, ``kms.telemetry.buffered``) resolved once per label values.
        self._timers = {name: self._seconds.labels(name) for name in ("enc_keys", "dec_keys", "status")}
        self._counters: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # a request whose app raised before answering

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = endpoint_of(scope.get("path", ""))
            timer = self._timers.get(endpoint)
            if timer is None:
                timer = self._timers[endpoint] = self._seconds.labels(endpoint)
            timer.observe(time.perf_counter() - started)
            counter = self._counters.get((endpoint, status))
            if counter is None:
                counter = self._counters[(endpoint, status)] = self._requests.labels(endpoint, str(status))
            counter.inc()
