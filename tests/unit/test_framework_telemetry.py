"""FastAPI's own OpenTelemetry hooks stay off (kms/telemetry/framework.py, DECISIONS.md D-32): even
with a tracer provider at hand, an app built with ``native_telemetry_off()`` records no span, where a
plain FastAPI app of the same release does (so a release that renames the settings fails here)."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
from fastapi import FastAPI

from kms.telemetry.framework import native_telemetry_off

trace = pytest.importorskip("opentelemetry.trace")


class RecordingProvider(trace.TracerProvider):  # type: ignore[misc]
    """A tracer provider that records the names of the spans started through it."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    def get_tracer(self, *_: Any, **__: Any) -> Any:
        provider = self

        class Tracer(trace.NoOpTracer):  # type: ignore[misc]
            def start_span(self, name: str, *args: Any, **kwargs: Any) -> Any:
                provider.spans.append(name)
                return super().start_span(name, *args, **kwargs)

            def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> Any:
                provider.spans.append(name)
                return super().start_as_current_span(name, *args, **kwargs)

        return Tracer()


def app_with(telemetry: dict[str, Any]) -> FastAPI:
    app = FastAPI(telemetry=telemetry)

    @app.get("/api/v1/keys/{sae_id}/status")
    def status(sae_id: str) -> dict[str, str]:
        return {"sae": sae_id}

    return app


async def get(app: FastAPI, path: str) -> Any:
    """One GET through the ASGI interface, as a server would make it: the JSON answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
    }
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    return json.loads(b"".join(body))


def test_native_telemetry_off_records_no_span_where_fastapi_would() -> None:
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        pytest.skip("this FastAPI release has no native telemetry")
    settings = native_telemetry_off()
    assert "telemetry" in settings
    on, off = RecordingProvider(), RecordingProvider()
    for provider, telemetry in ((on, {}), (off, settings["telemetry"])):
        app = app_with({**telemetry, "tracer_provider": provider})
        assert asyncio.run(get(app, "/api/v1/keys/SAE-1/status")) == {"sae": "SAE-1"}
    assert on.spans, "the release's hooks did not trace at all: this test shows nothing"
    assert off.spans == []
